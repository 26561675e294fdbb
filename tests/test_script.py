"""Timed multi-shot scripts (issue 16): parsing, snapping cuts to the timing contract, errors naming the line,
and which text tokens each video / audio latent step may attend to."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.script import ScriptError, parse_script, read_script, shot_mask, window_shots
from sora.timeline import Timeline

TL = Timeline(seconds=4.0, fps=8)  # video latent steps every 0.5 s, one frame 0.125 s, quantum 1 s

TEXT = """# two shots
global: a bouncing-ball world
0-2s: a red ball bounces on a gray floor | sound: a click at each bounce
2\u20134 s: a blue ball rolls in
"""


def test_plain_text_yaml_and_json_give_one_script(tmp_path):
    script = parse_script(TEXT, TL)
    assert [(s.start, s.end, s.caption, s.sound, s.line) for s in script.shots] == [
        (0.0, 2.0, "a red ball bounces on a gray floor", "a click at each bounce", 3),
        (2.0, 4.0, "a blue ball rolls in", "", 4)]
    assert script.global_caption == "a bouncing-ball world" and script.cuts == (2.0,) and script.seconds == 4.0
    assert script.captions() == ["a red ball bounces on a gray floor. Sound: a click at each bounce",
                                 "a blue ball rolls in"]
    data = {"global": "a bouncing-ball world", "shots": [
        {"start": 0, "end": 2, "caption": "a red ball bounces on a gray floor", "sound": "a click at each bounce"},
        {"start": 2, "end": 4, "caption": "a blue ball rolls in"}]}
    yaml_text = ("global: a bouncing-ball world\nshots:\n"
                 "  - {start: 0, end: 2, caption: a red ball bounces on a gray floor, sound: a click at each bounce}\n"
                 "  - {start: 2, end: 4, caption: a blue ball rolls in}\n")
    for text in (json.dumps(data), yaml_text, json.dumps(data["shots"])):
        other = parse_script(text, TL)
        assert [(s.start, s.end, s.caption, s.sound) for s in other.shots] == \
            [(s.start, s.end, s.caption, s.sound) for s in script.shots]
    path = tmp_path / "shots.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert read_script(path, TL).shots == script.shots


def test_cuts_snap_to_latent_steps_within_a_frame():
    script = parse_script("0-1.45s: a\n1.45-4s: b", TL)  # 1.45 is 0.05 s from 1.5: snapped
    assert script.cuts == (1.5,)


@pytest.mark.parametrize("text,error", [
    ("0-1.3s: a\n1.3-4s: b", r"<script>:1: a cut at 1.3 s is not on a video latent step \(every 0.5 s here: the VAE "
                             r"encodes 4 frames together\); use 1 s or 1.5 s"),
    ("0-2s: a\n2.5-4s: b", r"<script>:2: the shot starts at 2.5 s but the previous one ends at 2 s \(a gap\)"),
    ("0-2s: a\n1.5-4s: b", r"<script>:2: .* \(an overlap\)"),
    ("0-2s: a\nthen a blue ball", r"<script>:2: expected 'START-ENDs: caption'"),
    ("0-2s: a\n2-3.5s: b", r"<script>:2: the script lasts 3.5 s; clips must be a multiple of 1 s .* \(e.g. 4 s\)"),
    ("0-2s: a | loud", r"<script>:1: after '\|' expected 'sound: ...'"),
    ("0-2s:\n2-4s: b", r"<script>:1: the shot has no caption"),
    ("2-0s: a", r"<script>:1: the shot ends \(0 s\) before it starts \(2 s\)"),
    ("# nothing", r"<script>: no shot"),
    ("shots:\n  - {start: 0, caption: a}\n", r"<script>:2: shot 1 needs start, end and caption"),
    ("{shots: [", r"<script>:1: not valid YAML/JSON"),
])
def test_errors_name_the_line(text, error):
    with pytest.raises(ScriptError, match=error):
        parse_script(text, TL)


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(1, 15), unique=True, max_size=5), fps=st.sampled_from([8, 16, 24]),
       stride=st.sampled_from([2, 4]))
def test_every_step_belongs_to_the_shot_that_holds_it(cuts, fps, stride):
    tl = Timeline(seconds=4.0, fps=fps, vae_time_stride=stride)
    step = stride / fps
    bounds = sorted({0.0, *(c * step for c in cuts if c * step < 4.0), 4.0})
    text = "\n".join(f"{a:g}-{b:g}s: shot {i}" for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
    script = parse_script(text, tl)
    assert len(script.shots) == len(bounds) - 1
    for j, (shot, (lo, hi)) in enumerate(zip(script.video_shots(tl), tl.video_token_spans())):
        s = script.shots[shot]
        assert s.start - 1e-9 <= lo and hi <= s.end + 1e-9, (j, lo, hi, s)
    mids = tl.audio_token_times()
    for shot, mid in zip(script.audio_shots(tl), mids):
        s = script.shots[shot]
        assert s.start - 1e-9 <= mid <= s.end + 1e-9
    lengths = [2 + i for i in range(len(script.shots))]
    mask = shot_mask(script, tl, lengths, global_length=3)
    assert mask.shape == (tl.video_latent_steps + tl.audio_latent_steps, 3 + sum(lengths))
    assert mask[:, :3].all()  # the global caption is seen by every token
    owners = np.repeat(np.arange(len(lengths)), lengths)
    rows = np.concatenate([script.video_shots(tl), script.audio_shots(tl)])
    assert np.array_equal(mask[:, 3:], owners[None] == rows[:, None])  # and its own shot's caption only
    with pytest.raises(ValueError, match="caption lengths"):
        shot_mask(script, tl, lengths + [1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0.05, 3)), min_size=1, max_size=6),
       st.floats(0, 12), st.floats(0.25, 4), st.sampled_from([0.0, 1 / 16]))
def test_window_shots_cover_the_clip_in_order(rows, start, seconds, min_seconds):
    """Timed caption rows (gaps allowed) seen through a window: only overlapping rows, in clip seconds, in
    order, covering [0, seconds] without gaps; every kept row's start is where it starts in the window."""
    shots, t = [], 0.0
    for gap, length in rows:  # sorted, non-overlapping rows with gaps
        shots.append({"start": t + gap, "end": t + gap + length, "caption": f"shot {len(shots)}", "scene": 7})
        t += gap + length
    out = window_shots(shots, start, seconds, min_seconds)
    overlapping = [r for r in shots if min(r["end"], start + seconds) - max(r["start"], start) > min_seconds]
    if not overlapping:
        assert out == []
        return
    assert [r["caption"] for r in out] == [r["caption"] for r in overlapping][-len(out):]
    assert out[0]["start"] == 0.0 and out[-1]["end"] == seconds and all(r["scene"] == 7 for r in out)
    assert all(a["end"] == b["start"] for a, b in zip(out, out[1:]))
    for r in out[1:]:
        src = next(s for s in shots if s["caption"] == r["caption"])
        assert r["start"] == pytest.approx(src["start"] - start)


def test_window_shots_names_a_bad_row():
    with pytest.raises(ValueError, match=r"shots row 1: need start < end"):
        window_shots([{"start": 0, "end": 1, "caption": "a"}, {"start": 2, "end": 1, "caption": "b"}], 0, 2)
    with pytest.raises(ValueError, match="shots row 0"):
        window_shots([{"start": 0, "end": 1}], 0, 2)
    with pytest.raises(ValueError, match="not a list"):
        window_shots({"start": 0}, 0, 2)
