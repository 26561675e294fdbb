"""Audio onsets against known event times: the simplest check that sound sits where it should."""

from __future__ import annotations

import numpy as np


def onset_times(audio: np.ndarray, sample_rate: int, threshold: float = 0.02, jump: float = 8.0,
                refractory: float = 0.03, mask: np.ndarray | None = None) -> np.ndarray:
    """Seconds where sound suddenly starts: the energy of the next 2 ms exceeds ``jump`` times
    that of the previous 20 ms and ``threshold`` x the clip's peak amplitude (squared).

    A decaying, beating sound never jumps by ``jump`` so it is one onset; a quiet impact
    drowned by a loud one may be missed. ``audio`` is ``[N]`` or ``[channels, N]``.
    """
    x = np.asarray(audio, dtype=np.float64).reshape(-1, np.shape(audio)[-1]).mean(0)
    if mask is not None:
        x = np.where(mask, x, 0.0)
    if x.size == 0 or not np.any(x):
        return np.zeros(0)
    ahead_n, behind_n = max(1, sample_rate // 500), max(1, sample_rate // 50)
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    n = np.arange(x.size)
    ahead = (energy[np.minimum(n + ahead_n, x.size)] - energy[n]) / ahead_n
    behind = (energy[n] - energy[np.maximum(n - behind_n, 0)]) / behind_n
    hit = (ahead > jump * behind) & (ahead > (threshold * np.abs(x).max()) ** 2)
    rises = np.flatnonzero(np.diff(hit.astype(np.int8), prepend=0) == 1)
    out, last = [], -np.inf
    for r in rises:
        if (r - last) / sample_rate >= refractory:
            out.append(r)
            last = r
    return np.asarray(out, dtype=np.float64) / sample_rate


def match_errors(times: np.ndarray, reference: np.ndarray, max_error: float = 0.1) -> np.ndarray:
    """Signed error (time - nearest reference, seconds) of each time within ``max_error`` of one."""
    times, reference = np.asarray(times, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if times.size == 0 or reference.size == 0:
        return np.zeros(0)
    diff = times[:, None] - reference[None, :]
    nearest = diff[np.arange(len(times)), np.abs(diff).argmin(1)]
    return nearest[np.abs(nearest) <= max_error]
