"""Shared fixtures: one tiny `sora-demo` run per session, whose checkpoints several test files use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


PROMPTS = ["a red ball bounces", "two balls, a blue one"]
# the quickstart DiT at the size the contract tests were written for (1 s at 8 fps, width 64, depth 2): ~4x cheaper
SMALL_DIT = ["timeline.seconds=1", "timeline.fps=8", "model.dit.dim=64", "model.dit.depth=2"]


def once(tmp_path_factory, name: str, make) -> tuple[Path, object]:
    """``make(folder)`` once per test session, shared by pytest-xdist's workers (a file lock: the first worker
    to ask makes it, the others wait and reuse it): ``(folder, what make returned)``, which must be JSON.
    Tests only read the folder. Without xdist the folder is this session's own."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt that failed
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`sora-demo` at a tiny size (3 steps per stage); tests/test_eval_cli.py evaluates its checkpoints."""

    def make(run: Path) -> dict:
        proc = run_cli("-m", "sora.cli.demo", f"run_dir={run}", "world.clips=8", "world.seconds=2",
                       "timeline.seconds=1", "data.train.batch_size=2", "preview_batches=2", "steps=3",
                       'train_overrides=["data.num_workers=0","trainer.log_every_n_steps=1"]',
                       'stages.dit.overrides=["data.train.clips=16","callbacks.samples.every_n_steps=100000"]',
                       "sample.prompts=[" + ",".join(f'"{p}"' for p in PROMPTS) + "]", "sample.seconds=1",
                       "sample.steps=2", "eval.clips=8", "eval.num_samples=3", "eval.steps=2", "eval.i3d_weights=null")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    run, proc = once(tmp_path_factory, "quickstart-demo", make)
    return run, subprocess.CompletedProcess(**proc)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests (tests/test_cuda.py, tools/gpu_check.sh) skip on machines without a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
