"""Per-clip checks (sora.evaluation.checks): known answers, and that each separates right from wrong
on real held-out world clips (their own sound / caption against another clip's)."""

import numpy as np
import pytest

from sora.data.world import BouncingWorld, WorldConfig
from sora.evaluation.checks import (colour_match, gravity_ok, impact_sync, is_tracked, match_times,
                                    named_ball_colours)
from sora.evaluation.physics import probe_batch

DEMO = WorldConfig(width=32, height=32, fps=16, seconds=2.0)   # the quickstart's evaluation clips
GPU = WorldConfig(width=64, height=64, fps=24, seconds=2.0)    # the one-GPU preset's


def test_match_times_is_one_to_one_within_tolerance():
    pairs = match_times(np.array([0.10, 0.12, 0.50]), np.array([0.11, 0.9]), 0.05)
    assert pairs.tolist() == [[0, 0]] or pairs.tolist() == [[1, 0]]
    assert match_times(np.zeros(0), np.array([1.0]), 0.1).shape == (0, 2)


def test_impact_sync_known_answers():
    fps = 16.0
    assert impact_sync([0.5, 1.2], [0.52, 1.19], fps) == {"matched": 2, "f1": 1.0, "ok": True}
    late = impact_sync([0.5, 1.2], [0.5 + 1.5 / fps, 1.2 + 1.5 / fps], fps)  # 1.5 frames late
    assert late["matched"] == 0 and not late["ok"]
    # a sound with no picture event counts against the clip: 2 impacts, 4 onsets -> F1 2/3
    assert impact_sync([0.5, 1.2], [0.5, 1.2, 0.8, 1.6], fps)["ok"]
    assert not impact_sync([0.5, 1.2], [0.5, 1.2, 0.8, 1.6, 1.8], fps)["ok"]
    assert not impact_sync([], [0.3], fps)["ok"] and not impact_sync([], [], fps)["ok"]


def test_tracked_gravity_and_colours_known_answers():
    track = np.full((2, 10, 2), np.nan)
    track[0, :4] = 1.0
    assert not is_tracked(track) and not is_tracked(np.zeros((0, 10, 2)))
    track[1, 2:7] = 1.0
    assert is_tracked(track)
    assert gravity_ok(9.0, 9.81) and not gravity_ok(7.5, 9.81) and not gravity_ok(float("nan"), 9.81)
    palette = WorldConfig().colors
    caption = "two small red balls and a large blue ball bounce on a green floor"
    assert named_ball_colours(caption, palette) == {"red", "blue"}  # green is the floor
    assert colour_match(caption, ["blue", "red", "red"], palette) is True
    assert colour_match(caption, ["blue"], palette) is False
    assert colour_match("bouncing things", ["red"], palette) is None


@pytest.mark.parametrize("world", [DEMO, GPU], ids=["32px-16fps", "64px-24fps"])
def test_sync_and_colour_checks_separate_real_from_shuffled_pairs(world):
    clips = list(BouncingWorld(world, seed=1000, length=16))  # held-out seeds, as sora-demo's eval
    captions = [c.caption for c in clips]
    real = probe_batch([(c.frames, c.audio) for c in clips], world.fps, world.sample_rate, world, captions=captions)
    other = probe_batch([(c.frames, clips[(i + 1) % 16].audio) for i, c in enumerate(clips)], world.fps,
                        world.sample_rate, world, captions=captions[1:] + captions[:1])
    # measured: in sync 16/16 real vs 2/16 (32 px) and 1/16 (64 px) shuffled; colours 16/16 vs 1/16
    assert real["physics/clips_in_sync"] >= 15 and other["physics/clips_in_sync"] <= 3
    assert real["physics/clips_colour_match"] >= 15 and other["physics/clips_colour_match"] <= 3
    assert real["physics/clips_naming_colour"] == 16
    assert real["physics/clips_tracked"] >= 15 and real["physics/clips_gravity_ok"] >= 15
    assert other["physics/clips_tracked"] == real["physics/clips_tracked"]  # same pictures
