"""PSNR, SSIM, SI-SDR and mel distance against known answers and independent implementations."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from sora.evaluation.recon import mel_distance, psnr, si_sdr, ssim


def reference_ssim_frame(x, y, data_range):
    """Wang et al. with scipy: sigma 1.5, truncate 5 / 1.5 -> radius 5 (11 taps), 'valid' region."""
    f = lambda a: gaussian_filter(a, 1.5, truncate=5 / 1.5, mode="reflect")[5:-5, 5:-5]  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()


def test_psnr_known_answer():
    x = torch.rand(3, 2, 4, 8, 8)
    assert psnr(x, x + 0.1, data_range=1.0).tolist() == pytest.approx([20.0] * 3, rel=1e-5)
    assert psnr(x, x + 0.2).tolist() == pytest.approx([10 * math.log10(4 / 0.04)] * 3, rel=1e-5)  # range 2
    assert psnr(x, x).dtype == torch.float32 and (psnr(x, x) > 90).all()


def test_ssim_matches_scipy_reference_per_frame():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 2, 20, 24, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    got = ssim(x, y, data_range=2.0)
    expected = [np.mean([reference_ssim_frame(x[b, c, t].numpy(), y[b, c, t].numpy(), 2.0)
                         for c in range(3) for t in range(2)]) for b in range(2)]
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 3, 16, 16, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(6, 3, 16, 16)  # noqa: E731  [B*T, C, H, W]
    # torchmetrics 1.9 averages its map over the reflect-padded border too; skimage and we use only
    # the pixels whose 11x11 window fits, i.e. its map cropped by 5
    _, smap = tm.structural_similarity_index_measure(frames(y), frames(x), data_range=1.0, reduction="none",
                                                    return_full_image=True)
    per_frame = smap[..., 5:-5, 5:-5].reshape(6, -1).mean(1)
    np.testing.assert_allclose(ssim(x, y, data_range=1.0).numpy(), per_frame.reshape(2, 3).mean(1).numpy(),
                               rtol=1e-10)


def test_ssim_known_answers_and_errors():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 2, 16, 16, generator=g) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    scores = [ssim(x, x + s * torch.randn(x.shape, generator=g)).item() for s in (0.05, 0.2, 0.8)]
    assert scores[0] > scores[1] > scores[2]
    assert ssim(x[:, :, 0], x[:, :, 0]).item() == pytest.approx(1.0)  # images [B, C, H, W]
    with pytest.raises(ValueError, match="frames are 8x16"):
        ssim(x[..., :8, :], x[..., :8, :])
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :1])


def test_si_sdr_known_answer_and_scale_invariance():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4000, generator=g, dtype=torch.float64)
    s -= s.mean(-1, keepdim=True)
    n = torch.randn(2, 4000, generator=g, dtype=torch.float64)
    n -= n.mean(-1, keepdim=True)
    n -= (n * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s  # orthogonal to s
    target_db = torch.tensor([10.0, -3.0], dtype=torch.float64)
    n *= (s.norm(dim=-1) / n.norm(dim=-1) / 10 ** (target_db / 20))[:, None]
    est = s + n + 0.7  # an offset is removed by the zero-mean step
    np.testing.assert_allclose(si_sdr(est, s).numpy(), target_db.numpy(), atol=1e-9)
    np.testing.assert_allclose(si_sdr(-3.5 * est, s).numpy(), target_db.numpy(), atol=1e-9)
    stereo = torch.stack([est, s], 1)  # channel 2 perfect -> very high; mean over channels
    assert si_sdr(stereo, torch.stack([s, s], 1)).shape == (2,)


def test_si_sdr_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.audio")
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(3, 2, 1000, generator=g, dtype=torch.float64)
    est = ref + 0.5 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = tm.scale_invariant_signal_distortion_ratio(est, ref, zero_mean=True).mean(1)
    np.testing.assert_allclose(si_sdr(est, ref).numpy(), expected.numpy(), rtol=1e-9)


@pytest.mark.parametrize("sample_rate", [16000, 48000])
def test_mel_distance_known_answers(sample_rate):
    g = torch.Generator().manual_seed(5)
    a = 0.3 * torch.randn(2, sample_rate // 4, generator=g)  # white noise: no mel bin near the 1e-5 floor
    assert mel_distance(a, a, sample_rate).tolist() == [0.0, 0.0]
    # doubling the amplitude adds exactly log 2 to every log-mel bin (resampling is linear)
    np.testing.assert_allclose(mel_distance(a, 2 * a, sample_rate).numpy(), [math.log(2)] * 2, rtol=1e-9)
    stereo, twice = torch.stack([a, a], 1), torch.stack([2 * a, a], 1)  # one channel differs: half of it
    np.testing.assert_allclose(mel_distance(stereo, twice, sample_rate).numpy(), [math.log(2) / 2] * 2, rtol=1e-9)


def test_mel_distance_orders_similarity_and_errors():
    t = torch.arange(8000) / 16000
    tone = lambda f: torch.sin(2 * math.pi * f * t)[None]  # noqa: E731
    assert mel_distance(tone(440), tone(450)).item() < mel_distance(tone(440), tone(2000)).item()
    with pytest.raises(ValueError, match="shape"):
        mel_distance(tone(440), tone(440)[..., :-1])
    with pytest.raises(ValueError, match="need more than 512"):
        mel_distance(tone(440)[..., :100], tone(440)[..., :100])
