"""Streaming clip pipeline: shards (or the procedural world) -> ``ClipBatch``es, resumable exactly.

This module holds the batch types (:class:`ClipBatch`, :class:`Sample`, :func:`collate`) and the
:class:`ClipStream` base, the machinery described below; the streams themselves (shards, the
world) are in :mod:`sora.data.streams`.

Each stream is an ``IterableDataset`` run inside DataLoader workers. For every (epoch, global
worker) it first makes a *plan*: which undecoded samples form which batch. The plan depends
only on the seed, the epoch, the shard list and the metadata in each sample's json (the
shuffle buffer and the aspect-ratio buckets work on undecoded bytes), never on decoding. Then
it decodes each planned batch (random clip start and crop from a per-sample RNG keyed by seed,
epoch and sample key) and yields it.

So a worker's position is two integers, ``(epoch, batches yielded in that epoch)``: that is
its ``state_dict``. Restored (through torchdata's ``StatefulDataLoader``, which snapshots every
worker's state with each batch), a worker replays the plan without decoding up to that batch
and continues with the exact next sample.

Bad data is skipped, named in one warning line (shard, sample key, reason) and counted; the run
goes on. ``decode``: a sample without a readable video, too short, with a caption that is not text.
``shard``: a shard that cannot be opened (e.g. deleted), corrupt tar data (skipped up to the next
good header), a truncated shard (its rest, and the sample being read, are lost). Each batch
carries the errors met since the previous one (``skipped_by``, total ``skipped``), so the sum over
all batches is every error (a finite pass drops those after its last batch);
:class:`sora.training.data_health.DataHealth` logs them as ``data/skipped``. Replaying the plan on
resume does not count again. Members that hold pickles (``.pyd``, ``.pickle``, ...) are dropped
unread: nothing from a shard is ever unpickled.

Packing (``pack={max_tokens: N}``, :mod:`sora.data.packing`): the plan fills packs of clips of any
bucket up to ``N`` DiT tokens instead of ``batch_size`` clips of one bucket, and yields
``PackedBatch``es (one ClipBatch per bucket present); the resume state is unchanged.

Splitting: each stream deals its share to each of ``world_size * num_workers`` global workers
(shards: see :mod:`sora.data.streams`). Streams are infinite (epochs reshuffle) unless ``infinite=False``.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sora.data.buckets import Bucket, make_buckets
from sora.data.packing import PackedBatch, Packer, group_by_bucket
from sora.timeline import Timeline

log = logging.getLogger(__name__)
KINDS = ("decode", "shard")  # what a skip is counted as: a bad sample; an unreadable shard or part of one


@dataclass
class ClipBatch:
    """A batch of clips on the timing contract's axis (all clips of one batch share a size)."""

    video: torch.Tensor        # float [B, 3, T, H, W] in [-1, 1]; uint8 [0, 255] until normalize()
    audio: torch.Tensor        # float [B, channels, N]
    audio_mask: torch.Tensor   # bool [B, N]: True where the source had sound
    has_audio: torch.Tensor    # bool [B]
    captions: list[str]
    keys: list[str]
    start: torch.Tensor        # float64 [B]: clip start in its source, seconds
    fps: float
    sample_rate: int
    meta: list[dict] = field(default_factory=list)  # per clip: the shard's json (world ground truth...)
    skipped: int = 0           # errors met since the previous batch: samples and shard parts skipped
    skipped_by: dict = field(default_factory=dict)  # the same by kind (KINDS)
    loader_step: int = 0       # set by the datamodule's loader: which yielded batch this is

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, index: list[int]) -> "ClipBatch":
        """The clips at ``index`` (host-side lists; tensors indexed on their batch dim): a batch of their own."""
        b, picked = len(self), {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b:
                picked[f.name] = v[torch.tensor(index, dtype=torch.long, device=v.device)]
            elif isinstance(v, list) and len(v) == b:
                picked[f.name] = [v[i] for i in index]
        return dataclasses.replace(self, **picked)

    def to(self, device: torch.device | str) -> "ClipBatch":
        """The batch with its tensors (and dicts of tensors) on ``device``; lists (captions, ``meta``) shared.

        Lightning's ``batch_to_device`` calls this instead of walking the batch: its generic walk rebuilt
        every list of ``meta`` (the world's ground truth, thousands of numbers a batch), 13.8 ms of a
        ~280 ms quickstart DiT step on cached latents on a CPU (experiments/benchmarks/README.md).
        """
        device = torch.device(device)
        return dataclasses.replace(self, **{f.name: moved for f in dataclasses.fields(self)
                                            if (moved := to_device(getattr(self, f.name), device)) is not None})

    def normalize(self) -> "ClipBatch":
        """uint8 video -> float in [-1, 1], in place (a no-op when already float).

        Streams hand out uint8 video (4x fewer bytes between processes and to the device);
        the datamodule normalizes after the batch reaches its device.
        """
        if self.video.dtype == torch.uint8:
            self.video = self.video.float().div_(127.5).sub_(1.0)
        return self


def to_device(value, device: torch.device):
    """A tensor, or a dict of tensors, on ``device`` (non-blocking to a GPU); None for anything else."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {k: v.to(device, non_blocking=device.type == "cuda") for k, v in value.items()}
    return None


@dataclass
class Sample:
    key: str
    frames: np.ndarray         # uint8 [T, H, W, 3] (may be a crop view: collate copies once)
    audio: np.ndarray          # float32 [channels, N]
    audio_mask: np.ndarray     # bool [N]
    has_audio: bool
    caption: str
    start: float = 0.0
    meta: dict = field(default_factory=dict)


def collate(samples: list[Sample], fps: float, sample_rate: int, skipped_by: dict | None = None) -> ClipBatch:
    skipped_by = dict(skipped_by or {})
    video = torch.from_numpy(np.stack([s.frames for s in samples])).permute(0, 4, 1, 2, 3)
    return ClipBatch(
        video=video,
        audio=torch.from_numpy(np.stack([s.audio for s in samples])),
        audio_mask=torch.from_numpy(np.stack([s.audio_mask for s in samples])),
        has_audio=torch.tensor([s.has_audio for s in samples]),
        captions=[s.caption for s in samples], keys=[s.key for s in samples],
        start=torch.tensor([s.start for s in samples], dtype=torch.float64),
        fps=fps, sample_rate=sample_rate, meta=[s.meta for s in samples], skipped=sum(skipped_by.values()),
        skipped_by=skipped_by)


def _seed(*parts) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


class ClipStream(IterableDataset, ABC):
    """Base of the streams: splitting, epochs, bucketed batching, decode, exact resume."""

    def __init__(self, timeline: Timeline, batch_size: int, size: tuple[int, int] | None = None,
                 buckets: dict | None = None, seed: int = 0, shuffle: bool = True, infinite: bool = True,
                 channels: int = 1, random_crop: bool = True, pack: dict | None = None):
        if (size is None) == (buckets is None):
            raise ValueError("data: give exactly one of size=[H, W] or buckets={area, ratios, multiple}")
        self.timeline, self.batch_size, self.seed = timeline, int(batch_size), int(seed)
        self.buckets = [Bucket(*map(int, size))] if size is not None else make_buckets(**buckets)
        # packing: batches by DiT tokens over all buckets instead of batch_size clips of one bucket
        self.packer = None if pack is None else Packer(self.buckets, timeline, **pack)
        self.shuffle, self.infinite, self.channels, self.random_crop = shuffle, infinite, channels, random_crop
        self.rank, self.world_size = None, None   # set by the datamodule; else torch.distributed
        self._epoch, self._batches, self._skipped = 0, 0, 0
        self._pending, self._replaying = dict.fromkeys(KINDS, 0), False  # errors not yet on a batch

    # -- resume state (one per worker; torchdata's StatefulDataLoader collects them) --------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._batches, "skipped": self._skipped, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("data: resuming a stream saved with seed %s under seed %s", state["seed"], self.seed)
        self._epoch, self._batches, self._skipped = state["epoch"], state["batches"], state.get("skipped", 0)
        self._pending = dict.fromkeys(KINDS, 0)

    def _error(self, kind: str, what: str, reason) -> None:
        """A skip: named in one warning line and counted, on the next batch (not when replaying the plan
        to a restored position: those were counted before)."""
        reason = _reason(reason)
        if self._replaying:
            log.info("data: skipped %s: %s (again, resuming)", what, reason)
            return
        self._pending[kind] += 1
        self._skipped += 1
        log.warning("data: skipped %s: %s", what, reason)

    # -- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def items(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[dict, int]]:
        """Undecoded items of this worker's share of an epoch, in order, with their bucket."""

    @abstractmethod
    def decode(self, item: dict, bucket: Bucket, rng: np.random.Generator) -> Sample:
        """One planned item to a Sample of the bucket's size on the timeline; raise if unusable."""

    # -- the machinery -------------------------------------------------------------------------
    def _global_worker(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def plan(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[int, list[dict]]]:
        """Batches of undecoded items: a batch is emitted when its bucket fills up. Packing: packs
        ``(bucket of each item, items)`` from :meth:`Packer.plan`."""
        if self.packer is not None:
            yield from self.packer.plan(self.items(epoch, worker, num_workers))
            return
        pending: dict[int, list[dict]] = {}
        for item, b in self.items(epoch, worker, num_workers):
            pending.setdefault(b, []).append(item)
            if len(pending[b]) == self.batch_size:
                yield b, pending.pop(b)
        if not self.infinite:  # the last partial batches of a finite pass
            yield from sorted(pending.items())

    def __iter__(self) -> Iterator[ClipBatch]:
        worker, num_workers = self._global_worker()
        epoch, done = self._epoch, self._batches
        while True:
            resumed_at, yielded = done, 0
            plan = enumerate(self.plan(epoch, worker, num_workers))
            self._replaying = done > 0
            ahead = next(plan, None)
            while ahead is not None:
                index, (b, items) = ahead
                self._replaying = index < done
                ahead = next(plan, None)  # plan one batch ahead: errors met reading it go with this one
                self._replaying = False
                if index < done:
                    continue  # replaying the plan up to the restored position: nothing decoded
                samples = []  # (bucket, sample)
                for item, bi in zip(items, b if isinstance(b, list) else [b] * len(items)):
                    rng = np.random.default_rng(_seed(self.seed, epoch, item["__key__"]))
                    try:
                        samples.append((bi, self.decode(item, self.buckets[bi], rng)))
                    except Exception as e:  # noqa: BLE001 - any bad sample is skipped, named and counted
                        self._error("decode", f"sample {item['__key__']} of {item.get('__url__', 'world')}", e)
                self._epoch, self._batches = epoch, index + 1
                if samples:
                    yielded += 1
                    errors, self._pending = self._pending, dict.fromkeys(KINDS, 0)
                    yield self._batch(samples, errors)
            if not self.infinite:
                return
            if yielded == 0 and resumed_at == 0:  # a whole epoch without one batch: would spin forever
                raise RuntimeError(f"data: worker {worker}/{num_workers} found no usable sample in a whole "
                                   f"epoch (too few samples for batch_size={self.batch_size}, or all unreadable)")
            epoch, done = epoch + 1, 0
            self._epoch, self._batches = epoch, 0

    def _batch(self, samples: list[tuple[int, Sample]], errors: dict):
        fps, rate = float(self.timeline.fps_q), self.timeline.sample_rate
        if self.packer is None:
            return collate([s for _, s in samples], fps, rate, skipped_by=errors)
        return PackedBatch([collate(group, fps, rate) for group in group_by_bucket(samples)],
                           skipped=sum(errors.values()), skipped_by=dict(errors))

    def _fit_audio(self, audio: np.ndarray, mask: np.ndarray):
        n = self.timeline.num_samples
        audio, mask = audio[:, :n], mask[:n]
        if audio.shape[0] != self.channels:
            audio = np.repeat(audio.mean(0, keepdims=True), self.channels, 0)
        if audio.shape[1] < n:
            pad = n - audio.shape[1]
            audio, mask = np.pad(audio, ((0, 0), (0, pad))), np.pad(mask, (0, pad))
        return np.ascontiguousarray(audio, dtype=np.float32), mask


def _reason(e) -> str:
    """An error as one line."""
    s = str(e).strip()
    return " ".join(s.split()) if s else type(e).__name__

