"""Aspect-ratio buckets: every clip is resized and cropped to the bucket nearest its shape.

A bucket set holds one target size per aspect ratio at (about) the same pixel area, each side
a multiple of ``multiple`` (the VAE's spatial stride times the DiT patch), so batches of
mixed shapes keep a near-constant token count. A fixed ``size`` is the one-bucket case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"


def parse_ratio(ratio: str | float) -> float:
    """'16:9' -> 1.777..; numbers pass through (width / height)."""
    if isinstance(ratio, str):
        w, _, h = ratio.partition(":")
        try:
            value = float(w) / float(h) if h else float(w)
        except ValueError:
            raise ValueError(f"buckets.ratios: {ratio!r} is not 'W:H' or a number") from None
    else:
        value = float(ratio)
    if not value > 0:
        raise ValueError(f"buckets.ratios: {ratio!r} must be positive")
    return value


def make_buckets(area: int, ratios=("16:9", "9:16", "1:1", "4:3", "3:4"), multiple: int = 32) -> list[Bucket]:
    """One bucket per ratio with height*width close to ``area``, sides multiples of ``multiple``."""
    if area < multiple * multiple:
        raise ValueError(f"buckets.area={area}: smaller than one {multiple}x{multiple} block")
    out = []
    for r in ratios:
        ratio = parse_ratio(r)
        h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
        if Bucket(h, w) not in out:
            out.append(Bucket(h, w))
    return out


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log scale) to height x width."""
    r = math.log(width / height)
    return int(np.argmin([abs(r - math.log(b.ratio)) for b in buckets]))


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """The size (h, w) keeping the source's aspect ratio that just covers the bucket."""
    scale = max(bucket.height / height, bucket.width / width)
    return max(bucket.height, math.ceil(height * scale - 1e-6)), max(bucket.width, math.ceil(width * scale - 1e-6))


def crop(frames: np.ndarray, bucket: Bucket, rng: np.random.Generator | None) -> np.ndarray:
    """Crop [T,H,W,C] frames to the bucket: at random with ``rng``, else centred."""
    h, w = frames.shape[1:3]
    dy, dx = h - bucket.height, w - bucket.width
    if dy < 0 or dx < 0:
        raise ValueError(f"frames {h}x{w} smaller than bucket {bucket.name}")
    y, x = (int(rng.integers(dy + 1)), int(rng.integers(dx + 1))) if rng is not None else (dy // 2, dx // 2)
    return frames[:, y:y + bucket.height, x:x + bucket.width]
