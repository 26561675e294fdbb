"""Per-clip pass/fail checks on what the physics probe measured: counts a reader can check by eye.

Each takes plain numbers (no probe objects), so it is tested on its own:

* :func:`is_tracked`: the probe holds one ball's track over at least half the frames.
* :func:`impact_sync`: the picture's impacts and the sound's onsets pair up one-to-one within one
  video frame, for at least two thirds of all events (``F1 = 2 matched / (impacts + onsets) >= 2/3``).
  Why not "every impact has a sound within a frame": balls bounce below the world's audible speed
  (0.4 m/s) before they come to rest, and a quiet knock under a loud one has no onset of its own,
  so real pairs fail it (9/16 held-out 2 s clips at 16 fps); and a clip with one impact passes it
  with any sound that has an onset near it (1 s clips at 8 fps: 8/16 *shuffled* pairs pass). The
  F1 rule counts sound without a picture event against the clip too: on held-out 2 s world clips
  real pairs pass 16/16 at 32x32 / 16 fps and at 64x64 / 24 fps, each clip's picture with the next
  clip's sound 2/16 and 1/16 (``tests/test_checks.py``). On 1 s clips no rule separates the two
  (one or two events a clip): evaluate sync on clips of 2 s or more.
* :func:`gravity_ok`: the clip's fitted gravity within ``tolerance`` (20 %) of the world's.
* :func:`colour_match`: every ball colour the caption names ("a red ball", "two blue balls") is
  the colour of one of the probe's tracks (floor colours, "on a green floor", are not balls).
"""

from __future__ import annotations

import re

import numpy as np
from scipy.optimize import linear_sum_assignment

SYNC_MIN_F1 = 2.0 / 3.0


def match_times(found: np.ndarray, truth: np.ndarray, tol: float) -> np.ndarray:
    """One-to-one pairs ``[M, 2]`` (found index, truth index) of times within ``tol`` (seconds)."""
    found, truth = np.asarray(found, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if found.size == 0 or truth.size == 0:
        return np.zeros((0, 2), dtype=int)
    cost = np.abs(found[:, None] - truth[None, :])
    rows, cols = linear_sum_assignment(np.where(cost <= tol, cost, 1e6))
    ok = cost[rows, cols] <= tol
    return np.stack([rows[ok], cols[ok]], 1)


def is_tracked(tracks: np.ndarray, min_fraction: float = 0.5) -> bool:
    """Whether one track ``[N, T, 2]`` (NaN where unseen) covers ``min_fraction`` of the T frames."""
    tracks = np.asarray(tracks)
    if tracks.ndim != 3 or tracks.shape[0] == 0 or tracks.shape[1] == 0:
        return False
    return bool(np.isfinite(tracks[..., 0]).sum(1).max() >= min_fraction * tracks.shape[1])


def impact_sync(impacts: np.ndarray, onsets: np.ndarray, fps: float, min_f1: float = SYNC_MIN_F1) -> dict:
    """Visual impact times against audio onset times (seconds): ``matched`` pairs within one frame
    (``1 / fps``), ``f1``, and ``ok`` (at least one impact and ``f1 >= min_f1``)."""
    impacts, onsets = np.asarray(impacts, dtype=np.float64), np.asarray(onsets, dtype=np.float64)
    matched = len(match_times(impacts, onsets, 1.0 / fps))
    events = impacts.size + onsets.size
    f1 = 2.0 * matched / events if events else 0.0
    return {"matched": matched, "f1": f1, "ok": bool(impacts.size > 0 and f1 >= min_f1)}


def gravity_ok(gravity: float, world_gravity: float, tolerance: float = 0.2) -> bool:
    """Whether a fitted gravity (m/s^2, NaN when none) is within ``tolerance`` of the world's."""
    return bool(np.isfinite(gravity) and abs(gravity - world_gravity) <= tolerance * world_gravity)


def named_ball_colours(caption: str, palette) -> set[str]:
    """The colours a caption gives balls: the palette word right before "ball"/"balls", possibly
    after a size word ("a small red ball", "two blue balls")."""
    words = "|".join(sorted(map(re.escape, palette), key=len, reverse=True))
    found = re.findall(rf"\b({words})\s+balls?\b", caption.lower())
    return set(found)


def colour_match(caption: str, track_colours, palette) -> bool | None:
    """Every ball colour named in ``caption`` among ``track_colours``; None if it names none."""
    named = named_ball_colours(caption, palette)
    return None if not named else named <= set(track_colours)
