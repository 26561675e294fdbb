"""Bad data: a shard set with planted faults is read to the end; every good sample is seen once, every
fault is skipped, named in a warning and counted, the counts reach ``data/skipped``; nothing from a
shard is ever unpickled."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.data.datamodule import AVDataModule
from sora.data.streams import ShardClipStream
from sora.data.shard_reader import read_shards
from sora.data.world import WorldConfig, make_clip
from sora.media import write_av
from sora.timeline import Timeline
from sora.training.data_health import DataHealth

from helpers import KeyRecorder

TL = Timeline(seconds=1.0, fps=24, sample_rate=16000)
LOGGER = "sora.data.pipeline"


class Evil:
    """A pickle that creates a file when loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def videos() -> list[bytes]:
    out = []
    for seed in range(3):
        clip = make_clip(seed, WorldConfig(width=32, height=32, seconds=1.5, fps=24, sample_rate=16000))
        buf = io.BytesIO()
        write_av(buf, clip.frames, clip.audio, fps=24, sample_rate=16000)
        out.append(buf.getvalue())
    return out


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return path


def _header(raw: bytes, name: str) -> int:
    """Offset of a member's 512-byte tar header."""
    at = raw.index(name.encode() + b"\0")
    assert at % 512 == 0
    return at


def faulty_shards(folder: Path, videos: list[bytes]):
    """6 shards with planted faults: 10 that lose data (6 bad samples, 4 shard faults: corrupt tar data, a
    shard that vanishes, one truncated inside a member, one cut between members) and 6 harmless ones (bad
    json, pickles) whose samples are good. Returns (urls, good keys, {kind: faults}, the parts each fault's
    warning must hold, the file the pickles would create)."""
    v = videos
    meta = json.dumps({"caption": "a ball", "width": 32, "height": 32}).encode()
    marker = folder / "unpickled"
    evil = pickle.dumps(Evil(marker))
    shard = [str(folder / f"shard-{i}.tar") for i in range(6)]
    _write(Path(shard[0]), [
        {"__key__": "a0", "mp4": v[0], "json": meta},
        {"__key__": "a1", "mp4": b"not a video at all", "json": meta},              # unreadable video
        {"__key__": "a2", "mp4": b"", "json": meta},                                # empty member
        {"__key__": "a3", "mp4": v[1], "txt": random.Random(0).randbytes(64)},      # caption: binary garbage
        {"__key__": "a4", "mp4": v[2], "json": json.dumps({"caption": 123}).encode()},  # caption not a string
        {"__key__": "a5", "mp4": v[0], "json": meta, "pyd": evil},                  # a malicious pickle
        {"__key__": "a6", "mp4": v[1], "txt": b"\x00\x01\x02\x03"},                 # UTF-8, but not text
    ])
    raw = _write(folder / "b.tar", [
        {"__key__": "b0", "mp4": v[0], "json": b"{not json"},                      # json: invalid
        {"__key__": "b1", "mp4": v[1], "json": b"{}"},                              # json: fields missing
        {"__key__": "b2", "mp4": v[2], "json": b"[1, 2, 3]"},                       # json: not an object
        {"__key__": "b3", "mp4": v[0], "json": meta, "pickle": evil},               # a malicious pickle
        {"__key__": "b4", "mp4": v[1], "json": meta},                               # its json's header: garbage
        {"__key__": "b5", "mp4": v[2], "json": meta},                               # garbage in its mp4's data
        {"__key__": "b6", "mp4": v[0], "json": b'{"duration": "x", "height": -1, "width": 0, "caption": "ok"}'},
        {"__key__": "b7", "mp4": v[1]},
    ]).read_bytes()
    raw = bytearray(raw)
    at = _header(raw, "b4.json")
    raw[at:at + 1024] = b"\xab" * 1024                                              # header + data: not a tar
    at = _header(raw, "b5.mp4") + 512
    raw[at + 40:at + 1040] = random.Random(1).randbytes(1000)                       # the mp4's header atoms
    Path(shard[1]).write_bytes(raw)
    os.remove(folder / "b.tar")
    _write(Path(shard[2]), [{"__key__": f"c{i}", "mp4": v[i], "json": meta} for i in range(3)])  # will vanish
    raw = _write(folder / "d.tar", [{"__key__": f"d{i}", "mp4": v[i], "json": meta} for i in range(3)]).read_bytes()
    Path(shard[3]).write_bytes(raw[:_header(raw, "d2.mp4") + 512 + 1000])          # truncated inside d2.mp4
    os.remove(folder / "d.tar")
    _write(Path(shard[4]), [{"__key__": f"e{i}", "mp4": v[i], "json": meta} for i in range(2)])
    raw = _write(folder / "f.tar", [{"__key__": f"f{i}", "mp4": v[i]} for i in range(2)]).read_bytes()
    Path(shard[5]).write_bytes(raw[:_header(raw, "f1.mp4") + 512 + -(-len(v[1]) // 512) * 512])  # cut after f1
    os.remove(folder / "f.tar")
    good = ["a0", "a5", "b0", "b1", "b2", "b3", "b4", "b6", "b7", "d0", "d1", "e0", "e1", "f0", "f1"]
    faults = {"decode": 6, "shard": 4}
    named = [("a1", shard[0]), ("a2", shard[0]), ("a3", shard[0]), ("a4", shard[0]), ("a6", shard[0]),
             ("b5", shard[1]), ("b4.mp4", shard[1]), (shard[2],), ("d2", shard[3]), ("f1.mp4", shard[5], "truncated")]
    return shard, good, faults, named, marker


def _warned(caplog, *parts) -> bool:
    return any(all(p in r.getMessage() for p in parts) and "\n" not in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_planted_faults_are_skipped_named_and_counted(tmp_path, videos, caplog):
    urls, good, faults, named, marker = faulty_shards(tmp_path, videos)
    stream = ShardClipStream(urls, TL, batch_size=2, size=(32, 32), shuffle=False, infinite=False)
    batches = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        it = iter(stream)
        batches.append(next(it))
        os.remove(urls[2])  # a listed shard vanishes mid-epoch, before it is read
        batches.extend(it)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys))  # every good sample, once
    counted = {kind: sum(b.skipped_by.get(kind, 0) for b in batches) for kind in faults}
    assert counted == faults and sum(b.skipped for b in batches) == 10 == stream.state_dict()["skipped"]
    for parts in named:
        assert _warned(caplog, *parts), parts
    assert sum(r.getMessage().startswith("data: skipped") for r in caplog.records) == 10  # each fault once
    assert _warned(caplog, "a3", "not UTF-8") and _warned(caplog, "a4", "not text")
    assert _warned(caplog, "a6", "binary control characters")
    captions = {k: c for b in batches for k, c in zip(b.keys, b.captions)}
    assert captions["b0"] == "" and captions["b6"] == "ok" and captions["a0"] == "a ball"
    # the pickles: dropped unread, named, never unpickled
    assert _warned(caplog, urls[0], "a5.pyd", "never unpickled") and _warned(caplog, urls[1], "b3.pickle")
    assert not marker.exists()
    # the reader's samples do not even hold them: webdataset's default decoders (which unpickle) find none
    ours = [s for s in read_shards(urls[:2], lambda *a: None) if s["__key__"] in ("a5", "b3")]
    assert len(ours) == 2 and all(set(s) == {"__key__", "__url__", "mp4", "json"} for s in ours)
    [wds.autodecode.Decoder([])(s) for s in ours]
    assert not marker.exists()
    raw = next(s for s in wds.tariterators.tarfile_samples([{"url": urls[0]}]) if s["__key__"] == "a5")
    wds.autodecode.Decoder([])(raw)  # the payload does bite when a shard's pickle is decoded
    assert marker.exists()


def test_a_resumed_stream_counts_each_fault_once(tmp_path, videos, caplog):
    urls, good, faults, _, _ = faulty_shards(tmp_path, videos)
    os.remove(urls[2])

    def loader(state=None):
        dl = StatefulDataLoader(ShardClipStream(urls, TL, batch_size=2, size=(32, 32), shuffle=False,
                                                infinite=False), batch_size=None)
        if state is not None:
            dl.load_state_dict(state)
        return dl

    full = [(b.keys, b.skipped_by) for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(4)]  # past shard 0's faults and into shard 1
    state = first.state_dict()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tail = [(b.keys, b.skipped_by) for b in loader(state)]
    assert [(b.keys, b.skipped_by) for b in head] + tail == full  # the same batches, the same counts
    assert {k: sum(s[k] for _, s in full) for k in faults} == faults
    # faults before the position, met again replaying the plan, are not named (nor counted) again
    assert not any(_warned(caplog, key) for key in ("a1", "a6", "corrupt tar data"))
    assert _warned(caplog, "b5") and _warned(caplog, "d2")


def test_data_skipped_reaches_the_logged_metrics(tmp_path, videos):
    (tmp_path / "shards").mkdir()
    urls, good, faults, _, _ = faulty_shards(tmp_path / "shards", videos)
    os.remove(urls[2])
    stream = ShardClipStream(urls, TL, batch_size=2, size=(32, 32), shuffle=False, infinite=False)
    model = KeyRecorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="csv"),
                        callbacks=[DataHealth()], log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=AVDataModule(train=stream, num_workers=2))
    keys = [k for b in model.seen for k in b]
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys))
    assert trainer.callback_metrics["data/skipped"].item() == 10
    assert {k: trainer.callback_metrics[f"data/skipped_{k}"].item() for k in faults} == faults
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = [float(r["data/skipped"]) for r in csv.DictReader(f) if r.get("data/skipped")]
    assert len(logged) == len(model.seen) and logged == sorted(logged) and logged[-1] == 10
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["DataHealth"]
    assert state == {"skipped": faults}


class _Module:
    device, sequence_parallel = torch.device("cpu"), 1

    def __init__(self):
        self.logged = {}

    def log_dict(self, logs, **kw):
        self.logged.update({k: float(v) for k, v in logs.items()})


class _Batch:
    def __init__(self, **skipped_by):
        self.skipped_by = skipped_by


def test_data_health_resumes_its_count_and_counts_a_sequence_parallel_group_once():
    trainer = type("T", (), {"strategy": SingleDeviceStrategy(torch.device("cpu"))})()
    module, health = _Module(), DataHealth()
    for batch in (_Batch(decode=1, shard=2), _Batch(), _Batch(decode=0, shard=1)):
        health.on_train_batch_end(trainer, module, None, batch, 0)
    assert module.logged == {"data/skipped": 4, "data/skipped_decode": 1, "data/skipped_shard": 3}
    saved = health.state_dict()
    resumed, module = DataHealth(), _Module()
    resumed.load_state_dict(saved)
    resumed.on_train_batch_end(trainer, module, None, _Batch(decode=2), 0)
    assert module.logged == {"data/skipped": 6, "data/skipped_decode": 3, "data/skipped_shard": 3}
    # 2 ranks of one sequence-parallel group saw the same batch: the sum over ranks counts it twice
    doubled = type("T", (), {"strategy": type("S", (), {"reduce": lambda self, t, reduce_op: 2 * t})()})()
    module, health = _Module(), DataHealth()
    module.sequence_parallel = 2
    health.on_train_batch_end(doubled, module, None, _Batch(decode=1), 0)
    assert module.logged["data/skipped"] == 1


def test_data_health_reduces_only_at_the_logging_steps_and_when_saved():
    reductions = []

    class Strategy:
        def reduce(self, t, reduce_op):
            reductions.append(t.tolist())
            return t

    trainer = type("T", (), {"strategy": Strategy(), "log_every_n_steps": 3, "global_step": 0})()
    module, health = _Module(), DataHealth()
    for step, batch in ((1, _Batch(decode=1)), (2, _Batch(decode=1))):
        trainer.global_step = step
        health.on_train_batch_end(trainer, module, None, batch, 0)
    assert reductions == [] and module.logged == {}  # steps between the logger's: counted on the host only
    trainer.global_step = 3
    health.on_train_batch_end(trainer, module, None, _Batch(shard=1), 0)
    assert len(reductions) == 1 and module.logged["data/skipped"] == 3
    trainer.global_step = 4
    health.on_train_batch_end(trainer, module, None, _Batch(decode=1), 0)
    assert len(reductions) == 1 and module.logged["data/skipped"] == 3
    assert health.state_dict() == {"skipped": {"decode": 3, "shard": 1}} and len(reductions) == 2  # a save: up to date
    assert health.state_dict() == {"skipped": {"decode": 3, "shard": 1}} and len(reductions) == 2  # once a step


RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from sora.training.data_health import DataHealth
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
class Module:
    device, sequence_parallel = torch.device("cpu"), 1
    def log_dict(self, logs, **kw): self.logged = {k: float(v) for k, v in logs.items()}
class Batch:
    def __init__(self, **kinds): self.skipped_by = kinds
trainer, module, health = type("T", (), {"strategy": DDPStrategy()})(), Module(), DataHealth()
for batch in [Batch(decode=1), Batch()] if rank == 0 else [Batch(shard=2), Batch(decode=1)]:
    health.on_train_batch_end(trainer, module, None, batch, 0)
print(json.dumps([module.logged, health.state_dict()]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_data_health_sums_the_ranks(tmp_path):
    """Two gloo ranks with DDPStrategy.reduce: both log (and checkpoint) the sum of their counts."""
    import subprocess
    import sys

    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(r), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        logged, state = json.loads(out.splitlines()[-1])
        assert logged == {"data/skipped": 4, "data/skipped_decode": 2, "data/skipped_shard": 2}
        assert state == {"skipped": {"decode": 2, "shard": 2}}


def test_a_bucketed_stream_skips_a_sample_whose_size_cannot_be_read(tmp_path, videos, caplog):
    url = _write(tmp_path / "x.tar", [{"__key__": "ok", "mp4": videos[0]}, {"__key__": "junk", "mp4": b"\0junk"},
                                      {"__key__": "ok2", "mp4": videos[1], "json": b'{"height": 0, "width": 32}'}])
    stream = ShardClipStream(str(url), TL, batch_size=1, buckets={"area": 32 * 32, "ratios": ["1:1", "2:1"],
                                                                   "multiple": 16}, shuffle=False, infinite=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(stream)
    assert [b.keys for b in batches] == [["ok"], ["ok2"]] and sum(b.skipped for b in batches) == 1
    assert _warned(caplog, "junk", str(url))


def test_latent_shards_skip_corrupt_members_and_never_unpickle(tmp_path, caplog):
    from sora.data.latents import LatentClipStream, npy_bytes, timeline_fields

    manifest = {"timeline": timeline_fields(TL), "buckets": [[32, 32]], "channels": 1, "text": False,
                "hashes": {"format": "x"}, "source": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    marker = tmp_path / "unpickled"
    evil_npy = io.BytesIO()
    np.save(evil_npy, np.array([Evil(marker), 1], dtype=object), allow_pickle=True)
    info = json.dumps({"bucket": 0}).encode()

    def sample(key, **members):
        return {"__key__": key, "video.npy": npy_bytes(np.zeros((4, 2, 4, 4), np.float32)),
                "audio.npy": npy_bytes(np.zeros((8, 16), np.float32)), "json": info, "txt": b"a ball", **members}

    url = _write(tmp_path / "latents-0.tar", [
        sample("good0"), sample("garbage", **{"video.npy": b"\x93NUMPY garbage"}),
        sample("objects", **{"audio.npy": evil_npy.getvalue()}), sample("pyd", pyd=pickle.dumps(Evil(marker))),
        sample("badjson", json=b"{oops"), sample("badbucket", json=b'{"bucket": 7}'),
        sample("badtxt", txt=b"\xff\xfe\xfd"), sample("good1")])
    stream = LatentClipStream(str(url), TL, batch_size=1, shuffle=False, infinite=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(stream)
    assert [k for b in batches for k in b.keys] == ["good0", "pyd", "good1"]
    assert sum(b.skipped_by.get("decode", 0) for b in batches) == 5
    for key in ("garbage", "objects", "badjson", "badbucket", "badtxt"):
        assert _warned(caplog, key, str(url)), key
    assert _warned(caplog, "pyd.pyd", "never unpickled") and _warned(caplog, "objects", "allow_pickle")
    assert not marker.exists()
