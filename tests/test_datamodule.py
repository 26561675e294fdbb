"""The data configs instantiate, and Lightning checkpoints carry the stream's exact position."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from sora.cli.overrides import CONFIGS
from sora.data.datamodule import AVDataModule
from sora.data.streams import ShardClipStream, WorldClipStream

from helpers import KeyRecorder



def _compose(overrides):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("demo", overrides=overrides)


def test_data_configs_instantiate():
    cfg = _compose(["data=world", "~data.train.urls", "timeline.seconds=1", "data.num_workers=0", "data.train.clips=4"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, AVDataModule) and isinstance(dm.train_stream, WorldClipStream)
    batch = next(iter(dm.train_dataloader()))
    assert batch.video.shape == (4, 3, 25, 64, 64) and batch.audio.shape == (4, 1, 16000)
    cfg = _compose(["data=shards", "data.train.urls=/nonexistent/shard-*.tar"])
    with pytest.raises(Exception, match="matched no shards"):  # hydra wraps it, naming data.train
        instantiate(cfg.data)


def _fit(tmp: Path, max_steps: int, ckpt_path=None, every=None):
    dm = AVDataModule(train=WorldClipStream({"width": 32, "height": 32, "seconds": 1.0}, _timeline(), batch_size=2,
                                            clips=12, seed=5), num_workers=2)
    model = KeyRecorder()
    callbacks = [ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def _timeline():
    from sora.timeline import Timeline

    return Timeline(seconds=1.0, fps=24, sample_rate=16000)


def test_lightning_checkpoint_resumes_the_stream_exactly(tmp_path):
    # 12 clips / 2 workers / 2 per batch = 6 batches an epoch: 9 steps cross an epoch boundary
    full = _fit(tmp_path / "a", max_steps=9, every=4)
    ckpts = sorted((tmp_path / "a").glob("*step=4*.ckpt"))
    assert ckpts, os.listdir(tmp_path / "a")
    state = torch.load(ckpts[0], weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["world_size"] == 1 and len(state[0]["ranks"]) == 1
    resumed = _fit(tmp_path / "b", max_steps=9, ckpt_path=ckpts[0])
    assert resumed == full[4:]
    assert len({k for b in full[:6] for k in b}) == 12  # one epoch sees every clip once


def test_shard_stream_in_the_datamodule_rejects_bad_size():
    with pytest.raises(ValueError, match="exactly one of size"):
        ShardClipStream("x.tar", _timeline(), batch_size=2)


def test_a_checkpoint_from_another_world_size_reshards_the_stream(caplog):
    """2 ranks that consumed 1 batch each -> 1 rank: it goes on after 2 batches of the epoch."""
    from sora.data.datamodule import RankedLoader

    def loader():
        return RankedLoader(WorldClipStream({"width": 32, "height": 32, "seconds": 1.0}, _timeline(), batch_size=2,
                                            clips=8), batch_size=None)

    one = loader()
    batches = iter(one)
    keys = [next(batches).keys for _ in range(3)]
    one.consumed(1)
    saved = one.state_dict()
    assert saved["world_size"] == 1 and len(saved["ranks"]) == 1
    with caplog.at_level("WARNING"):
        fresh = loader()
        fresh.load_state_dict({"world_size": 2, "ranks": saved["ranks"] * 2})
    assert "2 ranks x 1 workers, this run has 1 x 1: resharded" in caplog.text
    assert next(iter(fresh)).keys == keys[2]


def test_num_workers_auto_follows_the_cores(monkeypatch):
    from sora.data import datamodule as D

    for cores, ranks, expected in [(2, 1, 1), (1, 1, 1), (16, 1, 8), (64, 8, 7), (16, 8, 1)]:
        monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert D.auto_workers(ranks) == expected, (cores, ranks)
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert D.AVDataModule(train=None, num_workers="auto").workers() == 2  # no trainer: one rank
    assert D.AVDataModule(train=None, num_workers=3).workers() == 3
    with pytest.raises(ValueError, match="data.num_workers"):
        D.AVDataModule(train=None, num_workers="four")
