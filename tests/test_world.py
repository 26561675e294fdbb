"""Tests of the bouncing-ball world: timing contract, determinism, exact physics, sync, captions."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.data.world import (COUNT_WORDS, FLOOR_SHADE, PALETTE, BouncingWorld, WorldClip, WorldConfig,
                             clip_seed, make_clip, synthesize_audio)

seeds = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=25, deadline=None)


def ball_intervals(meta, b):
    """(t_start, t_end, kind) pieces of ball ``b``'s vertical motion between floor/ceiling impacts."""
    ball, cfg_rest = meta["balls"][b], WorldConfig().rest_speed
    hits = [i for i in meta["impacts"] if i["ball"] == b and i["surface"] in ("floor", "ceiling")]
    pieces, t0, kind = [], 0.0, "start"
    for h in hits:
        pieces.append((t0, h["time"], kind, h))
        t0, kind = h["time"], h["surface"]
        if h["surface"] == "floor" and h["speed"] * ball["restitution"] < cfg_rest:
            kind = "rest"
            break
    pieces.append((t0, meta["seconds"], kind, None))
    return pieces


# -- timing contract, dtypes, ranges ---------------------------------------------------------------
@pytest.mark.parametrize("seconds,fps,sr,frames,samples", [
    (2.0, 24.0, 16000, 49, 32000), (1.0, 30.0, 8000, 31, 8000), (0.5, 25.0, 22050, 13, 11025),
    (3.0, 12.0, 44100, 37, 132300), (1.5, 29.97, 16000, 46, 24000)])
def test_shapes_follow_timing_contract(seconds, fps, sr, frames, samples):
    cfg = WorldConfig(seconds=seconds, fps=fps, sample_rate=sr, width=48, height=40)
    clip = make_clip(3, cfg)
    assert clip.frames.shape == (frames, 40, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (1, samples) and clip.audio.dtype == np.float32
    assert np.all(np.abs(clip.audio) <= 1.0)
    assert clip.fps == fps and clip.sample_rate == sr
    assert all(len(traj) == frames for traj in clip.meta["trajectory"])
    assert len(clip.meta["trajectory"]) == len(clip.meta["balls"])


@FAST
@given(seed=seeds, w=st.integers(16, 80), h=st.integers(16, 80), seconds=st.sampled_from([0.5, 1.0, 2.0]),
       fps=st.sampled_from([8.0, 24.0, 30.0]), sr=st.sampled_from([8000, 16000, 24000]))
def test_any_config_is_well_formed(seed, w, h, seconds, fps, sr):
    cfg = WorldConfig(width=w, height=h, seconds=seconds, fps=fps, sample_rate=sr, max_balls=4)
    clip = make_clip(seed, cfg)
    assert clip.frames.shape == (round(seconds * fps) + 1, h, w, 3)
    assert clip.audio.shape == (1, round(seconds * sr))
    assert np.isfinite(clip.audio).all() and np.abs(clip.audio).max() <= 1.0
    meta = clip.meta
    assert cfg.min_balls <= len(meta["balls"]) <= cfg.max_balls
    for b, ball in enumerate(meta["balls"]):  # every centre stays inside the box
        xy, r = np.array(meta["trajectory"][b]), ball["radius_px"]
        assert np.all(xy[:, 0] >= r - 1e-6) and np.all(xy[:, 0] <= w - r + 1e-6)
        assert np.all(xy[:, 1] >= r - 1e-6) and np.all(xy[:, 1] <= meta["floor_y"] - r + 1e-6)
    times = [i["time"] for i in meta["impacts"]]
    assert times == sorted(times) and all(0 < t < seconds for t in times)
    assert all(i["sample"] == round(i["time"] * sr) for i in meta["impacts"])


def test_meta_is_json_serializable_plain_python():
    meta = make_clip(11, WorldConfig(max_balls=5)).meta
    assert json.loads(json.dumps(meta)) == meta
    assert set(meta) >= {"seed", "fps", "sample_rate", "seconds", "width", "height", "gravity_px",
                         "pixels_per_metre", "floor_y", "balls", "impacts", "trajectory"}
    assert meta["gravity_px"] == pytest.approx(9.81 * meta["pixels_per_metre"])


# -- determinism and the dataset ---------------------------------------------------------------------
def test_same_seed_same_clip_different_seed_different_clip():
    a, b, c = make_clip(7), make_clip(7), make_clip(8)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert a.meta == b.meta and a.caption == b.caption and a == b
    assert not np.array_equal(a.frames, c.frames) and a.meta != c.meta and a != c
    assert len({make_clip(s).meta["trajectory"][0][0][0] for s in range(20)}) == 20


def test_bouncing_world_indexing_and_iteration():
    cfg = WorldConfig(seconds=0.5)
    world = BouncingWorld(cfg, seed=3, length=4)
    assert len(world) == 4
    assert world[2] == make_clip(clip_seed(3, 2), cfg)
    assert world[-1] == world[3]
    assert [c.meta["seed"] for c in world] == [clip_seed(3, i) for i in range(4)]
    with pytest.raises(IndexError):
        world[4]
    infinite = BouncingWorld(cfg, seed=3)
    with pytest.raises(TypeError):
        len(infinite)
    it = iter(infinite)
    assert next(it) == world[0] and next(it) == world[1]
    assert BouncingWorld(cfg, seed=4)[0] != world[0]
    assert isinstance(world[0], WorldClip)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="colour"):
        WorldConfig(colors=("mauve",))
    with pytest.raises(ValueError, match="restitution"):
        WorldConfig(restitution=(0.5, 1.2))
    with pytest.raises(ValueError, match="balls"):
        WorldConfig(min_balls=3, max_balls=2)


# -- physics -------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds)
def test_flight_is_a_parabola_with_configured_gravity_touching_the_floor(seed):
    cfg = WorldConfig(fps=30.0, seconds=3.0)
    meta = make_clip(seed, cfg).meta
    g, floor_y, fitted = meta["gravity_px"], meta["floor_y"], 0
    times = np.arange(cfg.num_frames) / cfg.fps
    for b, ball in enumerate(meta["balls"]):
        y, r = np.array(meta["trajectory"][b])[:, 1], ball["radius_px"]
        for t0, t1, kind, end in ball_intervals(meta, b):
            inside = (times > t0 + 1e-9) & (times < t1 - 1e-9)
            if kind == "rest":  # resting on the floor: constant height
                assert np.allclose(y[inside], floor_y - r)
                continue
            if inside.sum() < 4:
                continue
            a2, a1, a0 = np.polyfit(times[inside], y[inside], 2)
            assert 2 * a2 == pytest.approx(g, rel=0.01)
            fitted += 1
            for t, h in ((t0, kind), (t1, end and end["surface"])):  # extrapolate to the impacts
                if h == "floor":
                    assert abs(a2 * t * t + a1 * t + a0 + r - floor_y) < 0.5
    for imp in meta["impacts"]:
        ball = meta["balls"][imp["ball"]]
        if imp["surface"] == "floor":
            assert imp["y"] + ball["radius_px"] == pytest.approx(floor_y, abs=1e-9)
        elif imp["surface"] == "right":
            assert imp["x"] + ball["radius_px"] == pytest.approx(meta["width"], abs=1e-9)
    assert fitted >= 1


def test_typical_clip_has_several_impacts():
    counts = [len(make_clip(s).meta["impacts"]) for s in range(40)]
    assert np.median(counts) >= 3 and min(counts) >= 1


def test_balls_come_to_rest_without_endless_micro_bounces():
    cfg = WorldConfig(seconds=30.0, fps=4.0, sample_rate=4000, min_balls=3, max_balls=3)
    for seed in range(3):
        meta = make_clip(seed, cfg).meta
        assert len(meta["impacts"]) < 400
        for b, ball in enumerate(meta["balls"]):
            last_y = np.array(meta["trajectory"][b])[-8:, 1]
            assert np.allclose(last_y, meta["floor_y"] - ball["radius_px"])
            floor = [i for i in meta["impacts"] if i["ball"] == b and i["surface"] == "floor"]
            assert floor[-1]["speed"] * ball["restitution"] < cfg.rest_speed


# -- rendering -----------------------------------------------------------------------------------------
def test_render_shows_balls_and_floor():
    cfg = WorldConfig(min_balls=1, max_balls=1, sizes=("large",))
    clip = make_clip(5, cfg)
    meta, frames = clip.meta, clip.frames.astype(int)
    ball = meta["balls"][0]
    for i in (0, 10, 30):
        x, y = meta["trajectory"][0][i]
        assert tuple(frames[i, int(y), int(x)]) == PALETTE[ball["color"]]
    floor = np.rint(FLOOR_SHADE * np.array(PALETTE[meta["floor_color"]]))
    assert np.all(frames[:, meta["floor_y"]:, :] == floor)
    assert np.all(frames[:, 0, 0] == cfg.background)
    # anti-aliasing: some edge pixels are strict blends of ball and background
    assert len(np.unique(frames[0].reshape(-1, 3), axis=0)) > 3


# -- sound ---------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, sr=st.sampled_from([8000, 16000, 44100]))
def test_sound_starts_exactly_at_each_audible_impact(seed, sr):
    cfg = WorldConfig(sample_rate=sr)
    clip = make_clip(seed, cfg)
    audio, impacts = clip.audio[0], [i for i in clip.meta["impacts"] if i["audible"]]
    if not impacts:
        assert np.all(audio == 0)
        return
    assert np.all(audio[:impacts[0]["sample"]] == 0)  # silence before the first impact
    ms = sr // 1000
    for imp in impacts:
        s = imp["sample"]
        onset = s + int(np.argmax(np.abs(audio[s:]) > 1e-3))
        assert abs(audio[onset]) > 1e-3 and onset - s <= ms
    # leave-one-out: an impact's sound changes the mix from its own sample on, never before
    meta = clip.meta
    for k, imp in enumerate(impacts[:4]):
        rest = [i for i in meta["impacts"] if i is not imp]
        other = synthesize_audio(rest, meta["balls"], audio.size, sr, seed, cfg.loudness)[0]
        diff = np.flatnonzero(other != audio)
        assert diff.size and imp["sample"] <= diff[0] <= imp["sample"] + ms


def test_inaudible_impacts_are_silent():
    clip = make_clip(1, WorldConfig(audible_speed=1e9))
    assert clip.meta["impacts"] and not any(i["audible"] for i in clip.meta["impacts"])
    assert np.all(clip.audio == 0)


def dominant_hz(clip, window_s=0.04):
    sr, audio = clip.sample_rate, clip.audio[0]
    imp = next(i for i in clip.meta["impacts"] if i["audible"] and i["surface"] == "floor")
    seg = audio[imp["sample"]:imp["sample"] + int(window_s * sr)]
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size), n=8 * seg.size))
    return np.fft.rfftfreq(8 * seg.size, 1 / sr)[np.argmax(spec)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_big_balls_sound_lower(seed):
    one = dict(min_balls=1, max_balls=1)
    large = make_clip(seed, WorldConfig(sizes=("large",), **one))
    small = make_clip(seed, WorldConfig(sizes=("small",), **one))
    f_large, f_small = dominant_hz(large), dominant_hz(small)
    assert f_large < f_small
    assert f_large == pytest.approx(large.meta["balls"][0]["pitch_hz"], rel=0.08)
    assert f_small == pytest.approx(small.meta["balls"][0]["pitch_hz"], rel=0.08)


def test_louder_for_faster_impacts():
    # synthetic: the same impact at growing speeds
    ball = make_clip(0, WorldConfig(max_balls=1)).meta["balls"]
    peaks = [np.abs(synthesize_audio([{"sample": 100, "ball": 0, "speed": v, "audible": True}],
                                     ball, 4000, 16000, 0)).max() for v in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))
    # in clips: successive floor bounces of one ball slow down and get quieter
    checked = 0
    for seed in range(10):
        clip = make_clip(seed, WorldConfig(min_balls=1, max_balls=1, seconds=3.0))
        hits = [i for i in clip.meta["impacts"] if i["audible"] and i["surface"] == "floor"]
        walls = [i["time"] for i in clip.meta["impacts"] if i["surface"] != "floor"]
        rms = []
        for h in hits:
            if any(abs(t - h["time"]) < 0.05 for t in walls):
                continue
            seg = clip.audio[0, h["sample"]:h["sample"] + 320]
            rms.append((h["speed"], float(np.sqrt(np.mean(seg ** 2)))))
        for (v1, r1), (v2, r2) in zip(rms, rms[1:]):
            if v1 > 1.2 * v2:
                assert r1 > r2
                checked += 1
    assert checked >= 5


# -- captions --------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds)
def test_caption_matches_meta(seed):
    clip = make_clip(seed, WorldConfig(max_balls=5))
    balls, caption = clip.meta["balls"], clip.caption
    groups = {}
    for b in balls:
        groups[(b["size"], b["color"])] = groups.get((b["size"], b["color"]), 0) + 1
    for (size, color), n in groups.items():
        phrase = f"a {size} {color} ball" if n == 1 else f"{COUNT_WORDS[n]} {size} {color} balls"
        assert phrase in caption
    assert caption.endswith(f"on a {clip.meta['floor_color']} floor")
    assert (" bounces " in caption) == (len(balls) == 1)


def test_caption_examples():
    from sora.data.world import describe
    two_red = [{"size": "small", "color": "red"}] * 2
    assert describe(two_red, "gray") == "two small red balls bounce on a gray floor"
    mixed = [{"size": "large", "color": "blue"}, {"size": "small", "color": "yellow"}]
    assert describe(mixed, "green") == "a large blue ball and a small yellow ball bounce on a green floor"
    assert describe(mixed[:1], "brown") == "a large blue ball bounces on a brown floor"


def test_ceiling_and_corner_bounces_are_exact():
    from sora.data.world import simulate_ball, trajectory_at
    cfg = WorldConfig()
    ppm, r = cfg.pixels_per_metre, 4.0
    # thrown hard upwards: hits the ceiling, comes back down to the floor
    segs, hits = simulate_ball(30.0, 30.0, 0.0, -12.0 * ppm, r, 0.8, cfg)
    assert [h[1] for h in hits[:2]] == ["ceiling", "floor"]
    t_ceil, _, _, y_ceil, _ = hits[0]
    assert y_ceil == r
    y = trajectory_at(segs, np.array([t_ceil - 1e-6, t_ceil, t_ceil + 1e-6]))[:, 1]
    assert np.all(y >= r - 1e-9) and np.allclose(y, r, atol=1e-3)  # continuous through the bounce
    # aimed at the bottom-right corner: both impacts happen, the ball stays inside
    vy = 10.0 - 0.5 * cfg.gravity * ppm  # reaches the floor and the right wall at t = 1 s
    segs, hits = simulate_ball(cfg.width - r - 10.0, cfg.floor_y - r - 10.0, 10.0, vy, r, 0.8, cfg)
    assert {h[1] for h in hits[:2]} == {"floor", "right"}
    xy = trajectory_at(segs, np.linspace(0, cfg.seconds, 2001))
    assert xy[:, 0].max() <= cfg.width - r + 1e-9 and xy[:, 1].max() <= cfg.floor_y - r + 1e-9
