"""sora-train's steady-state step time against a bare PyTorch loop over the same module and batches.

    python tools/bench_overhead.py                        # the quickstart DiT stage on CPU
    python tools/bench_overhead.py --steps 80 -- data.num_workers=1 trainer.log_every_n_steps=1

Both sides compose the same ``sora-train`` config (``experiment=quickstart/dit`` with random frozen
VAEs unless overridden; extra overrides after ``--``):

* **bare**: the data module and the model built from that config; ``warmup + steps`` batches
  pre-loaded from the train loader (then transferred and normalised as the trainer does); per
  step ``training_step`` (its ``self.log`` calls made no-ops), ``backward``, the config's gradient
  clipping, the module's optimizer (``configure_optimizers``: AdamW, or Muon + AdamW in the quickstart) and
  its schedule, ``zero_grad``; nothing else.
* **sora-train**: the real CLI in a subprocess with ``trainer.max_steps = warmup + steps``,
  validation and periodic checkpoints outside the window, and a :class:`StepClock` callback that
  stamps the wall clock at every ``on_train_batch_end``: the intervals hold everything between two
  steps (data loading and workers, host syncs, callbacks, logging, EMA, guards).

Steady state: the median interval after ``warmup`` steps. The two sides alternate for ``--rounds``
rounds (bare, sora-train, bare, ...; the bare loop keeps its module and batches), so that a slow
minute of the machine falls on both: overhead = the median over rounds of sora-train / bare - 1
(target <= 10 % at the quickstart DiT size on CPU). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from sora.cli.overrides import CONFIGS

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null"]


class StepClock(Callback):
    """``time.perf_counter()`` at every train batch end, written to ``path`` at fit end."""

    def __init__(self, path: str):
        self.path, self.stamps = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        Path(self.path).write_text(json.dumps(self.stamps))


def steady(intervals: list[float], warmup: int) -> dict:
    kept = intervals[warmup:]
    return {"median_s": statistics.median(kept), "mean_s": statistics.fmean(kept), "steps": len(kept),
            "first_s": intervals[0]}


class Bare:
    """The module, its optimizer and ``warmup + steps`` pre-loaded batches; :meth:`run` times one pass."""

    def __init__(self, overrides: list[str], warmup: int, steps: int):
        import torch
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        with initialize_config_dir(CONFIGS, version_base="1.3"):
            self.cfg = cfg = compose("train", overrides=overrides)
        torch.manual_seed(cfg.seed)
        datamodule, self.module = instantiate(cfg.data), instantiate(cfg.model)
        self.module.log = self.module.log_dict = lambda *args, **kwargs: None  # nothing of Lightning's in the loop
        self.module.configure_model()
        self.batches, self.warmup = [], warmup
        for batch in datamodule.train_dataloader():  # pre-loaded: no data work in the timed loop
            self.batches.append(datamodule.on_after_batch_transfer(batch, 0))
            if len(self.batches) == warmup + steps:
                break
        optim = self.module.configure_optimizers()
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]

    def run(self) -> dict:
        import torch

        module, clip = self.module, self.cfg.trainer.get("gradient_clip_val")
        module.train()
        stamps = [time.perf_counter()]
        for i, batch in enumerate(self.batches):
            loss = module.training_step(batch, i)
            loss.backward()
            if clip:  # the trainer's clipping: part of the recipe, not overhead
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
        return steady([b - a for a, b in zip(stamps, stamps[1:])], self.warmup)


def sora_train(overrides: list[str], warmup: int, steps: int) -> dict:
    total = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        clock = Path(tmp) / "stamps.json"
        args = [sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={tmp}/run", *overrides,
                f"trainer.max_steps={total}", f"trainer.val_check_interval={total}", "trainer.limit_val_batches=1",
                f"callbacks.model_checkpoint.every_n_train_steps={total}", "callbacks.samples=null",
                "trainer.enable_progress_bar=false", "+callbacks.bench_clock._target_=bench_overhead.StepClock",
                f"+callbacks.bench_clock.path={clock}"]
        env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.pathsep.join([str(REPO / "tools"), str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench_overhead: sora-train failed:\n{proc.stderr[-3000:]}")
        stamps = json.loads(clock.read_text())
    return steady([b - a for a, b in zip(stamps, stamps[1:])], warmup - 1)  # intervals start after step 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--warmup", type=int, default=10, help="steps before timing")
    ap.add_argument("--rounds", type=int, default=3, help="bare / sora-train pairs, alternating")
    ap.add_argument("overrides", nargs="*", help="sora-train overrides (after --), on top of the quickstart DiT")
    args = ap.parse_args(argv)
    overrides = DEFAULT + list(args.overrides)
    bare = Bare(overrides, args.warmup, args.steps)
    rounds = []
    for _ in range(args.rounds):
        b = bare.run()
        s = sora_train(overrides, args.warmup, args.steps)
        rounds.append({"bare": b, "sora_train": s, "overhead": s["median_s"] / b["median_s"] - 1})
    result = {"overrides": overrides, "rounds": rounds,
              "overhead": statistics.median(r["overhead"] for r in rounds),
              "overhead_range": [min(r["overhead"] for r in rounds), max(r["overhead"] for r in rounds)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
