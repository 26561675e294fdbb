"""Checkpoints: atomic writes (a full disk leaves the previous one intact), truncated or corrupt ones
named in one line, ``ckpt_path=last`` falling back to the newest intact one, and every loader we own
refusing a checkpoint whose pickle would run code. Ends with a tiny real training run resumed from
its checkpoints with ``weights_only=True`` after its ``last.ckpt`` was truncated."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import pickle
import re
import shutil
import zipfile

import lightning as L
import pytest
import torch

from sora.cli.train import resolve_ckpt
from sora.checkpoints import io as checkpoint_io
from sora.checkpoints.io import CheckpointError, atomic_folder, check_dcp_metadata, problem, safe_loading
from sora.training.strategies import AtomicCheckpointIO, use_atomic_checkpoints
from tests.conftest import SMALL_DIT

DIT = {"model": {"_target_": "sora.training.dit.DiTModule"}}


def small(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64,), float(step))}, "sora_config": DIT}


def one_line(text: str) -> str:
    assert "\n" not in text.strip(), text
    return text


class Payload:
    """Unpickling it runs code: it creates the file ``marker``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class FullDisk:
    """A file on a disk that fills up: the first ``room`` bytes are written, then ENOSPC."""

    def __init__(self, f, room: int = 1000):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.f.write(bytes(data)[:self.room])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(folder: pathlib.Path, max_steps: int, ckpt_path=None) -> None:
    """``Tiny`` with sora-train's checkpointing: ``step=N.ckpt`` at every step and ``last.ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(folder, "step={step}", auto_insert_metric_name=False, save_top_k=-1,
                                                   every_n_train_steps=1, save_last=True)])
    use_atomic_checkpoints(trainer.strategy)  # what sora-train does with the trainer it builds
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(Tiny(), ckpt_path=ckpt_path, weights_only=True)


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    fit(folder, max_steps=1)
    last = folder / "last.ckpt"
    before = last.read_bytes()
    monkeypatch.setattr(checkpoint_io, "open", lambda p, mode="r": FullDisk(open(p, mode)), raising=False)
    with pytest.raises(CheckpointError) as failed:  # the step-2 save runs out of space
        fit(folder, max_steps=2, ckpt_path=last)
    message = one_line(str(failed.value))
    assert message.startswith(str(folder / "step=2.ckpt")) and "No space left on device" in message
    assert last.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=1.ckpt"]

    monkeypatch.undo()
    io = AtomicCheckpointIO()
    io.save_checkpoint(small(1), last)
    before = last.read_bytes()
    monkeypatch.setattr(checkpoint_io, "open", lambda p, mode="r": FullDisk(open(p, mode)), raising=False)
    with pytest.raises(CheckpointError, match="previous last.ckpt is intact"):  # over an existing checkpoint
        io.save_checkpoint(small(2), last)
    assert last.read_bytes() == before and not list(folder.glob("*.tmp"))


class Ranks:
    """The strategy calls :func:`atomic_folder` makes, for one process."""

    is_global_zero = True

    def barrier(self, name=None) -> None:
        pass


def test_a_folder_checkpoint_is_swapped_in_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    path.mkdir()
    (path / "shard").write_text("old")
    with atomic_folder(Ranks(), path) as tmp:
        tmp.mkdir()
        (tmp / "shard").write_text("new")
        assert (path / "shard").read_text() == "old"  # untouched while the new one is written
    assert (path / "shard").read_text() == "new" and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(CheckpointError) as failed:
        with atomic_folder(Ranks(), path) as tmp:
            tmp.mkdir()
            (tmp / "shard").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "No space left on device" in one_line(str(failed.value)) and str(path) in str(failed.value)
    assert (path / "shard").read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


def damaged(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A truncated checkpoint and one with a flipped byte in its tensor data."""
    good = tmp_path / "good.ckpt"
    torch.save(small(1), good)
    data = bytearray(good.read_bytes())
    truncated, corrupt = tmp_path / "truncated.ckpt", tmp_path / "corrupt.ckpt"
    truncated.write_bytes(data[:len(data) // 2])
    with zipfile.ZipFile(good) as z:
        member = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    header = data[member.header_offset:member.header_offset + 30]
    start = member.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    data[start + 10] ^= 0xFF
    corrupt.write_bytes(data)
    return truncated, corrupt


def test_a_truncated_or_corrupt_checkpoint_is_named_in_one_line(tmp_path):
    truncated, corrupt = damaged(tmp_path)
    assert "truncated" in problem(truncated) and "CRC" in problem(corrupt)
    assert problem(tmp_path / "good.ckpt") is None
    with pytest.raises(CheckpointError, match="truncated") as failed:
        AtomicCheckpointIO().load_checkpoint(truncated)
    assert one_line(str(failed.value)).startswith(f"{truncated}: ")
    for path, what in ((truncated, "truncated"), (corrupt, "fails its CRC check")):
        with pytest.raises(SystemExit) as failed:  # sora-train, before building anything
            resolve_ckpt(str(path), tmp_path)
        message = one_line(str(failed.value))
        assert message.startswith(f"sora-train: error in ckpt_path={path}: ") and what in message


def test_last_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    assert resolve_ckpt("auto", tmp_path) is None  # auto: a first start (a SLURM job that may be requeued)
    with pytest.raises(SystemExit, match="no checkpoint at"):
        resolve_ckpt("last", tmp_path)
    folder.mkdir()
    for step in (1, 2, 3):
        torch.save(small(step), folder / f"step={step}.ckpt")
    shutil.copy(folder / "step=3.ckpt", folder / "last.ckpt")
    assert resolve_ckpt("last", tmp_path) == resolve_ckpt("auto", tmp_path) == str(folder / "last.ckpt")
    for name in ("last.ckpt", "step=3.ckpt"):  # a crash while writing them
        (folder / name).write_bytes((folder / name).read_bytes()[:500])
    (folder / "step=4.ckpt.tmp").write_bytes(b"an interrupted write")
    with caplog.at_level(logging.WARNING, logger="sora.checkpoints.io"):
        assert resolve_ckpt("last", tmp_path) == str(folder / "step=2.ckpt")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 2 and "last.ckpt: truncated" in skipped[0] and "step=3.ckpt: truncated" in skipped[1]
    for step in (1, 2):
        (folder / f"step={step}.ckpt").write_bytes(b"junk")
    with pytest.raises(SystemExit) as failed:
        resolve_ckpt("last", tmp_path)
    assert "no intact checkpoint" in one_line(str(failed.value))


def test_a_checkpoint_with_pickled_code_is_refused_by_every_loader(tmp_path):
    from sora.cli.eval import load_checkpoint as eval_load
    from sora.cli.sample import read_checkpoint as sample_load
    from sora.checkpoints.export import stage_weights
    from sora.checkpoints.export import ExportError, read_training_checkpoint
    from tools.export_checkpoint import main as export_main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({**small(1), "payload": Payload(marker)}, evil)
    live = tmp_path / "live.ckpt"  # the same payload, loaded the unsafe way: it does run
    torch.save({"payload": Payload(tmp_path / "ran")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "ran").exists()

    refused = re.escape("refused to load: it holds pickled objects other than tensors and plain data (") + ".*pathlib"
    with pytest.raises(CheckpointError, match=refused):  # resume: Lightning through sora-train's CheckpointIO
        trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)
        use_atomic_checkpoints(trainer.strategy)
        trainer.fit(Tiny(), ckpt_path=evil, weights_only=True)
    with pytest.raises(CheckpointError, match=refused):  # DeepSpeed's own torch.load(weights_only=False) calls
        with safe_loading(evil):
            torch.load(evil, weights_only=False)
    for load in (sample_load, eval_load):
        with pytest.raises(SystemExit, match=refused):
            load(str(evil))
    with pytest.raises(ExportError, match=refused):
        read_training_checkpoint(evil)
    with pytest.raises(SystemExit, match=refused):
        export_main([str(evil), str(tmp_path / "out.safetensors")])
    with pytest.raises(ExportError, match=refused):  # the DiT stage's frozen VAE weights
        stage_weights(str(evil), "dit.")

    dcp = tmp_path / "dcp.ckpt"  # FSDP2's distributed checkpoint: torch reads .metadata with pickle.load
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="refused to load its .metadata"):
        check_dcp_metadata(dcp)
    with pytest.raises(ExportError, match="refused"):
        read_training_checkpoint(dcp)
    with pytest.raises(SystemExit, match="refused"):
        resolve_ckpt(str(dcp), tmp_path)
    assert not marker.exists()


def run_train(run_dir: pathlib.Path, *overrides: str) -> dict:
    """``sora-train`` in this process: Hydra's config for ``run_dir``, then :func:`sora.cli.train.train`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sora.cli.train import CONFIGS, train

    tiny = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null", *SMALL_DIT,
            "data.num_workers=0", "data.train.batch_size=2", "trainer.val_check_interval=1000",
            "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.samples=null",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]  # as Hydra hands it to the task function
    return train(cfg)


def test_a_real_checkpoint_loads_weights_only_and_resumes_past_a_truncated_last(tmp_path, caplog):
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=2")
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]  # no .tmp
    ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and {"EMA", "RNGState"} <= {k.split("{")[0] for k in ckpt["callbacks"]}

    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:4096])  # killed while writing it
    with caplog.at_level(logging.WARNING, logger="sora.checkpoints.io"):
        run_train(run, "trainer.max_steps=3", "ckpt_path=last")
    assert any("skipping checkpoint" in r.getMessage() and "last.ckpt" in r.getMessage() for r in caplog.records)
    resumed = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 3 and resumed["callbacks"]["EMA"]["num_updates"] == 3
