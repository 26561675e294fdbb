"""Where the training step waits for the device: host-device synchronisations per step of a real ``sora-train`` run.

    python tools/find_syncs.py                                   # the quickstart DiT stage, random frozen VAEs
    python tools/find_syncs.py -- experiment=quickstart/video_vae
    python tools/find_syncs.py --steps 20 -- trainer.accelerator=gpu   # on a GPU: CUDA's own sync debug mode too

Runs ``sora-train`` (the overrides after ``--``; default ``experiment=quickstart/dit`` on random frozen VAEs) with
:class:`sora.training.host_syncs.SyncAudit` and prints, per place in the code, how many synchronising reads
each step made: the steps between two logging steps (what should be none), and the logging steps (where the
logger reads every logged value anyway). The first step (latent statistics, the optimizer's state) is left out.
On a CPU every tensor is a host tensor, so the audit also lists reads that a GPU run makes on host tensors;
``tests/test_host_syncs.py`` names those.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=4)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    overrides = extra if any(o.startswith("experiment=") for o in extra) else [*DEFAULT, *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "syncs.json"
        cmd = [sys.executable, "-m", "sora.cli.train", *overrides, f"trainer.max_steps={args.steps}",
               f"trainer.log_every_n_steps={args.log_every}", "trainer.val_check_interval=100000",
               f"+callbacks.audit={{_target_: sora.training.host_syncs.SyncAudit, path: {out}}}",
               f"hydra.run.dir={Path(tmp) / 'run'}"]
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.stderr.write(run.stderr[-3000:])
            return run.returncode
        report = json.loads(out.read_text())
    steps = {int(s): Counter(c) for s, c in report["steps"].items()}
    logging = set(report["logging_steps"])
    groups = {"between logging steps": [s for s in steps if s and s not in logging],
              "logging steps": [s for s in steps if s and s in logging]}
    print(f"sora-train {' '.join(overrides)}: {len(steps)} steps on {report['device']}, the logger writes every "
          f"{report['log_every_n_steps']}")
    for name, group in groups.items():
        total = sum((steps[s] for s in group), Counter())
        print(f"\n{name} ({len(group)} steps): {sum(total.values()) / max(len(group), 1):.1f} per step")
        for where, n in total.most_common():
            print(f"  {n / len(group):6.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
