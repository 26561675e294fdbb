"""Launching DDP jobs from a Hydra multirun: one process per rank, started by the sweep's launcher.

Lightning's own launcher starts extra ranks by re-running the command; under ``-m`` that re-runs the
whole sweep in every rank (lightning-hydra-template #393). sora-train refuses that combination, and
``hydra/launcher=local`` (submitit's local executor, the same path as ``hydra/launcher=slurm``) runs
each job's ranks as submitit tasks. Everything runs in subprocesses, from an empty working directory
so that a stray Hydra run (a duplicated sweep dir under ./outputs) would show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import SMALL_DIT

TINY = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null", *SMALL_DIT,
        "model.dit.dim=32", "model.dit.depth=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "data.num_workers=0", "data.train.batch_size=2", "data.val.batch_size=2",
        "callbacks.samples=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]


def sora_train(cwd: Path, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`sora-train ARGS` in its own process group, killed whole (submitit's tasks too) if it hangs."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "sora.cli.train", *args, *TINY], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"sora-train hung for {timeout} s: {args}\n{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_multirun_ddp_without_a_launcher_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    proc = sora_train(tmp_path, "-m", f"hydra.sweep.dir={sweep}", "model.lr=1e-3,5e-4", *DDP, timeout=120)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("sora-train: error in trainer: a multirun (-m) job with 2 processes"), proc.stderr[-2000:]
    assert "hydra/launcher=local" in message and "hydra/launcher=slurm" in message
    assert run_dirs(sweep) == ["0"]  # stopped at the first job, before any training
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("train_ddp_process_*.log"))
    assert not (tmp_path / "outputs").exists()  # no re-spawned sweep of its own


def test_slurm_launcher_submits_one_task_per_gpu(tmp_path):
    """hydra/launcher=slurm up to the scheduler: submitit writes the sbatch script and calls `sbatch`
    (here a stand-in that keeps the script and refuses the job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit's check that this is a SLURM host
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script, sweep = tmp_path / "job.sbatch", tmp_path / "sweep"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_COPY": str(script)}
    proc = sora_train(tmp_path, "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
                      "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30", "trainer.accelerator=gpu",
                      "trainer.num_nodes=4", "trainer.devices=8", "trainer.strategy=ddp", env=env, timeout=120)
    assert proc.returncode != 0 and "sbatch: no cluster here" in proc.stderr, proc.stderr[-2000:]
    lines = script.read_text().splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--partition=gpu",
                 "--time=30"):
        assert f"#SBATCH {flag}" in lines, lines
    srun = next(line for line in lines if line.startswith("srun "))  # each task runs the job once, under srun
    assert f"{sweep}/.submitit/" in srun and srun.endswith(f"-m submitit.core._submit {sweep}/.submitit/%j")


def test_submitit_local_multirun_runs_each_rank_once(tmp_path):
    """2 jobs x 2 ranks (DDP, gloo): each job gets one run dir with one checkpoint, one log, its own lr."""
    sweep = tmp_path / "sweep"
    proc = sora_train(tmp_path, "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}",
                      "hydra.launcher.timeout_min=4", "model.lr=1e-3,5e-4", *DDP)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no second sweep dir, no ./outputs
    assert run_dirs(sweep) == ["0", "1"]
    for job, lr in (("0", 1e-3), ("1", 5e-4)):
        run = sweep / job
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2
        assert ckpt["sora_config"]["model"]["lr"] == lr and ckpt["sora_config"]["trainer"]["devices"] == 2
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
        assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]  # one run, logged by rank 0 only
        assert not list(run.glob("train_ddp_process_*.log"))  # Lightning never re-ran the Hydra command
        assert (run / "metrics.json").is_file()

    # one process per rank, started by submitit: each job's task k was rank k of a 2-process group
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2
    for job in jobs:
        for task in (0, 1):
            log = "".join(p.read_text() for p in job.glob(f"{job.name}_{task}_log.*"))
            assert f"global_rank={task}(2)" in log, log[-2000:]  # submitit's job environment
            assert f"GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in log, log[-2000:]  # Lightning's process group
            assert "sora-train: step 2" in log
    assert "| 1 |" in (sweep / "summary.md").read_text()
