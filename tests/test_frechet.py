"""Frechet and kernel distances against closed forms and independent numpy/scipy computations."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import norm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.evaluation.frechet import (FeatureStats, frechet_distance, frechet_distance_from_moments, kernel_distance,
                                     mmd2_unbiased)

floats = st.floats(-3, 3, allow_nan=False)
positive = st.floats(0.05, 4.0, allow_nan=False)


def reference_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's formula: scipy sqrtm of the product, eps offset if singular, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6).flatmap(lambda d: st.tuples(*[st.lists(s, min_size=d, max_size=d)
                                                        for s in (floats, positive, floats, positive)])))
def test_diagonal_gaussians_closed_form(params):
    # For diagonal covariances sqrt(S1 S2) = diag(s1 s2): FD = |mu1 - mu2|^2 + sum (s1 - s2)^2.
    mu1, sd1, mu2, sd2 = (np.array(p) for p in params)
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    got = frechet_distance_from_moments(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("d, rank", [(5, None), (16, None), (8, 3)])
def test_full_covariances_match_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d, rank), random_spd(rng, d)
    expected = reference_frechet(mu1, s1, mu2, s2)
    assert frechet_distance_from_moments(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_identical_sets_zero_and_translation_gives_squared_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    v = rng.standard_normal(12)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + v) == pytest.approx(float(v @ v), rel=1e-7)
    # fewer samples than dims: singular covariances, still finite and exact
    few = x[:5]
    assert frechet_distance(few, few + v) == pytest.approx(float(v @ v), rel=1e-6)
    assert frechet_distance(torch.from_numpy(x).float(), x) == pytest.approx(0.0, abs=1e-4)  # tensors accepted


def test_feature_stats_match_numpy_and_errors():
    x = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    s = FeatureStats.from_features(x)
    np.testing.assert_allclose(s.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    assert s.count == 50 and s.dim == 4 and s.cov.dtype == np.float64
    with pytest.raises(ValueError, match=r"features have 3 dims .* expected \[N, D\]"):
        FeatureStats.from_features(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats.from_features(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="need at least 2"):
        frechet_distance(x[:1], x)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=5), st.integers(0, 1000))
def test_streaming_merge_equals_one_shot(sizes, seed):
    x = np.random.default_rng(seed).standard_normal((sum(sizes), 3)) * 5 + 2
    streamed = FeatureStats.empty(3)
    start = 0
    for n in sizes:
        streamed = streamed.merge(FeatureStats.from_features(x[start : start + n]))
        start += n
    one_shot = FeatureStats.from_features(x)
    assert streamed.count == one_shot.count == len(x)
    np.testing.assert_allclose(streamed.mean, one_shot.mean, atol=1e-10)
    if len(x) > 1:
        np.testing.assert_allclose(streamed.cov, np.cov(x, rowvar=False), atol=1e-9)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_stats_save_load_roundtrip(tmp_path, suffix):
    s = FeatureStats.from_features(np.random.default_rng(2).standard_normal((30, 6)))
    s.save(tmp_path / f"ref{suffix}")
    t = FeatureStats.load(tmp_path / f"ref{suffix}")
    assert t.count == 30
    np.testing.assert_array_equal(t.mean, s.mean)
    np.testing.assert_array_equal(t.cov, s.cov)
    with pytest.raises(ValueError, match="must end in"):
        s.save(tmp_path / "ref.txt")


def test_mmd_matches_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((9, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kernel_distance_population_value_and_determinism():
    # d = 1: k(x, y) = (xy + 1)^3 = <phi(x), phi(y)> with phi(x) = (1, sqrt3 x, sqrt3 x^2, x^3), so
    # MMD^2 = 3 (Ex - Ey)^2 + 3 (Ex^2 - Ey^2)^2 + (Ex^3 - Ey^3)^2; N(0, 1) vs N(0.5, 1) (Ey^2 = 1.25,
    # Ey^3 = mu^3 + 3 mu = 1.625): 3.578125. Samples are normal quantiles, so moments are ~exact.
    n = 1500
    x = norm.ppf((np.arange(n) + 0.5) / n)[:, None]
    y = x + 0.5
    expected = 3 * (0 - 0.5) ** 2 + 3 * (1 - 1.25) ** 2 + (0 - 1.625) ** 2
    full = kernel_distance(x, y, subsets=2, subset_size=10**6)  # every subset is the whole set
    assert full.mean == pytest.approx(expected, rel=0.02) and full.std < 1e-9
    kd = kernel_distance(x, y, subsets=10, subset_size=400, seed=0)
    assert abs(kd.mean - full.mean) < 4 * kd.std / np.sqrt(10)
    assert kernel_distance(x, y, subsets=10, subset_size=400, seed=0) == kd
    assert kernel_distance(x, y, subsets=10, subset_size=400, seed=1).mean != kd.mean


def test_kernel_distance_same_distribution_near_zero():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same = kernel_distance(a, b, subsets=10, subset_size=300)
    shifted = kernel_distance(a, b + 0.5, subsets=10, subset_size=300)
    assert abs(same.mean) < 0.02 * shifted.mean and abs(same.mean) < 3 * same.std + 1e-3
    with pytest.raises(ValueError, match="dims 16 and 3"):
        kernel_distance(a, b[:, :3])
