"""Onset detection against the world's ground truth (no codec in between)."""

import numpy as np

from sora.data.world import WorldConfig, make_clip
from sora.evaluation.sync import match_errors, onset_times


def test_every_onset_is_an_impact_within_2ms():
    onsets_total, errors = 0, []
    for seed in range(40):
        clip = make_clip(seed, WorldConfig(seconds=1.5))
        events = np.array([i["time"] for i in clip.meta["impacts"] if i["audible"]])
        onsets = onset_times(clip.audio, clip.sample_rate)
        onsets_total += len(onsets)
        errors.append(match_errors(onsets, events, max_error=0.1))
    errors = np.concatenate(errors)
    assert len(errors) == onsets_total > 60  # no onset without an impact
    assert np.abs(errors).max() <= 0.0025


def test_shifted_audio_shifts_onsets():
    clip = make_clip(3, WorldConfig(seconds=1.5))
    shift = 2000  # 125 ms at 16 kHz
    late = np.pad(clip.audio, ((0, 0), (shift, 0)))[:, : clip.audio.shape[1]]
    a, b = onset_times(clip.audio, 16000), onset_times(late, 16000)
    n = min(len(a), len(b))
    assert n >= 1
    np.testing.assert_allclose(b[:n] - a[:n], 0.125, atol=1e-3)
    assert onset_times(np.zeros(100), 16000).size == 0
