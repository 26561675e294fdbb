"""Physics probe for bouncing-world clips: track the balls, find their impacts, fit gravity.

Works on any frames drawn like :mod:`sora.data.world` draws them (sampled videos included): a
plain background above ``floor_y``, balls of the world's palette colours. Units: pixels and
seconds from the frames (y grows downwards), metres through ``config.pixels_per_metre``.

1. Balls: each pixel above the floor is explained as ``background + c * (colour - background)``
   for its best palette colour (``c`` = coverage, 0..1, which also weighs anti-aliased edges);
   pixels with ``c >= 0.5`` form connected components per colour; a component's centre is the
   ``c``-weighted centroid of it grown by one pixel, its mass ``sum(c)`` ~ pi r^2.
2. Tracks: per colour, components are linked frame to frame (Hungarian assignment on the
   distance to a constant-velocity prediction). Points whose mass is not within -15 % / +20 %
   of the track's usual (75th percentile) mass are dropped: a ball partly hidden, or merged.
3. Impacts: in free flight the second divided difference of y is exactly gravity; a floor
   bounce makes it strongly negative (< -g/2) near the floor, a ceiling bounce > 1.5 g near the
   top; a wall impact flips x (checked with lines either side). The impact time is where the
   parabolas (lines for walls) fitted to the gap-free flight either side cross; the
   restitution is the ratio of their vertical speeds there (> 1: energy gained, a clip
   played backwards).
4. Gravity: least squares ``y = a t^2 + b t + c`` over free-flight runs of >= 4 frames, g = 2a.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from sora.data.world import PALETTE, SIZES, WorldConfig
from sora.evaluation.checks import colour_match, gravity_ok, impact_sync, is_tracked, match_times
from sora.evaluation.sync import onset_times

NAN = float("nan")


@dataclass
class PhysicsResult:
    """What :func:`probe_clip` measured on one clip (pixels, seconds, m/s^2).

    ``tracks``: [N, T, 2] ball centres (x, y), NaN where not seen; ``track_colors``: palette
    name per track; ``impacts``: dicts (time, track, surface, x, y, restitution or None);
    ``onsets``: audio onset times (s); ``sync_errors_ms``: onset - nearest visual impact, for
    the onsets within ``max_sync_error`` of one; ``gravity``: joint fit over all free-flight
    runs (NaN if none); ``gravity_segments``: one fit per run; ``metrics``: see probe_clip.
    """

    tracks: np.ndarray
    track_colors: list
    impacts: list
    onsets: np.ndarray
    sync_errors_ms: np.ndarray
    gravity: float
    gravity_segments: np.ndarray
    metrics: dict = field(default_factory=dict)


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else NAN


def find_balls(frame: np.ndarray, floor_y: int, background: np.ndarray, colors: np.ndarray) -> list:
    """Balls in one uint8 frame [H, W, 3]: list of (colour index, x, y, mass), pixels."""
    d = frame[:floor_y].astype(np.float64) - background                  # [h, W, 3]
    u = colors - background                                               # [K, 3]
    cover = np.clip(np.einsum("hwc,kc->khw", d, u) / (u * u).sum(1)[:, None, None], 0.0, 1.0)
    best = np.linalg.norm(d[None] - cover[..., None] * u[:, None, None], axis=-1).argmin(0)
    ys, xs = np.indices(best.shape) + 0.5
    out = []
    for k in range(len(colors)):
        labels, n = ndimage.label((best == k) & (cover[k] >= 0.5), structure=np.ones((3, 3)))
        for j in range(1, n + 1):
            region = ndimage.binary_dilation(labels == j) & ((best == k) | (cover.max(0) < 0.5))
            w = np.where(region, cover[k], 0.0)
            out.append((k, (xs * w).sum() / w.sum(), (ys * w).sum() / w.sum(), w.sum()))
    return out


def _predict(track: dict, frame: int) -> np.ndarray:
    """Where ``track`` should be at ``frame``: constant velocity from its last two points."""
    if len(track["xy"]) < 2:
        return track["xy"][-1]
    (f0, f1), (p0, p1) = track["frames"][-2:], track["xy"][-2:]
    return p1 + (p1 - p0) * (frame - f1) / (f1 - f0)


def track_balls(observations: list, n_frames: int, gate: float, min_mass: float, max_gap: int = 3):
    """Link per-frame ``(colour, x, y, mass)`` lists into ``(xy [N, T, 2], colour [N], radius [N])``."""
    tracks = []  # dicts: colour, frames, xy, mass
    for f, obs in enumerate(observations):
        obs = [o for o in obs if o[3] >= min_mass]
        for k in sorted({o[0] for o in obs}):
            pts = np.array([o[1:] for o in obs if o[0] == k])
            live = [tr for tr in tracks if tr["colour"] == k and tr["frames"][-1] >= f - max_gap - 1]
            used = set()
            if live:
                expected = np.array([_predict(tr, f) for tr in live])
                cost = np.linalg.norm(expected[:, None] - pts[None, :, :2], axis=-1)
                for i, j in zip(*linear_sum_assignment(cost)):
                    if cost[i, j] <= gate:
                        tr = live[i]
                        tr["frames"].append(f), tr["xy"].append(pts[j, :2]), tr["mass"].append(pts[j, 2])
                        used.add(j)
            tracks += [{"colour": k, "frames": [f], "xy": [pts[j, :2]], "mass": [pts[j, 2]]}
                       for j in range(len(pts)) if j not in used]
    rows, colours, radii = [], [], []
    for tr in tracks:
        mass = np.array(tr["mass"])
        full = np.percentile(mass, 75)  # an unhidden ball; less is partly hidden, more is merged
        keep = (mass > 0.85 * full) & (mass < 1.2 * full)
        if keep.sum() >= 3:
            rows.append(np.full((n_frames, 2), np.nan))
            rows[-1][np.array(tr["frames"])[keep]] = np.array(tr["xy"])[keep]
            colours.append(tr["colour"]), radii.append(float(np.sqrt(full / np.pi)))
    return np.array(rows).reshape(-1, n_frames, 2), colours, np.array(radii)


def _fit(t: np.ndarray, v: np.ndarray, degree: int, a: float):
    """Polynomial (highest power first) through ``(t, v)``; a parabola through fewer than 3
    points gets ``a`` as its t^2 coefficient. None if there are too few points."""
    if degree == 2 and len(t) < 3:
        return np.concatenate([[a], np.polyfit(t, v - a * t * t, 1)]) if len(t) == 2 else None
    return np.polyfit(t, v, degree) if len(t) > degree else None


def _crossing(before, after, lo: float, hi: float) -> float:
    """Time in [lo, hi] (+-10 %) where polynomials ``before`` and ``after`` meet, else the midpoint."""
    mid = 0.5 * (lo + hi)
    if before is None or after is None:
        return mid
    n = max(len(before), len(after))
    roots = np.roots(np.pad(before, (n - len(before), 0)) - np.pad(after, (n - len(after), 0)))
    pad = 0.1 * (hi - lo) + 1e-9
    roots = roots[(np.abs(roots.imag) < 1e-9) & (roots.real >= lo - pad) & (roots.real <= hi + pad)].real
    return float(roots[np.abs(roots - mid).argmin()]) if roots.size else mid


def _reverses(t: np.ndarray, x: np.ndarray, end: int, start: int, left: bool, min_speed: float) -> bool:
    """Whether lines through up to 4 points up to ``end`` and from ``start`` run against the
    wall, then away from it, each faster than ``min_speed`` px/s."""
    if end < 1 or start > len(t) - 2:
        return False
    v_in = np.polyfit(t[max(end - 3, 0):end + 1], x[max(end - 3, 0):end + 1], 1)[0]
    v_out = np.polyfit(t[start:start + 4], x[start:start + 4], 1)[0]
    sign = -1.0 if left else 1.0
    return sign * v_in > min_speed and -sign * v_out > min_speed


def track_impacts(t: np.ndarray, xy: np.ndarray, radius: float, config: WorldConfig, g_px: float):
    """Impacts and free flights of one track: ``t`` [n] s, ``xy`` [n, 2] px (all seen),
    ``g_px`` the expected gravity (px/s^2) that sets the thresholds.

    Returns ``(impacts, segments)``: impacts as dicts (time, surface, x, y, restitution);
    segments as ``(t, y)`` runs of >= 4 consecutive frames of vertical free flight: not
    resting, and with no upward kick (acceleration < -g/2) anywhere in that flight.
    """
    n = len(t)
    if n < 3:
        return [], []
    acc = 2 * np.diff(np.diff(xy, axis=0) / np.diff(t)[:, None], axis=0) / (t[2:] - t[:-2])[:, None]
    frame_dt = np.diff(t).min()
    step = np.abs(np.diff(xy, axis=0)).max(1)
    tol = 1.5 + np.maximum(step[:-1], step[1:])              # the sample nearest a contact is a step away
    triples = xy[np.arange(n - 2)[:, None] + np.arange(3)]   # [n-2, 3, 2]
    xs, ys = triples[..., 0], triples[..., 1]
    flags = {"floor": (acc[:, 1] < -0.5 * g_px) & (ys.max(1) >= config.floor_y - radius - tol),
             "ceiling": (acc[:, 1] > 1.5 * g_px) & (ys.min(1) <= radius + tol),
             "left": (acc[:, 0] > 0.25 * g_px) & (xs.min(1) <= radius + tol),
             "right": (acc[:, 0] < -0.25 * g_px) & (xs.max(1) >= config.width - radius - tol)}
    events = []  # (last frame before, first frame after, surface); a lone flagged frame is in neither
    for surface, flag in flags.items():
        centres = np.flatnonzero(flag) + 1
        for group in np.split(centres, np.flatnonzero(np.diff(centres) > 1) + 1) if centres.size else []:
            end, start = min(group[-1] - 1, group[0]), max(group[0] + 1, group[-1])
            if surface in ("floor", "ceiling") or _reverses(t, xy[:, 0], end, start, surface == "left",
                                                           0.15 * config.pixels_per_metre):
                events.append((int(end), int(start), surface))
    impacts, segments = [], []
    for axis, names, degree in ((1, ("floor", "ceiling"), 2), (0, ("left", "right"), 1)):
        evs = sorted(e for e in events if e[2] in names)
        heads, tails, flying = [], [], []  # fits of each flight's first / last run without gaps
        for s, e in zip([0] + [ev[1] for ev in evs], [ev[0] for ev in evs] + [n - 1]):
            runs = np.split(np.arange(s, e + 1), np.flatnonzero(np.diff(t[s:e + 1]) > 1.5 * frame_dt) + 1)
            fits = [(_fit(t[r], xy[r, axis], degree, g_px / 2), len(r)) for r in runs]
            heads.append(fits[0]), tails.append(fits[-1])
            flying.append(e > s and np.ptp(xy[s:e + 1, 1]) > 1.0)  # not resting on the floor
            kicked = (acc[s:max(e - 1, s), 1] < -0.5 * g_px).any()  # a bounce missed in there
            if axis == 1 and flying[-1] and not kicked:
                segments += [(t[r], xy[r, 1]) for r in runs if len(r) >= 4]
        for i, (end, start, surface) in enumerate(evs):
            (before, n_before), (after, n_after) = tails[i], heads[i + 1]
            when = _crossing(before, after, t[end], t[start])
            rest = None
            if degree == 2 and min(n_before, n_after) >= 3 and flying[i + 1]:  # both fitted freely
                v_in, v_out = np.polyval(np.polyder(before), when), np.polyval(np.polyder(after), when)
                rest = float(-v_out / v_in) if abs(v_in) > 1e-9 else None
            impacts.append({"time": float(when), "surface": surface, "x": float(np.interp(when, t, xy[:, 0])),
                            "y": float(np.interp(when, t, xy[:, 1])), "restitution": rest})
    return sorted(impacts, key=lambda imp: imp["time"]), segments


def fit_gravity(segments: list, max_rms: float = 0.3) -> tuple[float, np.ndarray]:
    """Gravity in px/s^2 from free-flight ``(t, y)`` runs: ``(joint, per_segment [S])``.

    Runs that are no parabola (rms residual above ``max_rms`` px and 3x the median one: a ball
    partly hidden, a missed bounce) are left out. Joint: one least-squares fit with a shared
    t^2 coefficient and a line per run; per run: ``2a`` of its own parabola. NaN if none.
    """
    fits = [np.polyfit(t - t.mean(), y, 2, full=True) for t, y in segments]
    rms = np.array([np.sqrt(f[1][0] / len(t)) if len(f[1]) else 0.0 for f, (t, _) in zip(fits, segments)])
    good = rms <= max(max_rms, 3 * np.median(rms)) if segments else np.zeros(0, bool)
    segments = [seg for seg, ok in zip(segments, good) if ok]
    if not segments:
        return NAN, np.zeros(0)
    A = np.zeros((sum(len(t) for t, _ in segments), 1 + 2 * len(segments)))
    r = 0
    for i, (t, _) in enumerate(segments):
        tc = t - t.mean()
        A[r:r + len(t), 0], A[r:r + len(t), 1 + 2 * i], A[r:r + len(t), 2 + 2 * i] = tc * tc, tc, 1.0
        r += len(t)
    joint = np.linalg.lstsq(A, np.concatenate([y for _, y in segments]), rcond=None)[0][0]
    return float(2 * joint), np.array([2 * f[0][0] for f, ok in zip(fits, good) if ok])


def _robust_cv(values: np.ndarray) -> float:
    """1.4826 MAD / |median|: std / mean for a normal sample, not swamped by a few short noisy runs."""
    med = np.median(values) if values.size >= 2 else 0.0
    return float(1.4826 * np.median(np.abs(values - med)) / abs(med)) if med else NAN


def compare_ground_truth(result: PhysicsResult, meta: dict, fps: float, config: WorldConfig) -> dict:
    """Scores against a world clip's ``meta`` (trajectory, balls, impacts).

    tracked_fraction: (ball, frame) pairs with a point of its track (balls and tracks paired
    one-to-one) within the ball's radius; position_error_px: mean distance there. Impacts pair
    one-to-one within one frame: impact_recall over the audible true impacts
    (impact_recall_visible: those whose ball no later-drawn ball overlaps within a frame of
    it), impact_precision over all true impacts (a found silent tap is no false alarm).
    """
    truth = np.asarray(meta["trajectory"], dtype=np.float64)[:, : result.tracks.shape[1]]   # [B, T, 2]
    radii = np.array([b["radius_px"] for b in meta["balls"]])
    dist = np.linalg.norm(truth[:, None] - result.tracks[None, :, : truth.shape[1]], axis=-1)  # [B, N, T]
    close = dist <= radii[:, None, None]
    tracked, errors = np.zeros(truth.shape[:2], dtype=bool), [np.zeros(0)]
    for b, k in zip(*linear_sum_assignment(-close.sum(-1))):
        tracked[b] = close[b, k]
        errors.append(dist[b, k][close[b, k]])
    overlap = np.linalg.norm(truth[:, None] - truth[None], axis=-1) < (radii[:, None] + radii)[..., None]
    hidden = (np.triu(np.ones(overlap.shape[:2], dtype=bool), 1)[..., None] & overlap).any(1)  # [B, T]
    heard = [imp for imp in meta["impacts"] if imp["speed"] >= config.audible_speed]
    t_true = np.array([imp["time"] for imp in heard])
    frame = [int(imp["time"] * fps) for imp in heard]
    seen = np.array([not hidden[imp["ball"], max(f - 1, 0):f + 3].any() for imp, f in zip(heard, frame)], bool)
    t_found = np.array([imp["time"] for imp in result.impacts])
    pairs = match_times(t_found, t_true, 1.0 / fps)
    real = len(match_times(t_found, np.array([imp["time"] for imp in meta["impacts"]]), 1.0 / fps))
    errors = np.concatenate(errors)
    return {"tracked_fraction": float(tracked.mean()), "position_error_px": _mean(errors),
            "impacts_true": len(t_true), "impacts_visible": int(seen.sum()), "impacts_found": len(t_found),
            "impacts_matched": len(pairs), "impacts_matched_visible": int(seen[pairs[:, 1]].sum()),
            "impacts_real": real,
            "impact_recall": len(pairs) / len(t_true) if len(t_true) else NAN,
            "impact_recall_visible": float(seen[pairs[:, 1]].sum() / seen.sum()) if seen.any() else NAN,
            "impact_precision": real / len(t_found) if len(t_found) else NAN,
            "impact_time_error_ms": _mean(np.abs(t_found[pairs[:, 0]] - t_true[pairs[:, 1]]) * 1000)}


def _sync_metrics(errors_ms: np.ndarray, onsets: int, fps: float) -> dict:
    e = np.abs(errors_ms)
    return {"onsets": onsets, "sync_error_ms_mean": _mean(e),
            "sync_error_ms_median": float(np.median(e)) if e.size else NAN,
            "sync_matched_fraction": e.size / onsets if onsets else NAN,
            "sync_within_frame": float((e <= 1000 / fps).sum() / onsets) if onsets else NAN}


def probe_clip(frames: np.ndarray, audio: np.ndarray, fps: float, sample_rate: int, world_config: WorldConfig,
               ground_truth: dict | None = None, max_sync_error: float = 0.1) -> PhysicsResult:
    """Track the balls, find impacts, fit gravity and time the sound of one clip.

    ``frames`` uint8 [T, H, W, 3] (frame i at i / fps) of ``world_config``'s world (its size,
    floor, palette, gravity as the reference; the fps may differ); ``audio`` [N] or [C, N] at
    ``sample_rate``; ``ground_truth``: a world clip's ``meta``, to score against. ``metrics``:
    gravity (m/s^2, joint fit), gravity_rel_error (vs the configured gravity), gravity_cv
    (robust std / mean over runs), segments, tracks, impacts, restitution_mean,
    energy_gain_fraction (bounces with restitution > 1), onsets, sync_error_ms_mean / _median
    (|onset - nearest impact| over the onsets within ``max_sync_error`` s of one),
    sync_matched_fraction, sync_within_frame (fraction of all onsets within one frame of an
    impact), and with ``ground_truth`` the keys of :func:`compare_ground_truth`.
    """
    frames, cfg = np.asarray(frames), world_config
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] != (cfg.height, cfg.width):
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the world is {cfg.height}x{cfg.width}")
    if not fps > 0 or not sample_rate > 0:
        raise ValueError(f"fps and sample_rate must be > 0, got {fps}, {sample_rate}")
    ppm = cfg.pixels_per_metre
    colors = np.array([PALETTE[c] for c in cfg.colors], dtype=np.float64)
    background = np.median(frames[:, : cfg.floor_y].reshape(-1, 3), axis=0)
    r_min = min(SIZES[s][0] for s in cfg.sizes) * 0.9 * min(cfg.floor_y, cfg.width)
    obs = [find_balls(f, cfg.floor_y, background, colors) for f in frames]
    gate, min_mass = 0.5 * max(cfg.width, cfg.height), 0.4 * np.pi * r_min ** 2
    xy, colour_idx, radii = track_balls(obs, len(frames), gate, min_mass)
    times = np.arange(len(frames)) / fps
    impacts, segments = [], []
    for i in range(len(xy)):
        seen = np.isfinite(xy[i, :, 0])
        found, runs = track_impacts(times[seen], xy[i, seen], radii[i], cfg, cfg.gravity * ppm)
        impacts += [dict(imp, track=i) for imp in found]
        segments += runs
    impacts.sort(key=lambda imp: imp["time"])
    g_joint, g_runs = fit_gravity(segments)
    onsets = onset_times(audio, sample_rate)
    t_imp = np.array([imp["time"] for imp in impacts])
    sync = np.zeros(0)
    if onsets.size and t_imp.size:
        diff = onsets[:, None] - t_imp[None, :]
        sync = diff[np.arange(len(onsets)), np.abs(diff).argmin(1)]
    sync = sync[np.abs(sync) <= max_sync_error] * 1000
    rest = np.array([imp["restitution"] for imp in impacts if imp["restitution"] is not None])
    g = g_joint / ppm
    metrics = {"gravity": g, "gravity_rel_error": abs(g - cfg.gravity) / cfg.gravity,
               "gravity_cv": _robust_cv(g_runs),
               "segments": len(g_runs), "tracks": len(xy), "impacts": len(impacts), "restitution_mean": _mean(rest),
               "energy_gain_fraction": _mean(rest > 1), **_sync_metrics(sync, len(onsets), fps)}
    result = PhysicsResult(xy, [cfg.colors[k] for k in colour_idx], impacts, onsets, sync, g, g_runs / ppm, metrics)
    if ground_truth is not None:
        metrics.update(compare_ground_truth(result, ground_truth, fps, cfg))
    return result


def probe_batch(clips, fps: float, sample_rate: int, world_config: WorldConfig, ground_truths=None,
                prefix: str = "physics/", captions=None) -> dict:
    """Probe many clips into one flat dict of numbers (for metrics.json), keys ``prefix + name``.

    ``clips``: iterable of ``(frames, audio)``; ``ground_truths``: the world ``meta`` of each,
    or None. Counts are pooled (impact_recall = all matched / all true impacts; sync over all
    onsets); gravity_mean / _median / _std are over the clips' joint fits (m/s^2),
    gravity_rel_error is the median's (one wild clip does not swamp it), gravity_cv the robust
    spread of all runs' fits pooled; tracked_fraction and position_error_px average the clips.
    Per-clip checks (:mod:`sora.evaluation.checks`), as counts of clips: clips_tracked,
    clips_in_sync, clips_gravity_ok; with ``captions`` (one per clip) clips_colour_match out of
    clips_naming_colour.
    """
    results = [probe_clip(frames, audio, fps, sample_rate, world_config,
                          None if ground_truths is None else ground_truths[i])
               for i, (frames, audio) in enumerate(clips)]
    if not results:
        raise ValueError("probe_batch: no clips")
    m = [r.metrics for r in results]
    sync = [impact_sync([i["time"] for i in r.impacts], r.onsets, fps) for r in results]
    checks = {"clips_tracked": sum(is_tracked(r.tracks) for r in results),
              "clips_in_sync": sum(s["ok"] for s in sync), "sync_f1_mean": _mean([s["f1"] for s in sync]),
              "clips_gravity_ok": sum(gravity_ok(x["gravity"], world_config.gravity) for x in m)}
    if captions is not None:
        colour = [colour_match(c, r.track_colors, world_config.colors) for c, r in zip(captions, results)]
        checks.update(clips_colour_match=sum(c is True for c in colour),
                      clips_naming_colour=sum(c is not None for c in colour))
    g = np.array([x["gravity"] for x in m])
    g = g[np.isfinite(g)]
    rest = np.array([i["restitution"] for r in results for i in r.impacts if i["restitution"] is not None])
    rel_error = float(abs(np.median(g) - world_config.gravity) / world_config.gravity) if g.size else NAN
    out = {"clips": len(results), "clips_with_gravity": int(g.size), "gravity_mean": _mean(g),
           "gravity_median": float(np.median(g)) if g.size else NAN,
           "gravity_std": float(g.std()) if g.size else NAN,
           "gravity_rel_error": rel_error,
           "gravity_cv": _robust_cv(np.concatenate([r.gravity_segments for r in results])),
           "restitution_mean": _mean(rest), "energy_gain_fraction": _mean(rest > 1),
           "impacts_per_clip": _mean([x["impacts"] for x in m]),
           **_sync_metrics(np.concatenate([r.sync_errors_ms for r in results]), sum(x["onsets"] for x in m), fps),
           **checks}
    if ground_truths is not None:
        total = {k: sum(x[k] for x in m) for k in ("impacts_true", "impacts_found", "impacts_matched",
                                                    "impacts_visible", "impacts_matched_visible", "impacts_real")}
        ratio = lambda a, b: total[a] / total[b] if total[b] else NAN  # noqa: E731
        time_errors = [x["impact_time_error_ms"] for x in m for _ in range(x["impacts_matched"])]
        positions = [x["position_error_px"] for x in m if np.isfinite(x["position_error_px"])]
        out.update({"tracked_fraction": _mean([x["tracked_fraction"] for x in m]),
                    "position_error_px": _mean(positions),
                    "impact_recall": ratio("impacts_matched", "impacts_true"),
                    "impact_recall_visible": ratio("impacts_matched_visible", "impacts_visible"),
                    "impact_precision": ratio("impacts_real", "impacts_found"),
                    "impact_time_error_ms": _mean(time_errors)})
    return {prefix + k: v for k, v in out.items()}
