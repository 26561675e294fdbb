"""Timed multi-shot scripts: which caption holds over which seconds of a clip, on the timing contract.

Plain text, one shot a line (``#`` starts a comment; an optional ``global:`` line is seen by every
shot; a shot's sound description follows ``|  sound:``)::

    global: a bouncing-ball world, side view
    0-2s: a red ball bounces on a gray floor | sound: a bright click at each bounce
    2-4s: the red ball rolls to a stop

or the same as YAML / JSON: ``{global: ..., shots: [{start: 0, end: 2, caption: ..., sound: ...}]}``
(or just the list of shots). Shots follow each other without gaps from 0 s; the last one ends the
clip. A cut must fall on a video latent step (every ``vae_time_stride / fps`` seconds: the VAE
encodes those frames together): a cut within one frame of such a boundary is snapped to it, any
other is an error naming the line and the nearest allowed times. The clip length must be one the
timeline allows (:attr:`Timeline.quantum`).

Token assignment: a video latent step belongs to the shot holding its span (cuts are on step
boundaries, so exactly one); an audio latent step to the shot holding its middle (an audio step
may straddle a cut by less than one step). :func:`shot_mask` turns that into the mask of which
text tokens each video/audio token may attend to: its own shot's caption and the global one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from sora.timeline import Timeline

_LINE = re.compile(r"^\s*(?P<t0>\d+(?:\.\d+)?)\s*s?\s*[-\u2013\u2014]\s*(?P<t1>\d+(?:\.\d+)?)\s*s?\s*:\s*(?P<rest>.*)$")


class ScriptError(ValueError):
    """A script that does not parse or does not fit the timeline; the message names the line."""


@dataclass(frozen=True)
class Shot:
    start: float  # seconds, on a video latent step boundary
    end: float
    caption: str
    sound: str = ""
    line: int = 0  # where it was written (1-based; 0: built in code)


@dataclass(frozen=True)
class Script:
    shots: tuple[Shot, ...]
    global_caption: str = ""
    source: str = "<script>"
    cuts: tuple[float, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "cuts", tuple(s.start for s in self.shots[1:]))

    @property
    def seconds(self) -> float:
        return self.shots[-1].end

    def captions(self) -> list[str]:
        """Each shot's text as the DiT reads it: its caption, then its sound description."""
        return [s.caption if not s.sound else f"{s.caption}. Sound: {s.sound}" for s in self.shots]

    def video_shots(self, timeline: Timeline) -> np.ndarray:
        """int [video_latent_steps]: the shot of each video latent step (the step's span lies in it)."""
        ends = timeline.video_token_spans()[:, 1]
        shot_ends = np.array([s.end for s in self.shots])
        return np.searchsorted(shot_ends, ends - 1e-9, side="left").clip(0, len(self.shots) - 1)

    def audio_shots(self, timeline: Timeline) -> np.ndarray:
        """int [audio_latent_steps]: the shot holding the middle of each audio latent step."""
        mids = timeline.audio_token_times()
        return np.searchsorted(np.array([s.end for s in self.shots]), mids, side="right").clip(0, len(self.shots) - 1)


def window_shots(shots: list[dict], start: float, seconds: float, min_seconds: float = 0.0) -> list[dict]:
    """Timed caption rows (``{"start", "end", "caption", ...}`` in a source's seconds: a shard's ``shots``) as
    seen by a clip cut at ``[start, start + seconds]``: the rows overlapping it, in clip seconds, made to cover
    the clip without gaps (a row runs on to the next one's start; the first starts at 0, the last ends the
    clip), other keys kept. Cuts need not fall on latent steps here: each token takes the shot of its span
    (:meth:`Script.video_shots`), as a real clip's cuts fall. Rows with less than ``min_seconds`` in the window
    (e.g. one frame) are left out, their time going to a neighbour. [] when no row overlaps. A malformed row
    raises ValueError naming it."""
    if not isinstance(shots, list):
        raise ValueError(f"shots is a {type(shots).__name__}, not a list of rows")
    for i, r in enumerate(shots):
        ok = isinstance(r, dict) and isinstance(r.get("caption"), str) and all(
            isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in ("start", "end"))
        if not ok or not r["start"] < r["end"]:
            raise ValueError(f"shots row {i}: need start < end (seconds) and a caption, got {str(r)[:120]}")
    end = start + seconds
    rows = sorted((r for r in shots if min(float(r["end"]), end) - max(float(r["start"]), start) > min_seconds),
                  key=lambda r: float(r["start"]))
    out = [{**r, "start": max(0.0, float(r["start"]) - start)} for r in rows]
    for i, r in enumerate(out):
        r["end"] = out[i + 1]["start"] if i + 1 < len(out) else float(seconds)
    if out:
        out[0]["start"] = 0.0
    return [r for r in out if r["end"] > r["start"]]


def parse_script(text: str, timeline: Timeline, source: str = "<script>") -> Script:
    """Parse a script (plain text, YAML or JSON; see the module doc) against ``timeline`` (its fps and VAE
    stride decide where cuts may fall); ScriptError naming ``source`` and the line otherwise."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[", "- ")) or re.search(r"^shots\s*:", text, re.MULTILINE):  # YAML / JSON
        return _from_data(text, timeline, source)
    shots, global_caption = [], ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower().startswith("global:"):
            global_caption = line.split(":", 1)[1].strip()
            continue
        m = _LINE.match(line)
        if m is None:
            raise ScriptError(f"{source}:{number}: expected 'START-ENDs: caption' (e.g. '0-2s: a red ball bounces'), "
                              f"got {raw.strip()!r}")
        caption, _, sound = m["rest"].partition("|")
        sound = sound.strip()
        if sound and not sound.lower().startswith("sound:"):
            raise ScriptError(f"{source}:{number}: after '|' expected 'sound: ...', got {sound!r}")
        shots.append((float(m["t0"]), float(m["t1"]), caption.strip(), sound.split(":", 1)[1].strip() if sound
                      else "", number))
    return _build(shots, global_caption, timeline, source)


def read_script(path: str | Path, timeline: Timeline) -> Script:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScriptError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return parse_script(text, timeline, str(path))


def _from_data(text: str, timeline: Timeline, source: str) -> Script:
    import yaml  # JSON is YAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ScriptError(f"{source}{where}: not valid YAML/JSON ({getattr(e, 'problem', None) or e})") from None
    if isinstance(data, list):
        data = {"shots": data}
    if not isinstance(data, dict) or not isinstance(data.get("shots"), list):
        raise ScriptError(f"{source}: expected {{global: ..., shots: [{{start, end, caption, sound}}, ...]}}")
    lines = _item_lines(text)
    shots = []
    for i, item in enumerate(data["shots"]):
        line = lines[i] if i < len(lines) else 0
        if not isinstance(item, dict) or not {"start", "end", "caption"} <= item.keys():
            raise ScriptError(f"{source}:{line}: shot {i + 1} needs start, end and caption, got {item!r}")
        try:
            t0, t1 = float(item["start"]), float(item["end"])
        except (TypeError, ValueError):
            raise ScriptError(f"{source}:{line}: shot {i + 1}: start/end must be seconds") from None
        shots.append((t0, t1, str(item["caption"]).strip(), str(item.get("sound") or "").strip(), line))
    return _build(shots, str(data.get("global") or "").strip(), timeline, source)


def _item_lines(text: str) -> list[int]:
    """Best-effort line numbers of the shots in a YAML/JSON text: lines that open a shot."""
    opens = [i for i, line in enumerate(text.splitlines(), 1)
             if re.match(r"^\s*(-\s*)?[{]?\s*\"?start\"?\s*:", line) or re.match(r"^\s*-\s*\{", line)]
    return opens


def _build(shots: list[tuple], global_caption: str, timeline: Timeline, source: str) -> Script:
    if not shots:
        raise ScriptError(f"{source}: no shot (one a line, e.g. '0-2s: a red ball bounces')")
    step = Fraction(timeline.vae_time_stride) / timeline.fps_q  # seconds per video latent step
    frame = 1 / timeline.fps_q
    out, previous_end = [], Fraction(0)
    for t0, t1, caption, sound, line in shots:
        where = f"{source}:{line}" if line else source
        if not caption:
            raise ScriptError(f"{where}: the shot has no caption")
        if not t1 > t0:
            raise ScriptError(f"{where}: the shot ends ({t1:g} s) before it starts ({t0:g} s)")
        start, end = (_snap(t, step, frame, where) for t in (t0, t1))
        if start != previous_end:
            what = "a gap" if start > previous_end else "an overlap"
            raise ScriptError(f"{where}: the shot starts at {float(start):g} s but the previous one ends at "
                              f"{float(previous_end):g} s ({what}); shots follow each other from 0 s")
        if end <= start:
            raise ScriptError(f"{where}: the shot is shorter than one latent step ({float(step):g} s) once snapped")
        out.append(Shot(float(start), float(end), caption, sound, line))
        previous_end = end
    total = previous_end
    if total % timeline.quantum:
        last = shots[-1][4]
        raise ScriptError(f"{source}:{last}: the script lasts {float(total):g} s; clips must be a multiple of "
                          f"{float(timeline.quantum):g} s on this timeline (e.g. {timeline.nearest_seconds(float(total)):g} s)")
    return Script(tuple(out), global_caption, source)


def _snap(t: float, step: Fraction, frame: Fraction, where: str) -> Fraction:
    """``t`` seconds -> the video latent step boundary within one frame of it; ScriptError otherwise."""
    q = Fraction(t).limit_denominator(10**6)
    k = round(q / step)
    if abs(q - k * step) <= frame / 2 + Fraction(1, 10**6):
        return k * step
    lo, hi = math.floor(q / step) * step, math.ceil(q / step) * step
    raise ScriptError(f"{where}: a cut at {t:g} s is not on a video latent step (every {float(step):g} s here: "
                      f"the VAE encodes {int(step / frame)} frames together); use {float(lo):g} s or {float(hi):g} s")


def shot_mask(script: Script, timeline: Timeline, text_lengths: list[int], global_length: int = 0) -> np.ndarray:
    """bool [video_latent_steps + audio_latent_steps, text tokens]: may a video latent step (the first rows; all the
    tokens of a step share its row) or an audio latent step (the last rows) attend to a text token? Text tokens are
    laid out as the global caption's ``global_length`` tokens, then each shot's ``text_lengths[i]`` tokens in
    order. A step sees the global caption and its own shot's caption."""
    if len(text_lengths) != len(script.shots):
        raise ValueError(f"{len(text_lengths)} caption lengths for {len(script.shots)} shots")
    owner = np.concatenate([np.full(global_length, -1), np.repeat(np.arange(len(text_lengths)), text_lengths)])
    steps = np.concatenate([script.video_shots(timeline), script.audio_shots(timeline)])
    return (owner[None] == -1) | (owner[None] == steps[:, None])
