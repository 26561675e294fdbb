"""Audio-video sync: audio onsets against known event times, and a model-free offset estimate
(:func:`av_offset`) that cross-correlates visual and audio event envelopes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import correlate


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


# ----------------------------------------------------------------------------- model-free AV offset
#
# The picture and the sound are each turned into an "event strength" envelope on one fine time
# grid (``grid_hz``, 1 kHz by default) and cross-correlated; the lag of the correlation peak is
# the offset. Audio events are energy onsets (the statistic that ``onset_times`` thresholds).
# Visual events are *returns*: the picture changes and comes back, as it does when a ball hits
# the floor (it goes down, then up the same way) or a light flashes. The return energy of frame
# i at scale w is, per pixel and averaged,
#     |f[i] - f[i-w]| + |f[i+w] - f[i]| - |f[i+w] - f[i-w]|   (>= 0, triangle inequality),
# zero for steady motion or a lasting change and large where the motion reverses. Scales w=1
# and w=2 are summed so that a flash of one or two frames counts (a two-frame flash lands
# half a frame after its start). Changes that persist (a light switched on for good) are not
# events here; neither is a change of speed without a change of direction.


@dataclass
class SyncResult:
    """Audio-video offset of one clip.

    ``offset_ms``: how late the sound is relative to the picture, in ms (positive = audio
    late, i.e. a sound is heard after the visual event it belongs to; shift the audio by
    ``-offset_ms`` to fix it); ``None`` when either envelope is flat (silence, static video,
    or fewer than 3 frames). ``confidence``: the normalised cross-correlation at the peak,
    in [0, 1] (0 when undetermined). ``peak_z``: the peak's height above the median of the
    correlation over all lags, in standard deviations of it (how much the peak stands out).
    ``lags_ms`` / ``correlation``: the whole correlation curve, for plots.
    """

    offset_ms: float | None
    confidence: float
    peak_z: float
    lags_ms: np.ndarray
    correlation: np.ndarray


def audio_onset_envelope(audio: np.ndarray, sample_rate: int, grid_hz: float = 1000.0,
                         floor: float = 0.01) -> np.ndarray:
    """Onset strength ``[round(N * grid_hz / sample_rate)]`` of ``audio`` (``[N]`` or ``[C, N]``).

    Per sample: ``log`` of the energy of the next 2 ms over that of the previous 20 ms (both
    floored at ``(floor * peak amplitude)^2``), positive part, and 0 in the first 20 ms (a
    sound already playing when the clip starts is no onset); bin ``k`` of the output is the
    maximum over the samples in ``[k / grid_hz, (k + 1) / grid_hz)``. Silence gives zeros.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"audio must be [N] or [C, N] with N > 0, got shape {audio.shape}")
    if sample_rate <= 0 or grid_hz <= 0:
        raise ValueError(f"sample_rate and grid_hz must be > 0, got {sample_rate}, {grid_hz}")
    x = audio.astype(np.float64).reshape(-1, audio.shape[-1]).mean(0)
    n_out = max(1, int(round(x.size * grid_hz / sample_rate)))
    peak = np.abs(x).max()
    if not peak > 0:
        return np.zeros(n_out)
    ahead_n, behind_n = max(1, sample_rate // 500), max(1, sample_rate // 50)
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    n = np.arange(x.size)
    ahead = (energy[np.minimum(n + ahead_n, x.size)] - energy[n]) / ahead_n
    behind = (energy[n] - energy[np.maximum(n - behind_n, 0)]) / behind_n
    eps = (floor * peak) ** 2
    strength = np.maximum(np.log((ahead + eps) / (behind + eps)), 0.0)
    strength[:behind_n] = 0.0  # no full past to compare with: a sound already on at 0 is no onset
    bins = np.minimum((n * grid_hz / sample_rate).astype(np.int64), n_out - 1)
    out = np.zeros(n_out)
    np.maximum.at(out, bins, strength)
    return out


def _mean_abs_diff(frames: np.ndarray, lag: int, chunk: int = 32) -> np.ndarray:
    """``[T - lag]``: mean over pixels and channels of ``|f[i + lag] - f[i]|`` (chunked, int16)."""
    out = np.zeros(max(len(frames) - lag, 0))
    for s in range(0, len(out), chunk):
        e = min(s + chunk, len(out))
        a = frames[s + lag:e + lag].astype(np.int16)
        out[s:e] = np.abs(a - frames[s:e].astype(np.int16)).mean(axis=(1, 2, 3))
    return out


def return_energy(frames: np.ndarray, scales: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Visual event strength ``[T]`` of uint8 frames ``[T, H, W, 3]`` (0-255 units per pixel).

    Sum over ``scales`` w of ``D_w[i-w] + D_w[i] - D_2w[i-w]`` with ``D_l[i] = mean|f[i+l] - f[i]|``
    (see the section comment); frames within ``w`` of either end get nothing from scale ``w``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T = len(frames)
    out = np.zeros(T)
    for w in scales:
        if T < 2 * w + 1:
            continue
        d_w, d_2w = _mean_abs_diff(frames, w), _mean_abs_diff(frames, 2 * w)
        out[w:T - w] += np.maximum(d_w[:T - 2 * w] + d_w[w:T - w] - d_2w, 0.0)
    return out


def av_offset(frames: np.ndarray, audio: np.ndarray, fps: float, sample_rate: int,
              max_offset: float = 0.5, grid_hz: float = 1000.0) -> SyncResult:
    """Offset of ``audio`` (``[N]`` or ``[C, N]`` float at ``sample_rate``, sample n at
    n / sample_rate) against ``frames`` (uint8 ``[T, H, W, 3]``, frame i at i / fps), searched
    within +-``max_offset`` seconds; see :class:`SyncResult` for the sign and the outputs.

    The visual envelope (:func:`return_energy`, one value per frame) is linearly interpolated
    onto the grid; the audio envelope (:func:`audio_onset_envelope`) is smoothed with a
    Gaussian of a quarter frame so that both have about the same time resolution. Both are
    made zero-mean and the correlation at each lag is divided by the product of their norms;
    the highest local maximum inside the search range (the global maximum if there is none)
    is refined with a parabola through its neighbours. Measured on bouncing-world clips
    (20 seeds x shifts of 0, +-125, +-250 ms): within one frame of the truth for all of them at
    24 fps (64x64 and 32x32, median error 3 ms); at 12 fps 93 %, at 8 fps 89 % (2 s) and 76 %
    (32x32, 1 s), where several impacts fall within a frame or two of each other.
    """
    if not fps > 0 or not max_offset > 0:
        raise ValueError(f"fps and max_offset must be > 0, got fps={fps}, max_offset={max_offset}")
    visual = return_energy(frames)
    onsets = audio_onset_envelope(audio, sample_rate, grid_hz)
    n = max(len(onsets), int(round((len(frames) - 1) / fps * grid_hz)) + 1)
    max_lag = min(int(round(max_offset * grid_hz)), n - 1)
    lags_ms = np.arange(-max_lag, max_lag + 1) * 1000.0 / grid_hz
    grid_t = np.arange(n) / grid_hz
    v = np.interp(grid_t, np.arange(len(frames)) / fps, visual, left=0.0, right=0.0)
    a = gaussian_filter1d(np.pad(onsets, (0, n - len(onsets))), sigma=0.25 * grid_hz / fps)
    v, a = v - v.mean(), a - a.mean()
    norm = np.linalg.norm(v) * np.linalg.norm(a)
    if not norm > 1e-12 * n:  # flat picture or silence: nothing to align
        return SyncResult(None, 0.0, 0.0, lags_ms, np.zeros(len(lags_ms)))
    full = correlate(a, v, mode="full", method="fft") / norm  # full[k]: lag k - (n - 1)
    corr = full[n - 1 - max_lag:n + max_lag]
    # the highest interior local maximum: a maximum at the search boundary is a slope, not a peak
    inner = np.flatnonzero((corr[1:-1] >= corr[:-2]) & (corr[1:-1] >= corr[2:])) + 1
    k = int(inner[corr[inner].argmax()]) if inner.size else int(corr.argmax())
    shift = 0.0
    if 0 < k < len(corr) - 1:
        left, mid, right = corr[k - 1], corr[k], corr[k + 1]
        denom = left - 2 * mid + right
        shift = 0.5 * (left - right) / denom if denom < 0 else 0.0
    spread = corr.std()
    peak_z = float((corr[k] - np.median(corr)) / spread) if spread > 0 else 0.0
    return SyncResult(float(lags_ms[k] + shift * 1000.0 / grid_hz), float(max(corr[k], 0.0)), peak_z,
                      lags_ms, corr)


def av_offset_batch(clips, fps: float, sample_rate: int, true_offsets_ms=None,
                    max_offset: float = 0.5) -> dict:
    """Offsets of many clips, summarised as a flat dict of numbers (for metrics.json).

    ``clips``: iterable of ``(frames, audio)`` pairs; ``true_offsets_ms``: the known offset of
    each (default 0: in sync). Keys: ``sync/offset_abs_ms_mean`` (mean |offset - truth|),
    ``sync/offset_ms_mean`` (mean signed error), ``sync/within_frame`` (fraction of clips
    within one frame, 1000 / fps ms, of the truth; undetermined clips count as misses),
    ``sync/confidence_mean``, ``sync/undetermined`` (fraction with no offset), ``sync/clips``.
    """
    errors, confidences, undetermined, count = [], [], 0, 0
    for i, (frames, audio) in enumerate(clips):
        result = av_offset(frames, audio, fps, sample_rate, max_offset=max_offset)
        count += 1
        confidences.append(result.confidence)
        if result.offset_ms is None:
            undetermined += 1
            continue
        truth = 0.0 if true_offsets_ms is None else float(true_offsets_ms[i])
        errors.append(result.offset_ms - truth)
    if count == 0:
        raise ValueError("av_offset_batch: no clips")
    errors = np.asarray(errors)
    nan = float("nan")
    return {"sync/offset_abs_ms_mean": float(np.abs(errors).mean()) if errors.size else nan,
            "sync/offset_ms_mean": float(errors.mean()) if errors.size else nan,
            "sync/within_frame": float(np.sum(np.abs(errors) <= 1000.0 / fps) / count),
            "sync/confidence_mean": float(np.mean(confidences)),
            "sync/undetermined": undetermined / count, "sync/clips": count}
