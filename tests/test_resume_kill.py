"""Exact resume after ``kill -9`` and determinism, on the real CLI in subprocesses.

One uninterrupted run of 6 steps (validation and a checkpoint every 2) is the reference. A second
run of the same command is killed with SIGKILL as soon as it has ended step 4 (while the step-4
checkpoint may be half written) and restarted with ``ckpt_path=last``. Its steps before the kill
must equal the reference's (same seed, same config, same machine: same losses and samples), and
so must every step after the restart: the losses and sample keys of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import once

REPO = Path(__file__).resolve().parents[1]
ARGS = ["experiment=quickstart/video_vae", "trainer.max_steps=6", "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "data.num_workers=2",
        "+callbacks.record._target_=tests.helpers.StepRecorder"]
ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")


def command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={run}", *ARGS,
            f"+callbacks.record.path={run / 'steps.jsonl'}", *extra]


def records(run: Path) -> list[dict]:
    """The complete lines: the recorder creates the file, then writes to it, so a poll (or a kill)
    may find it empty or its last line half written."""
    path = run / "steps.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def last_step(run: Path) -> int:
    rows = records(run)
    return rows[-1]["step"] if rows else 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A reference run and one killed at step 4 then resumed: their records (made once per session, shared by
    pytest-xdist's workers)."""
    return once(tmp_path_factory, "resume-kill", make_runs)[1]


def make_runs(root: Path) -> tuple[list, list, list]:
    reference, killed = root / "reference", root / "killed"
    ref = subprocess.Popen(command(reference), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed.mkdir(parents=True)
    proc = subprocess.Popen(command(killed), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while last_step(killed) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 4"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records(killed)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err.decode()[-3000:]
    restart = subprocess.run(command(killed, "ckpt_path=last"), cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    return records(reference), before, records(killed)[len(before):]


def test_same_seed_and_config_give_the_same_losses(runs):
    reference, before_kill, _ = runs
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    assert before_kill == reference[:len(before_kill)]  # bit-equal losses and the same samples


def test_run_killed_with_sigkill_resumes_exactly(runs):
    reference, before_kill, resumed = runs
    assert before_kill[-1]["step"] >= 4 and resumed
    start = resumed[0]["step"] - 1  # the checkpoint it resumed from: step 4, or 2 if 4 was half written
    assert start in (2, 4), resumed
    assert resumed == reference[start:]  # the same losses and sample keys from there on
