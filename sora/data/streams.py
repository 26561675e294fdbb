"""The clip streams, on the :class:`~sora.data.pipeline.ClipStream` base (plan, decode, exact resume,
skip accounting: see :mod:`sora.data.pipeline`).

:class:`ShardClipStream` decodes clips from webdataset shards (read by :mod:`sora.data.shard_reader`;
:func:`expand_shards` turns its ``urls`` into shard URLs, the helpers below it read a sample's json and
video member); :class:`WorldClipStream` generates bouncing-ball world clips (:mod:`sora.data.world`) on
the fly.

Splitting: shards are dealt out over ``world_size * num_workers`` global workers; when there
are fewer shards than workers every worker reads every shard and keeps every n-th sample.
"""

from __future__ import annotations

import glob
import json
import math
import random

import numpy as np
import webdataset as wds
from torch.utils.data import get_worker_info

from sora.data.buckets import cover_size, crop, nearest_bucket
from sora.data.pipeline import ClipStream, Sample, _seed
from sora.data.shard_reader import caption_text, read_shards
from sora.media import VIDEO_EXTS, probe_av, read_av
from sora.script import window_shots
from sora.timeline import Timeline


class ShardClipStream(ClipStream):
    """Clips from webdataset shards written by ``sora-make-shards`` (:mod:`sora.data.shards`) (or any with a video member).

    ``urls``: anything webdataset opens (a path, a brace pattern ``shards-{000..009}.tar``,
    ``::``-joined lists, ``pipe:`` commands), a glob, or a list of those. ``audio_track``: which
    audio stream of multi-track files (None: the default one; an index; a language like "eng").
    ``hdr``: PQ/HLG video is tone mapped to SDR ("tonemap"), read as coded ("keep") or skipped.
    """

    def __init__(self, urls, timeline: Timeline, batch_size: int, shuffle_buffer: int = 64,
                 audio_track: int | str | None = None, hdr: str = "tonemap", **kw):
        super().__init__(timeline, batch_size, **kw)
        if hdr not in ("tonemap", "keep", "skip"):
            raise ValueError(f"data.train.hdr must be tonemap, keep or skip, got {hdr!r}")
        self.urls = expand_shards(urls)
        self.shuffle_buffer, self.audio_track, self.hdr = shuffle_buffer, audio_track, hdr

    def items(self, epoch, worker, num_workers):
        urls = list(self.urls)
        if self.shuffle:
            random.Random(_seed(self.seed, epoch)).shuffle(urls)
        every = 1
        if len(urls) >= num_workers:
            urls = urls[worker::num_workers]
        else:  # fewer shards than workers: everybody reads all, keeps every n-th sample
            every = num_workers
        stream = (s for i, s in enumerate(read_shards(urls, self._error)) if i % every == worker % every)
        if self.shuffle:
            rng = random.Random(_seed(self.seed, epoch, worker))
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        for sample in stream:
            try:
                bucket = self._bucket_of(sample)
            except Exception as e:  # noqa: BLE001 - e.g. no size in the json and an unreadable video
                self._error("decode", f"sample {sample['__key__']} of {sample['__url__']}", e)
                continue
            yield sample, bucket

    def _bucket_of(self, sample: dict) -> int:
        if len(self.buckets) == 1:
            return 0
        size = _fields(_json(sample), ("height", "width"))
        if size is None:  # no usable json: read the container header
            info = probe_av(_video_bytes(sample))
            size = info.height, info.width
        return nearest_bucket(int(size[0]), int(size[1]), self.buckets)

    def decode(self, item, bucket, rng):
        data = _video_bytes(item)
        meta = _json(item)
        caption = caption_text(item["txt"]) if "txt" in item else meta.get("caption")
        if not isinstance(caption, (str, type(None))):
            raise ValueError(f"the caption in .json is a {type(caption).__name__}, not text")
        fields = _fields(meta)  # the shard's probe metadata saves opening the container twice
        if fields is None or (self.hdr == "skip" and "hdr" not in meta):  # read the container header
            info = probe_av(data)
            fields, meta = (info.duration, info.height, info.width), {**meta, "hdr": info.hdr}
        if self.hdr == "skip" and meta.get("hdr"):
            raise ValueError(f"HDR ({meta['hdr']}) video skipped (data.train.hdr=skip)")
        duration, height, width = fields[0], int(fields[1]), int(fields[2])
        tl = self.timeline
        room = duration - tl.read_duration
        if room < -1e-6:
            raise ValueError(f"clip is {duration:.3f} s, shorter than the {tl.read_duration:.3f} s needed")
        start = float(rng.uniform(0, room)) if (self.random_crop and room > 0) else 0.0
        clip = read_av(data, start=start, duration=tl.read_duration, fps=float(tl.fps_q),
                       size=cover_size(height, width, bucket), sample_rate=tl.sample_rate, channels=self.channels,
                       threads=1 if get_worker_info() is not None else 0,  # workers: one thread each
                       audio_track=self.audio_track, hdr="keep" if self.hdr == "keep" else "tonemap")
        if len(clip.frames) < tl.num_frames:
            raise ValueError(f"decoded {len(clip.frames)} frames of the {tl.num_frames} needed")
        frames = crop(clip.frames[:tl.num_frames], bucket, rng if self.random_crop else None)
        audio, mask = self._fit_audio(clip.audio, clip.audio_mask)
        if "shots" in meta:  # timed captions (a sidecar's, a multi-shot world clip's) as this window sees them
            meta = {**meta, "shots": window_shots(meta["shots"], start, float(tl.seconds), 1 / float(tl.fps_q))}
            if not meta["shots"]:
                del meta["shots"]
        return Sample(item["__key__"], frames, audio, mask, clip.info.has_audio, caption or "", start, meta)


def _fields(meta: dict, names=("duration", "height", "width")) -> tuple[float, ...] | None:
    """Probe metadata from a shard's json, or None when a field is missing or not a positive number."""
    try:
        out = tuple(float(meta[n]) for n in names)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return out if all(math.isfinite(v) and v > 0 for v in out) else None


def _json(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _video_bytes(sample: dict) -> bytes:
    for ext in VIDEO_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"no video member (one of {', '.join(VIDEO_EXTS)}) in sample, only {sorted(sample)}")


def expand_shards(urls) -> list[str]:
    """Shard URLs from a string, a brace pattern, a glob or a list; error if none."""
    out = []
    for u in [urls] if isinstance(urls, str) else list(urls):
        for url in wds.shardlists.expand_urls(str(u)):
            hits = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            out.extend(hits)
    if not out:
        raise ValueError(f"urls={urls!r}: matched no shards")
    return out


class WorldClipStream(ClipStream):
    """Bouncing-ball world clips generated on the fly: a fixed set of ``clips`` scenes per epoch.

    With ``buckets`` (the world has no aspect ratio of its own) clip ``i`` gets a bucket drawn from
    (seed, i) and is rendered at that bucket's size: mixed aspect ratios for bucketing and packing.
    ``shots`` ({prob, max, continue_prob}): that fraction of the clips are multi-shot (cuts on video latent
    steps, :func:`sora.data.world.make_multishot`), their shots in ``meta["shots"]`` for timed-script training.
    """

    def __init__(self, world, timeline: Timeline, batch_size: int, clips: int = 1024, shots: dict | None = None,
                 **kw):
        from sora.data.world import WorldConfig

        world = world if isinstance(world, WorldConfig) else WorldConfig(**world)
        self.render_at_bucket = kw.get("buckets") is not None
        if not self.render_at_bucket:
            kw.setdefault("size", (world.height, world.width))
        super().__init__(timeline, batch_size, **kw)
        if (world.seconds, world.fps, world.sample_rate) != (timeline.seconds, timeline.fps, timeline.sample_rate):
            raise ValueError(f"data.world: seconds/fps/sample_rate {world.seconds}/{world.fps}/{world.sample_rate} "
                             f"differ from the timeline's {timeline.seconds}/{timeline.fps}/{timeline.sample_rate}")
        self.world, self.clips = world, int(clips)
        self.shots = dict(shots) if shots else None

    def items(self, epoch, worker, num_workers):
        order = list(range(self.clips))
        if self.shuffle:
            random.Random(_seed(self.seed, epoch)).shuffle(order)
        for i in order[worker::num_workers]:
            bucket = _seed(self.seed, "bucket", i) % len(self.buckets) if self.render_at_bucket else 0
            yield {"__key__": f"world-{self.seed}-{i:07d}", "index": i}, bucket

    def decode(self, item, bucket, rng):
        from dataclasses import replace

        from sora.data.world import make_clip, make_multishot

        world = replace(self.world, height=bucket.height, width=bucket.width) if self.render_at_bucket else self.world
        seed = _seed(self.seed, item["index"])
        if self.shots and _seed(self.seed, "shots", item["index"]) % 1000 < 1000 * float(self.shots.get("prob", 0.5)):
            clip = make_multishot(seed, world, self.timeline.vae_time_stride / float(self.timeline.fps_q),
                                  int(self.shots.get("max", 3)), float(self.shots.get("continue_prob", 0.3)))
        else:
            clip = make_clip(seed, world)
        frames = clip.frames
        if frames.shape[1:3] != (bucket.height, bucket.width):
            frames = crop(frames, bucket, rng if self.random_crop else None)
        audio, mask = self._fit_audio(clip.audio, np.ones(clip.audio.shape[1], dtype=bool))
        meta = {"world": clip.meta, **({"shots": clip.meta["shots"]} if "shots" in clip.meta else {})}
        return Sample(item["__key__"], frames, audio, mask, True, clip.caption, 0.0, meta)
