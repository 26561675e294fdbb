"""The streaming pipeline: shapes, sync, splitting, bad samples, buckets, exact resume."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from sora.data.buckets import Bucket, cover_size, make_buckets, nearest_bucket
from sora.data.streams import ShardClipStream, WorldClipStream, expand_shards
from sora.data.world import WorldConfig, make_clip
from sora.evaluation.sync import match_errors, onset_times
from sora.media import write_av
from sora.timeline import Timeline

TL = Timeline(seconds=1.0, fps=24, sample_rate=16000)
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def _world_mp4(seed: int, seconds=1.5, width=48, height=32) -> tuple[bytes, dict]:
    clip = make_clip(seed, WorldConfig(width=width, height=height, seconds=seconds, fps=24, sample_rate=16000))
    buf = io.BytesIO()
    write_av(buf, clip.frames, clip.audio, fps=24, sample_rate=16000)
    return buf.getvalue(), {"caption": clip.caption, "width": width, "height": height, "world": clip.meta}


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> str:
    """3 shards of 8 world clips (1.5 s, 48x32), the source of most tests here."""
    out = tmp_path_factory.mktemp("shards")
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(24):
            mp4, meta = _world_mp4(100 + i)
            sink.write({"__key__": f"clip{i:03d}", "mp4": mp4, "json": json.dumps(meta).encode()})
    return str(out / "shard-*.tar")


def _keys(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(list(batch.keys))
    return out


def test_batches_follow_the_contract(world_shards):
    stream = ShardClipStream(world_shards, TL, batch_size=4, size=(32, 32), seed=0)
    batch = next(iter(stream))
    assert batch.video.shape == (4, 3, TL.num_frames, 32, 32) and batch.video.dtype == torch.uint8
    as_bytes = batch.video.clone()
    assert batch.normalize() is batch and batch.video.dtype == torch.float32
    assert -1.0 <= batch.video.min() < batch.video.max() <= 1.0
    torch.testing.assert_close(((batch.video + 1) * 127.5).round().to(torch.uint8), as_bytes)
    assert batch.audio.shape == (4, 1, TL.num_samples) and batch.audio_mask.shape == (4, TL.num_samples)
    assert batch.has_audio.all() and batch.audio_mask.all()
    assert all(c.endswith("floor") for c in batch.captions)
    assert ((batch.start >= 0) & (batch.start <= 37 / 24 - TL.read_duration + 1e-6)).all()  # 37 frames
    assert batch.fps == 24 and batch.sample_rate == 16000 and batch.skipped == 0


def test_audio_stays_aligned_with_the_ground_truth(world_shards):
    """Sound onsets of decoded clips match the world's impact times within one frame."""
    stream = ShardClipStream(world_shards, TL, batch_size=8, size=(32, 48), seed=3, infinite=False)
    errors = []
    for batch in stream:
        for audio, start, meta in zip(batch.audio.numpy(), batch.start.tolist(), batch.meta):
            events = np.array([i["time"] - start for i in meta["world"]["impacts"] if i["audible"]])
            onsets = onset_times(audio, 16000)
            onsets = onsets[onsets > 0.02]  # an impact before the window may ring into it
            errors.append(match_errors(onsets, events))  # every onset heard is an impact seen
    errors = np.abs(np.concatenate(errors))
    assert errors.size >= 20
    assert errors.max() < 1 / 24
    assert np.median(errors) < 0.003  # AAC: a few ms at most


def test_ranks_and_workers_split_an_epoch(world_shards):
    keys = []
    for rank in range(2):
        stream = ShardClipStream(world_shards, TL, batch_size=2, size=(32, 32), seed=0, infinite=False)
        stream.rank, stream.world_size = rank, 2
        loader = StatefulDataLoader(stream, batch_size=None, num_workers=2)
        keys.append([k for b in _keys(loader) for k in b])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"clip{i:03d}" for i in range(24)]


def test_epochs_reshuffle_and_cover_everything(world_shards):
    stream = ShardClipStream(world_shards, TL, batch_size=4, size=(32, 32), seed=0)
    epochs = [[k for b in _keys(iter(stream), 6) for k in b]]
    stream2 = ShardClipStream(world_shards, TL, batch_size=4, size=(32, 32), seed=0)
    both = [k for b in _keys(iter(stream2), 12) for k in b]
    assert both[:24] == epochs[0] and sorted(both[24:]) == sorted(both[:24]) and both[24:] != both[:24]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restarts_at_the_exact_next_sample(world_shards, workers):
    def loader(state=None):
        stream = ShardClipStream(world_shards, TL, batch_size=3, size=(32, 32), seed=7, shuffle_buffer=5)
        dl = StatefulDataLoader(stream, batch_size=None, num_workers=workers)
        if state is not None:
            dl.load_state_dict(state)
        return dl

    reference = []
    for batch in loader():  # 24 clips / 2 workers / 3 a batch: an epoch ends at batch 8
        reference.append((batch.keys, batch.start.clone(), batch.video.clone()))
        if len(reference) == 11:
            break
    first = loader()
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    del it, first
    resumed = []
    for batch in loader(state):
        resumed.append((batch.keys, batch.start, batch.video))
        if len(resumed) == 6:
            break
    for (k0, s0, v0), (k1, s1, v1) in zip(reference[5:], resumed):
        assert k0 == k1
        torch.testing.assert_close(s0, s1)
        torch.testing.assert_close(v0, v1)


def test_world_stream_is_generated_on_the_fly_and_resumable():
    world = WorldConfig(width=32, height=32, seconds=1.0, fps=24, sample_rate=16000)
    stream = WorldClipStream(world, TL, batch_size=2, clips=10, seed=1)
    dl = StatefulDataLoader(stream, batch_size=None, num_workers=0)
    it = iter(dl)
    first = [next(it).keys for _ in range(3)]
    state = dl.state_dict()
    nxt = next(it)
    assert nxt.video.shape == (2, 3, 25, 32, 32) and nxt.audio.shape == (2, 1, 16000)
    assert nxt.meta[0]["world"]["impacts"]
    again = StatefulDataLoader(WorldClipStream(world, TL, batch_size=2, clips=10, seed=1), batch_size=None)
    again.load_state_dict(state)
    assert next(iter(again)).keys == nxt.keys
    assert len({k for b in first for k in b}) == 6
    with pytest.raises(ValueError, match="differ from the timeline"):
        WorldClipStream(WorldConfig(seconds=2.0), TL, batch_size=2)


def test_bad_samples_are_skipped_named_and_counted(tmp_path, caplog):
    good, meta = _world_mp4(1)
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "good0", "mp4": good, "json": json.dumps(meta).encode()})
        sink.write({"__key__": "garbage", "mp4": b"not a video at all", "json": b"{}"})
        sink.write({"__key__": "truncated", "mp4": good[: len(good) // 3], "json": b"{}"})
        sink.write({"__key__": "nojson", "mp4": good})
        sink.write({"__key__": "novideo", "json": b"{}"})
        sink.write({"__key__": "tooshort", "mp4": _world_mp4(2, seconds=0.5)[0], "json": b"{}"})
    stream = ShardClipStream(str(tmp_path / "bad.tar"), TL, batch_size=6, size=(32, 32), infinite=False,
                             shuffle=False)
    with caplog.at_level(logging.WARNING, logger="sora.data.pipeline"):
        batches = list(stream)
    keys = [k for b in batches for k in b.keys]
    assert keys == ["good0", "nojson"]
    assert sum(b.skipped for b in batches) == 4 == stream.state_dict()["skipped"]
    for name in ("garbage", "truncated", "novideo", "tooshort"):
        assert any(name in r.getMessage() for r in caplog.records), name


def test_real_media_flags_and_masks(tmp_path):
    if not MEDIA.is_dir():
        pytest.skip("../shared/media not present")
    with wds.TarWriter(str(tmp_path / "real.tar")) as sink:
        for name in ("bbb_excerpt_6ch.mp4", "bikes_noaudio.mp4"):
            sink.write({"__key__": name[:-4], "mp4": (MEDIA / name).read_bytes()})
    stream = ShardClipStream(str(tmp_path / "real.tar"), TL, batch_size=1, buckets={"area": 64 * 96, "multiple": 16},
                             infinite=False, shuffle=False)
    got = {b.keys[0]: b for b in stream}
    bbb, bikes = got["bbb_excerpt_6ch"], got["bikes_noaudio"]
    assert bbb.has_audio.item() and bbb.audio_mask.all() and bbb.audio.abs().max() > 1e-3  # a quiet file
    assert not bikes.has_audio.item() and not bikes.audio_mask.any() and bikes.audio.abs().max() == 0
    # both are wide: the 16:9 bucket (and not the 9:16 one)
    assert bbb.video.shape[-2:] == bikes.video.shape[-2:] and bbb.video.shape[-1] > bbb.video.shape[-2]


def test_buckets():
    buckets = make_buckets(256 * 256, ratios=("16:9", "9:16", "1:1"), multiple=32)
    assert buckets == [Bucket(192, 352), Bucket(352, 192), Bucket(256, 256)]
    assert all(abs(b.height * b.width - 256 * 256) / 256**2 < 0.1 for b in buckets)
    assert nearest_bucket(720, 1280, buckets) == 0 and nearest_bucket(1920, 1080, buckets) == 1
    assert nearest_bucket(500, 520, buckets) == 2
    h, w = cover_size(720, 1280, Bucket(256, 256))
    assert h == 256 and w >= 455 and w <= 456
    with pytest.raises(ValueError, match="buckets.ratios"):
        make_buckets(4096, ratios=("wide",))


def test_expand_shards(world_shards):
    assert len(expand_shards(world_shards)) == 3
    folder = str(Path(world_shards).parent)
    assert expand_shards(folder + "/shard-{000000..000001}.tar") == [folder + "/shard-000000.tar",
                                                                     folder + "/shard-000001.tar"]
    with pytest.raises(ValueError, match="matched no shards"):
        expand_shards(folder + "/nothing-*.tar")


def test_a_stream_with_nothing_usable_stops_with_a_message(tmp_path):
    with wds.TarWriter(str(tmp_path / "junk.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"junk{i}", "mp4": b"not a video", "json": b"{}"})
    stream = ShardClipStream(str(tmp_path / "junk.tar"), TL, batch_size=1, size=(32, 32))
    with pytest.raises(RuntimeError, match="no usable sample in a whole epoch"):
        next(iter(stream))
    world = WorldConfig(width=32, height=32, seconds=1.0)
    with pytest.raises(RuntimeError, match="too few samples for batch_size=4"):
        next(iter(WorldClipStream(world, TL, batch_size=4, clips=3)))


def test_lightning_moves_a_batch_by_its_to_without_walking_its_lists():
    """Lightning's batch_to_device calls ClipBatch.to / PackedBatch.to: tensors (and dicts of tensors) move,
    captions and the world's ground truth (`meta`) are the same objects, not rebuilt element by element."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from sora.data.latents import LatentBatch
    from sora.data.packing import PackedBatch

    world = WorldConfig(width=32, height=32, seconds=1.0, fps=24, sample_rate=16000)
    batch = next(iter(WorldClipStream(world, TL, batch_size=2, clips=4, seed=1)))
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert type(moved) is type(batch) and moved is not batch
    assert moved.meta is batch.meta and moved.captions is batch.captions and moved.keys == batch.keys
    assert torch.equal(moved.video, batch.video) and torch.equal(moved.audio_mask, batch.audio_mask)
    assert moved.meta[0]["world"]["impacts"]

    cached = LatentBatch(**{f: getattr(batch, f) for f in batch.__dataclass_fields__},
                         latents={"video": torch.ones(2, 4, 3, 2, 2, dtype=torch.float64)},
                         text=torch.zeros(2, 3, 8), text_mask=torch.ones(2, 3, dtype=torch.bool), hashes={"v": "abc"})
    to_float = cached.to("cpu")
    assert isinstance(to_float, LatentBatch) and to_float.latents is not cached.latents
    assert torch.equal(to_float.latents["video"], cached.latents["video"]) and to_float.hashes is cached.hashes
    packed = move_data_to_device(PackedBatch([batch, cached], skipped=1, skipped_by={"decode": 1}), "cpu")
    assert [type(p) for p in packed.parts] == [type(batch), LatentBatch] and packed.parts[0].meta is batch.meta
    assert (packed.skipped, packed.skipped_by, len(packed)) == (1, {"decode": 1}, 4)
