"""Property tests of the timing contract (sora/timeline.py)."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sora.timeline import Timeline, TimelineError, as_fraction

FPS = [Fraction(f) for f in (8, 12, 15, 16, 24, 25, 30, 48, 50, 60)] + [Fraction(24000, 1001), Fraction(30000, 1001)]
RATES = [8000, 16000, 22050, 24000, 32000, 44100, 48000]


def _lcm_fraction(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


@st.composite
def valid_timelines(draw):
    fps = draw(st.sampled_from(FPS))
    stride = draw(st.sampled_from([1, 2, 4, 8]))
    sr = draw(st.sampled_from(RATES))
    hop = draw(st.sampled_from([80, 160, 256, 320, 441, 480, 512]))
    lat = draw(st.sampled_from([1, 2, 4, 8]))
    period = _lcm_fraction(Fraction(stride) / fps, Fraction(hop * lat, sr))
    n = draw(st.integers(1, 3))
    return Timeline(seconds=n * period, fps=fps, vae_time_stride=stride, sample_rate=sr,
                    mel_hop=hop, audio_latent_stride=lat)


@given(valid_timelines())
@settings(max_examples=300, deadline=None)
def test_lengths_follow_from_seconds(tl):
    s, k = tl.vae_time_stride, tl.video_latent_steps - 1
    assert tl.num_frames == 1 + s * k
    assert tl.num_frames == tl.seconds_q * tl.fps_q + 1
    assert tl.num_samples == tl.seconds_q * tl.sample_rate
    assert tl.num_mel_frames == tl.audio_latent_steps * tl.audio_latent_stride
    assert tl.audio_latent_steps * tl.audio_window == tl.num_samples
    assert tl.frame_times()[-1] == pytest.approx(float(tl.seconds_q))
    assert tl.frame_of(tl.frame_times()[-1]) == tl.num_frames - 1
    assert tl.sample_of(float(tl.seconds_q)) == tl.num_samples


@given(valid_timelines())
@settings(max_examples=300, deadline=None)
def test_both_streams_tile_the_clip_on_one_axis(tl):
    seconds = float(tl.seconds_q)
    v, a = tl.video_token_spans(), tl.audio_token_spans()
    assert v.shape == (tl.video_latent_steps, 2) and a.shape == (tl.audio_latent_steps, 2)
    assert v[0, 0] == v[0, 1] == 0.0  # the first frame is encoded alone
    if len(v) > 1:
        assert v[1, 0] == 0.0
        np.testing.assert_allclose(v[2:, 0], v[1:-1, 1])
    np.testing.assert_allclose(a[1:, 0], a[:-1, 1])
    assert a[0, 0] == 0.0
    np.testing.assert_allclose([v[-1, 1], a[-1, 1]], [seconds, seconds], rtol=1e-12)
    for times, spans in ((tl.video_token_times(), v), (tl.audio_token_times(), a)):
        assert np.all(np.diff(times) > 0)
        np.testing.assert_allclose(times, spans.mean(axis=1))


def test_same_instant_same_time():
    tl = Timeline(seconds=1.92, fps=25, sample_rate=16000, mel_hop=160, audio_latent_stride=4)
    # at 25 fps with a temporal stride of 4 one video latent covers 160 ms = four 40 ms audio steps:
    # the video token's centre equals the mean of the centres of the audio steps it spans.
    v, a = tl.video_token_times(), tl.audio_token_times()
    assert tl.video_latent_steps == 13 and tl.audio_latent_steps == 48
    for j in range(1, tl.video_latent_steps):
        assert v[j] == pytest.approx(a[4 * (j - 1):4 * j].mean())


def test_defaults():
    tl = Timeline()
    assert (tl.num_frames, tl.video_latent_steps) == (49, 13)
    assert (tl.num_samples, tl.num_mel_frames, tl.audio_latent_steps) == (32000, 200, 50)
    assert tl.audio_latent_rate == 25
    assert tl.read_duration == pytest.approx(2 + 1 / 24)


@given(seconds=st.floats(0.05, 20).map(lambda x: round(x, 3)), fps=st.sampled_from([12, 24, 25, 30]),
       sr=st.sampled_from(RATES))
@settings(max_examples=300, deadline=None)
def test_any_combination_is_valid_or_names_the_field(seconds, fps, sr):
    try:
        tl = Timeline(seconds=seconds, fps=fps, sample_rate=sr)
    except TimelineError as e:
        msg = str(e)
        assert msg.startswith("timeline.seconds=") and "\n" not in msg
        suggested = float(re.search(r"try seconds=([0-9.e+-]+)", msg).group(1))
        # the suggestion fixes the field it names
        field = "frame steps" if "frame steps" in msg else "audio samples"
        if field == "frame steps":
            steps = as_fraction(suggested, 10**6) * fps
            assert steps.denominator == 1 and steps.numerator % 4 == 0
        else:
            samples = as_fraction(suggested, 10**6) * sr
            assert samples.denominator == 1 and samples.numerator % 640 == 0
    else:
        assert tl.num_frames == round(seconds * fps) + 1 and (tl.num_frames - 1) % 4 == 0
        assert tl.num_samples % tl.audio_window == 0


@pytest.mark.parametrize("field,value", [
    ("fps", 0), ("fps", -24), ("seconds", 0), ("seconds", float("nan")), ("sample_rate", 16000.5),
    ("mel_hop", 0), ("vae_time_stride", True), ("audio_latent_stride", -1)])
def test_bad_fields_are_named(field, value):
    with pytest.raises(TimelineError, match=rf"^timeline\.{field}="):
        Timeline(**{field: value})


def test_frames_not_one_plus_4k():
    with pytest.raises(TimelineError, match="frames must be 1 \\+ 4k"):
        Timeline(seconds=1.0, fps=30)  # 30 frame steps
    assert Timeline(seconds=1.2, fps=30).num_frames == 37


@settings(max_examples=60, deadline=None)
@given(fps=st.sampled_from([8, 16, 24, 25, 30]), stride=st.sampled_from([1, 4, 8]),
       duration=st.floats(min_value=0.0, max_value=20.0))
def test_fit_seconds_is_the_longest_valid_length_within_the_input(fps, stride, duration):
    tl = Timeline(seconds=8.0, fps=fps, vae_time_stride=stride)  # valid for every fps and stride drawn
    q = tl.quantum
    if duration < float(q) - 1e-9:
        with pytest.raises(TimelineError, match="shorter than the shortest clip"):
            tl.fit_seconds(duration, "video=x.mp4")
        return
    fit = tl.fit_seconds(duration)
    assert fit <= duration + 1e-6 and duration - fit < float(q) + 1e-6
    assert (Fraction(fit).limit_denominator(10**6) / q).denominator == 1
    Timeline(seconds=fit, fps=fps, vae_time_stride=stride)  # valid under the contract
    assert tl.nearest_seconds(fit) == fit
