"""The dry run's memory prediction against real training steps on CPU, for one config, frame size and batch.

    python tools/check_dry_run.py --size 128x128 --batch 4 experiment=quickstart/dit model.dit.dim=512

Prediction: :func:`sora.training.dry_run.simulate_step` on fake tensors (what ``sora-train ...
dry_run=true`` prints). Measurement, in a fresh process: three real Lightning training steps of the
same config (its precision, gradient clipping, EMA callback; no checkpointing, no logger) on
random clips of that size, peak resident memory (``VmHWM``) less the resident memory before the
model and the batch are made, as ``tools/bench_dit.py`` measures; ``file_gib`` is the part of it
that is file-backed (code pages of the kernels run first), not data; ``step_cpu_s`` the CPU time
of a step after the first (all threads: less sensitive to other load than wall time).

The dry run predicts the peak of the tensors a step holds (on CUDA: ``max_memory_allocated``). On
CPU the measuring process therefore runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc gives every
block of 128 KiB or more back when it is freed, so the resident peak is the tensors' peak. With
glibc's defaults (``--glibc-default``) freed heap stays resident and fragments, and activation-heavy
steps peak up to a third higher; training does not change the allocator, because returning blocks
costs about 1.5x the CPU time per step (experiments/benchmarks/README.md).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from sora.cli.overrides import CONFIGS
from sora.training.dry_run import GIB, clip_batch, model_config, plan_of, quiet, simulate_step, simulation


def rss_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def measure(cfg, size: tuple[int, int], batch: int, steps: int = 3) -> dict:
    """Peak memory (GiB) of ``steps`` real Lightning training steps on CPU (call in a fresh process), and
    the CPU seconds (all threads) of each step after the first."""
    import lightning as L
    from hydra.utils import instantiate

    cpu_s = []

    class StepTime(L.Callback):
        def on_train_batch_start(self, *args):
            self.t0 = time.process_time()

        def on_train_batch_end(self, *args):
            cpu_s.append(time.process_time() - self.t0)

    plan, timeline = plan_of(cfg), instantiate(cfg.timeline)
    with quiet():
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=plan.precision, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[StepTime()] + ([plan.ema()] if plan.ema else []), gradient_clip_val=plan.gradient_clip_val,
                            limit_val_batches=0, num_sanity_val_steps=0)
    before, file_before = rss_kb("VmRSS"), rss_kb("RssFile")
    module = instantiate(model_config(cfg))
    batches = [clip_batch(timeline, *size, batch)] * steps
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return {"measured_gib": (rss_kb("VmHWM") - before) / 2 ** 20,
            "file_gib": (rss_kb("RssFile") - file_before) / 2 ** 20, "step_cpu_s": sum(cpu_s[1:]) / (steps - 1)}


def predict(cfg, size: tuple[int, int], batch: int) -> dict:
    """The dry run's prediction (GiB) and its breakdown at the peak."""
    from hydra.utils import instantiate

    plan = plan_of(cfg)
    with simulation(lambda: instantiate(model_config(cfg)), plan) as (module, tracker):
        out = simulate_step(module, clip_batch(instantiate(cfg.timeline), *size, batch), plan, tracker)
    return {"predicted_gib": out["peak"] / GIB, "at_peak_gib": {k: v / GIB for k, v in out["at_peak"].items() if v}}


def main(argv=None) -> dict:
    from hydra import compose, initialize_config_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, help="HxW frames, e.g. 128x128")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--glibc-default", action="store_true",
                    help="measure with glibc's default malloc (it keeps freed heap resident: a higher peak)")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    ap.add_argument("overrides", nargs="*", help="sora-train overrides, e.g. experiment=quickstart/dit")
    args = ap.parse_args(argv)
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    if args.measure_only:
        out = measure(cfg, size, args.batch)
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure-only", *(sys.argv[1:] if argv is None else argv)]
        env = dict(os.environ) if args.glibc_default else dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out = {"overrides": args.overrides, "size": list(size), "batch": args.batch, **predict(cfg, size, args.batch),
               **json.loads(run.stdout.splitlines()[-1]), "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
        out["error"] = out["predicted_gib"] / out["measured_gib"] - 1
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
