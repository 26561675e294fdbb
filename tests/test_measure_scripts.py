"""tools/measure_scripts.py's cut and floor detectors on real world clips: they must find a real cut at its
frame, no cut in a single-scene clip, and each clip's own floor colour, before they judge generated clips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sora.data.world import WorldConfig, make_clip

TOOL = Path(__file__).resolve().parents[1] / "tools" / "measure_scripts.py"
spec = importlib.util.spec_from_file_location("measure_scripts", TOOL)
ms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ms)

WORLD = WorldConfig(width=32, height=32, fps=16, seconds=2.0, sample_rate=16000)


def test_detectors_separate_real_cuts_from_single_scenes():
    pairs = ms.pairs_of(1000, 8, WORLD)
    assert all(a.meta["floor_color"] != b.meta["floor_color"] for a, b in pairs)
    for a, b in pairs:
        for cut in (5, 16, 27):
            joined = np.concatenate([a.frames[:cut], b.frames[cut:]])
            assert ms.detect_cut(joined, WORLD.floor_y, 20.0) == cut
        assert ms.detect_cut(a.frames, WORLD.floor_y, 20.0) is None
        assert ms.floor_name(a.frames, WORLD) == a.meta["floor_color"]
        assert ms.floor_name(b.frames, WORLD) == b.meta["floor_color"]
    # the same floor on both sides of a cut shows no floor jump: the detector does not invent one
    same = next(make_clip(s, WORLD) for s in range(2000, 2100) if make_clip(s, WORLD).meta["floor_color"]
                == pairs[0][0].meta["floor_color"])
    joined = np.concatenate([pairs[0][0].frames[:16], same.frames[16:]])
    assert ms.detect_cut(joined, WORLD.floor_y, 20.0) is None


def test_judge_scores_a_real_joined_clip_as_right_and_a_swapped_one_as_wrong():
    (a, b), tl = ms.pairs_of(1000, 1, WORLD)[0], _timeline()
    n, cut = tl.num_samples, 16
    frames = np.concatenate([a.frames[:cut], b.frames[cut:]])
    audio = np.concatenate([a.audio[:, :16000], b.audio[:, 16000:n]], axis=1)
    right = ms.judge(frames, audio, (a.caption, b.caption), cut, tl, WORLD, 20.0)
    assert right["error"] == 0 and right["floors"] == [True, True]
    wrong = ms.judge(frames, audio, (b.caption, a.caption), cut, tl, WORLD, 20.0)
    assert wrong["floors"] == [False, False]


def _timeline():
    from sora.timeline import Timeline

    return Timeline(seconds=2.0, fps=16, sample_rate=16000)
