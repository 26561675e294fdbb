"""Sequence packing on the data side: clips of different buckets grouped into one batch by tokens.

With ``pack: {max_tokens: N}`` under a train stream (``data.train.pack``), the stream's plan no
longer groups ``batch_size`` clips of one bucket; it fills *packs*: clips of any bucket, as many
as fit in ``N`` DiT tokens, no clip ever split across packs. The DiT then runs each pack as one
sequence with block-diagonal attention (:meth:`sora.models.dit.AVDiT.forward_packed`), so no
compute goes to padding, whatever the mix of aspect ratios.

Token cost of a clip of bucket ``H x W`` (the tokens ``perf/tokens_per_s`` counts; text is context
and not counted)::

    video_latent_steps * (H // patch) * (W // patch)  +  audio_latent_steps

with ``patch`` the pixels per token side: the video VAE's spatial stride times the DiT's patch
size (8 * 2 = 16 by default). Lengths come from the timing contract (:class:`sora.timeline.Timeline`).

The plan is first-fit over a few open packs (``open_packs``): a clip goes into the first open pack
with room; when none has room and ``open_packs`` are open, the oldest is emitted; a pack that no
clip could still fit is emitted at once; packs still open at the end of a pass (an epoch) are
emitted too. It depends only on the order of the stream's items and their buckets, so it is
deterministic given the seed, and the stream's resume state stays ``(epoch, batches)``: a restored
stream replays the plan without decoding up to its position, exactly as without packing.

A packed batch is a :class:`PackedBatch`: one :class:`~sora.data.pipeline.ClipBatch` per bucket
present (``parts``), so every part can be encoded by the autoencoders at its own shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import torch

from sora.data.buckets import Bucket
from sora.timeline import Timeline


def token_cost(bucket: Bucket, timeline: Timeline, patch: int) -> int:
    """DiT tokens (video patches + audio latent steps) of one clip of ``bucket`` on ``timeline``."""
    return timeline.video_latent_steps * (bucket.height // patch) * (bucket.width // patch) \
        + timeline.audio_latent_steps


class Packer:
    """The packing plan of a stream (see the module doc). ``max_tokens``: the budget of one pack;
    ``patch``: pixels per token side; ``open_packs``: packs kept open for first-fit."""

    def __init__(self, buckets: list[Bucket], timeline: Timeline, max_tokens: int, patch: int = 16,
                 open_packs: int = 4):
        if isinstance(patch, bool) or int(patch) < 1 or any(b.height % patch or b.width % patch for b in buckets):
            raise ValueError(f"data.train.pack.patch={patch}: must divide every bucket's sides "
                             f"({', '.join(b.name for b in buckets)})")
        if int(open_packs) < 1:
            raise ValueError(f"data.train.pack.open_packs={open_packs}: must be >= 1")
        self.costs = [token_cost(b, timeline, int(patch)) for b in buckets]
        largest = max(self.costs)
        if int(max_tokens) < largest:
            raise ValueError(f"data.train.pack.max_tokens={max_tokens}: smaller than one clip of bucket "
                             f"{buckets[self.costs.index(largest)].name} ({largest} tokens); use >= {largest}")
        self.max_tokens, self.patch, self.open_packs = int(max_tokens), int(patch), int(open_packs)

    def plan(self, items: Iterable[tuple[dict, int]]) -> Iterator[tuple[list[int], list[dict]]]:
        """``(item, bucket)`` pairs in stream order -> packs ``(buckets of its items, items)``."""
        smallest = min(self.costs)
        packs: list[list] = []  # open packs, oldest first: [tokens, buckets, items]
        for item, b in items:
            cost = self.costs[b]
            pack = next((p for p in packs if p[0] + cost <= self.max_tokens), None)
            if pack is None:
                if len(packs) == self.open_packs:
                    _, buckets, members = packs.pop(0)
                    yield buckets, members
                pack = [0, [], []]
                packs.append(pack)
            pack[0] += cost
            pack[1].append(b)
            pack[2].append(item)
            if pack[0] + smallest > self.max_tokens:  # full: nothing fits any more
                packs.remove(pack)
                yield pack[1], pack[2]
        for _, buckets, members in packs:  # the end of the pass
            yield buckets, members


@dataclass
class PackedBatch:
    """Clips of several buckets for one packed DiT step: ``parts`` holds one ClipBatch per bucket
    (in order of first appearance in the pack); samples are numbered part after part."""

    parts: list  # list[ClipBatch]
    skipped: int = 0        # errors met since the previous batch (see ClipBatch.skipped)
    skipped_by: dict = field(default_factory=dict)  # the same by kind
    loader_step: int = 0    # set by the datamodule's loader, as for a ClipBatch

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def to(self, device: torch.device | str) -> "PackedBatch":
        """Every part on ``device`` (see ``ClipBatch.to``)."""
        return replace(self, parts=[p.to(device) for p in self.parts])

    def normalize(self) -> "PackedBatch":
        """uint8 video -> float in [-1, 1] for every part (see ``ClipBatch.normalize``)."""
        for p in self.parts:
            p.normalize()
        return self

    @property
    def captions(self) -> list[str]:
        return [c for p in self.parts for c in p.captions]

    @property
    def keys(self) -> list[str]:
        return [k for p in self.parts for k in p.keys]

    @property
    def video(self) -> torch.Tensor:
        """The first part's video: a training frame size for callbacks that want one."""
        return self.parts[0].video


def group_by_bucket(samples: list[tuple[int, object]]) -> list[list]:
    """``(bucket, sample)`` pairs -> lists of samples per bucket, in order of first appearance."""
    groups: dict[int, list] = {}
    for b, s in samples:
        groups.setdefault(b, []).append(s)
    return list(groups.values())


__all__ = ["Packer", "PackedBatch", "token_cost", "group_by_bucket"]
