"""Reliability callbacks (sora.training.guards): a preemption signal saves a checkpoint at the next batch end
and stops cleanly (SLURM: and requeues after the save); a non-finite step is skipped exactly, and a run of
them stops with a checkpoint of the last good weights and a message naming the step and the loss term."""

from __future__ import annotations

import copy
import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sora.training.guards import NonFiniteGuard, NonFiniteStop, Preemption

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


class TwoBranch(L.LightningModule):
    """A video and an audio branch; the audio input is NaN at ``nan_steps``; sends ``signum`` to itself at
    ``signal_step``. Constant data: a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, nan_steps=(), signal_step=None, signum=signal.SIGUSR1, fused=False):
        super().__init__()
        self.fused = fused
        torch.manual_seed(0)
        self.video, self.audio = nn.Linear(4, 4), nn.Linear(4, 4)
        self.nan_steps, self.signal_step, self.signum = set(nan_steps), signal_step, signum

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if self.global_step == self.signal_step:
            os.kill(os.getpid(), self.signum)
        xa = x * float("nan") if self.global_step in self.nan_steps else x
        losses = {"loss_video": (self.video(x) - 1).pow(2).mean(), "loss_audio": (self.audio(xa) + 1).pow(2).mean()}
        self.log_dict({f"train/{k}": v for k, v in losses.items()})
        return losses["loss_video"] + losses["loss_audio"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused)

    @staticmethod
    def data():
        return DataLoader(TensorDataset(torch.ones(256, 4)), batch_size=4)


class Snapshots(Callback):
    """Weights and AdamW state after each optimizer step."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.after.append((copy.deepcopy(pl_module.state_dict()), copy.deepcopy(opt.state_dict()["state"])))


class Counter(Callback):
    """Counts batch ends in its checkpointed state (as the EMA and data-health callbacks update theirs)."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# fused AdamW skips on the guard's device flag (no host sync), read at the logger's steps; the default one is skipped
# by dropping its gradients after a host read at every step
PATHS = pytest.mark.parametrize("fused", [False, True], ids=["host", "device"])


@PATHS
def test_nonfinite_step_is_skipped_exactly(tmp_path, caplog, fused):
    snaps, guard = Snapshots(), NonFiniteGuard(max_consecutive=3)
    model = TwoBranch(nan_steps={2}, fused=fused)
    trainer = L.Trainer(max_steps=4, callbacks=[guard, snaps], default_root_dir=tmp_path, enable_checkpointing=False,
                        log_every_n_steps=1, **QUIET)
    with caplog.at_level(logging.WARNING, logger="sora.training.guards"):
        trainer.fit(model, TwoBranch.data())
    s = snaps.after
    assert s[1][1][0]["step"] == 2  # AdamW had stepped twice before the NaN step
    assert _same(s[2], s[1])  # weights, exp_avg, exp_avg_sq and step counts untouched by the skipped step
    assert not _same(s[3][0], s[2][0]) and float(s[3][1][0]["step"]) == 3  # the next step trains normally
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1
    assert "step 2: non-finite train/loss_audio; first non-finite gradient: audio.weight; step skipped" in caplog.text


def test_fused_nonfinite_steps_are_reported_at_the_logging_steps(tmp_path, caplog):
    snaps, guard = Snapshots(), NonFiniteGuard(max_consecutive=3)
    trainer = L.Trainer(max_steps=7, callbacks=[guard, snaps], default_root_dir=tmp_path, enable_checkpointing=False,
                        log_every_n_steps=4, **QUIET)
    with caplog.at_level(logging.WARNING, logger="sora.training.guards"):
        trainer.fit(TwoBranch(nan_steps={1, 2, 5}, fused=True), TwoBranch.data())
    s = snaps.after
    assert _same(s[2], s[0]) and _same(s[5], s[4]) and not _same(s[3][0], s[2][0])  # skipped on the device flag
    lines = [r.getMessage() for r in caplog.records if r.name == "sora.training.guards"]
    assert lines[0].startswith("sora-train: steps 0-3: 2 non-finite steps skipped (2 in all); the last, step 2: "
                               "non-finite train/loss_audio; first non-finite gradient: audio.weight"), lines
    assert lines[1].startswith("sora-train: steps 4-6: 1 non-finite step skipped (3 in all); the last, step 5"), lines
    assert len(lines) == 2 and guard.skipped == 3 and guard.in_a_row == 0


@PATHS
def test_nonfinite_steps_in_a_row_stop_with_the_last_good_weights(tmp_path, fused):
    snaps = Snapshots()
    model = TwoBranch(nan_steps={1, 3, 4, 5}, fused=fused)  # a good step 2 resets the count: the third in a row is step 5
    every = 4 if fused else 50  # the device path reads its counters at the logger's steps: 4, 8, ...
    trainer = L.Trainer(max_steps=20, callbacks=[NonFiniteGuard(max_consecutive=3), snaps], default_root_dir=tmp_path,
                        enable_checkpointing=False, log_every_n_steps=every, **QUIET)
    with pytest.raises(NonFiniteStop) as e:
        trainer.fit(model, TwoBranch.data())
    stop = 8 if fused else 6  # the device path goes on to the next logging step, with steps 6 and 7 good
    path = tmp_path / "checkpoints" / f"nonfinite-step={stop}.ckpt"
    message = str(e.value)
    assert isinstance(e.value, SystemExit) and message.startswith("sora-train: error in training: step 5: ")
    for part in ("non-finite train/loss_audio", "first non-finite gradient: audio.weight", "3 steps in a row",
                 "4 skipped in all", str(path), "model.lr"):
        assert part in message, part
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == stop
    assert _same(ckpt["state_dict"], snaps.after[stop - 1 if fused else 2][0])  # good weights (fused: steps 6, 7's)
    assert _same(snaps.after[5][0], snaps.after[2][0])  # steps 3-5 were skipped either way
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 4, "in_a_row": 0 if fused else 3}


def test_slurm_requeue_signal_saves_then_requeues_and_resumes_exactly(tmp_path, monkeypatch):
    """A real SIGUSR1 to this process under (faked) SLURM: last.ckpt at the end of that step, then
    ``scontrol requeue <job id>`` (a fake that records its arguments and the checkpoint folder)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    bin_dir, record, ckpts = tmp_path / "bin", tmp_path / "scontrol.txt", tmp_path / "checkpoints"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\nls {ckpts} >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for k, v in dict(SLURM_NTASKS="1", SLURM_JOB_ID="4242", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                     SLURM_JOB_NAME="sora").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    def fit(max_steps, signal_step=None, ckpt_path=None):
        model = TwoBranch(signal_step=signal_step)
        mc = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=1000, save_last=True)
        trainer = L.Trainer(max_steps=max_steps, callbacks=[Preemption(), Counter(), mc], default_root_dir=tmp_path, **QUIET)
        trainer.fit(model, TwoBranch.data(), ckpt_path=ckpt_path)
        return trainer, model

    trainer, _ = fit(50, signal_step=2)
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert trainer.global_step == 3  # stopped at the end of the step during which the signal came
    assert record.read_text().split() == ["requeue", "4242", "last.ckpt"]  # requeued after the save
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["callbacks"]["Counter"]["batches"] == 3  # saved after the other callbacks' updates of that batch
    assert not list(tmp_path.rglob("hpc_ckpt_*"))  # Lightning's own handler (a save mid-step) did not run
    resumed, model = fit(5, ckpt_path=str(ckpts / "last.ckpt"))
    assert resumed.global_step == 5
    _, straight = fit(5)
    assert _same(model.state_dict(), straight.state_dict())  # weights and optimizer went on exactly


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_sigterm_to_sora_train_saves_last_ckpt_and_exits_cleanly(tmp_path):
    """The real CLI: SIGTERM after a few steps -> checkpoints/last.ckpt of the step it stopped at, exit code 0.
    The signal goes to every process of the run, its loader workers too, as SLURM and ``pkill`` send it."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sora.cli.train", f"hydra.run.dir={run}", "experiment=quickstart/video_vae",
            "data.num_workers=2", "trainer.max_steps=100000", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the run and its workers
    try:
        deadline = time.monotonic() + 240
        while len(_rows(run / "csv" / "version_0" / "metrics.csv")) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training steps"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert step >= 2
    assert f"sora-train: SIGTERM at step {step}: saved {run / 'checkpoints' / 'last.ckpt'}; stopping" in out
    assert f"sora-train: step {step} in" in out  # the run ended through its normal path
    # a consistent state to resume from (ckpt_path=last): data stream, EMA and schedule all at that step
    rank = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"][0]
    assert sum(w["dataset_state"]["batches"] for w in rank["_snapshot"]["_worker_snapshots"].values()) == step
    assert ckpt["callbacks"]["EMA"]["num_updates"] == step
    assert ckpt["lr_schedulers"][0]["last_epoch"] == step


def test_last_ckpt_ends_at_the_last_step_when_max_steps_is_off_the_period(tmp_path):
    from sora.training.callbacks import Checkpoint

    for cls, expected in ((ModelCheckpoint, 2), (Checkpoint, 3)):  # Lightning's keeps the periodic step's
        folder = tmp_path / cls.__name__
        mc = cls(dirpath=folder, filename="step={step}", every_n_train_steps=2, save_top_k=-1, save_last=True)
        L.Trainer(max_steps=3, callbacks=[mc], **QUIET).fit(TwoBranch(), TwoBranch.data())
        assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == expected, cls
