"""Timed captions for ``sora-make-shards`` (:mod:`sora.data.shards`): which caption holds over which
seconds of a video.

A sidecar ``clip.shots.json`` beside ``clip.mp4`` (or a ``shots`` field in a JSONL ``--captions``
row) holds a JSON list of ``[t0, t1, caption]`` rows: seconds of the video, ``0 <= t0 < t1``, sorted,
not overlapping (gaps allowed), ``t1`` at most one frame past the video's end, the caption a string.
A sample stores them as ``"shots": [{"start": t0, "end": t1, "caption": c}, ...]`` (the schema of the
world's multi-shot clips, :func:`sora.data.world.make_multishot`, which the data pipeline reads).
A row that breaks a rule raises :class:`TimedCaptionError` naming the file and the row (counted
from 1).  A piece of a video (a ``--max-seconds`` segment, a scene) keeps the rows overlapping it,
clipped to it and shifted to its start (:func:`clip_shots`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

EPS = 1e-6  # seconds of slack in time comparisons


class TimedCaptionError(ValueError):
    """A sidecar or manifest ``shots`` that breaks the format; the message names the file and row."""


def read_sidecar(path: str | Path, name: str) -> list:
    """The JSON of a ``.shots.json`` sidecar (``name`` is how messages call it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TimedCaptionError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TimedCaptionError(f"{name}: not JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise TimedCaptionError(f"{name}: cannot read ({e.strerror})") from None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_shots(rows, name: str, duration: float, fps: float) -> list[dict]:
    """Validate ``[t0, t1, caption]`` rows against a video of ``duration`` seconds at ``fps``;
    returns them as ``{"start", "end", "caption"}`` dicts.  TimedCaptionError naming ``name`` and
    the row otherwise."""
    if not isinstance(rows, list):
        raise TimedCaptionError(f"{name}: expected a JSON list of [t0, t1, caption] rows, "
                                f"got a {type(rows).__name__}")
    limit = duration + 1.0 / fps
    shots = []
    for i, row in enumerate(rows, 1):
        where = f"{name} row {i}"
        if not (isinstance(row, list) and len(row) == 3 and _number(row[0]) and _number(row[1])):
            raise TimedCaptionError(f"{where}: expected [t0, t1, caption] with t0, t1 in seconds, "
                                    f"got {json.dumps(row)[:80]}")
        t0, t1, caption = float(row[0]), float(row[1]), row[2]
        if not isinstance(caption, str):
            raise TimedCaptionError(f"{where}: the caption is a {type(caption).__name__}, not text")
        if t0 < 0:
            raise TimedCaptionError(f"{where}: t0 = {t0:g} is before the start (0 s)")
        if t1 <= t0:
            raise TimedCaptionError(f"{where}: t1 = {t1:g} is not after t0 = {t0:g}")
        if shots and t0 < shots[-1]["start"]:
            raise TimedCaptionError(f"{where}: not sorted (starts at {t0:g} s, before row {i - 1}'s "
                                    f"{shots[-1]['start']:g} s)")
        if shots and t0 < shots[-1]["end"] - EPS:
            raise TimedCaptionError(f"{where}: overlaps row {i - 1} (starts at {t0:g} s, before its end "
                                    f"{shots[-1]['end']:g} s)")
        if t1 > limit + EPS:
            raise TimedCaptionError(f"{where}: t1 = {t1:g} is past the video's end ({duration:.3f} s)")
        shots.append({"start": t0, "end": t1, "caption": caption.strip()})
    return shots


def load_shots(sidecar: str | None, rows, name: str, duration: float, fps: float) -> list[dict] | None:
    """The rows of the ``sidecar`` file (else ``rows``, a manifest's) checked against the video; None
    when there are none."""
    if sidecar is None and rows is None:
        return None
    return check_shots(read_sidecar(sidecar, name) if sidecar else rows, name, duration, fps)


def clip_shots(shots: list[dict], start: float, end: float, fps: float) -> list[dict]:
    """The rows as a piece ``[start, end)`` of the video sees them: those overlapping it, clipped to
    it and shifted so the piece starts at 0; rows shorter than one frame after clipping are dropped.
    Other keys of a row are kept."""
    out = []
    for r in shots:
        t0, t1 = max(r["start"], start) - start, min(r["end"], end) - start
        if t1 - t0 >= 1.0 / fps - EPS:
            out.append({**r, "start": round(t0, 6), "end": round(t1, 6)})
    return out


def with_shots(meta: dict, shots: list[dict] | None, start: float, fps: float, caption_from_shots: bool) -> dict:
    """The json ``meta`` of a piece starting at ``start`` s of its video with the shots it sees (rows
    shorter than a frame at ``fps`` dropped; no ``shots`` key when none) and, when
    ``caption_from_shots``, the caption made of them: their captions joined with a space."""
    if shots is None:
        return meta
    mine = clip_shots(shots, start, start + meta["duration"], fps)
    caption = " ".join(r["caption"] for r in mine if r["caption"]) if caption_from_shots else meta["caption"]
    return {**meta, "caption": caption, **({"shots": mine} if mine else {})}
