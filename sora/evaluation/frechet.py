"""Distances between two sets of feature vectors: Frechet distance and kernel (MMD) distance.

Both take features ``[N, D]`` from some embedding (I3D for FVD, an audio embedding for an
audio Frechet distance, ...). Everything is computed in float64 and reported in the squared
units of the features themselves: no rescaling (some papers multiply FVD/KID by powers of ten;
we never do, so a number here is comparable only to an unscaled number on the same embedding).

* :class:`FeatureStats` -- mean, covariance (``ddof=1``, as ``np.cov``) and count of a feature
  set; mergeable, so statistics can be accumulated batch by batch, and savable to ``.npz`` or
  ``.safetensors`` to cache a reference set.
* :func:`frechet_distance` -- ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, the
  Frechet (2-Wasserstein) distance between the Gaussians fitted to the two sets.
* :func:`kernel_distance` -- unbiased MMD^2 with the cubic polynomial kernel of KID/KVD,
  mean and std over random subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


def _as_features(feats, name: str = "features") -> np.ndarray:
    """``[N, D]`` float64 array from an array or tensor; one clear error otherwise."""
    if hasattr(feats, "detach"):  # torch tensor, without importing torch here
        feats = feats.detach().cpu().double().numpy()
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} have {x.ndim} dims (shape {tuple(x.shape)}), expected [N, D]")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf ({int((~np.isfinite(x)).sum())} values)")
    return x


@dataclass(frozen=True)
class FeatureStats:
    """First and second moments of a feature set: ``mean [D]``, ``cov [D, D]`` (unbiased,
    ``ddof=1``; zeros while ``count < 2``) and ``count``, all float64.

    ``a.merge(b)`` equals the stats of the concatenated features (Chan et al.'s pairwise
    update), so a large set can be streamed: ``stats = stats.merge(FeatureStats.from_features(batch))``
    starting from ``FeatureStats.empty(D)``.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int

    def __post_init__(self):
        mean, cov = np.asarray(self.mean, np.float64), np.asarray(self.cov, np.float64)
        if mean.ndim != 1 or cov.shape != (mean.size, mean.size):
            raise ValueError(f"FeatureStats: mean {mean.shape} and cov {cov.shape} must be [D] and [D, D]")
        if int(self.count) < 0:
            raise ValueError(f"FeatureStats: count={self.count} is negative")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "count", int(self.count))

    @property
    def dim(self) -> int:
        return self.mean.size

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """Stats of no features: the identity of :meth:`merge`."""
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0)

    @classmethod
    def from_features(cls, feats) -> FeatureStats:
        """Stats of features ``[N, D]`` (array or tensor), computed in float64."""
        x = _as_features(feats)
        n, d = x.shape
        if n == 0:
            return cls.empty(d)
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / (n - 1) if n > 1 else np.zeros((d, d))
        return cls(mean, cov, n)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Stats of the union of both sets (exact, up to float64 rounding)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {self.dim} and {other.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = self.cov * (na - 1) + other.cov * (nb - 1) + np.outer(delta, delta) * (na * nb / n)
        return FeatureStats(mean, m2 / (n - 1), n)

    def save(self, path) -> None:
        """Write to ``.npz`` or ``.safetensors`` (by suffix): arrays ``mean``, ``cov``, ``count``."""
        path = Path(path)
        arrays = {"mean": self.mean, "cov": self.cov, "count": np.array([self.count], dtype=np.int64)}
        if path.suffix == ".npz":
            np.savez(path, **arrays)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
        else:
            raise ValueError(f"FeatureStats.save: {path} must end in .npz or .safetensors")

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Read what :meth:`save` wrote."""
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        else:
            raise ValueError(f"FeatureStats.load: {path} must end in .npz or .safetensors")
        missing = {"mean", "cov", "count"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: not a FeatureStats file, missing arrays {sorted(missing)}")
        return cls(arrays["mean"], arrays["cov"], int(np.asarray(arrays["count"]).reshape(-1)[0]))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in squared feature units.

    ``Tr (S_a S_b)^{1/2}`` is computed in the symmetric form ``sum sqrt(eig(R S_b R))`` with
    ``R = S_a^{1/2}`` (``S_a S_b = R (R S_b)`` has the eigenvalues of the symmetric PSD
    ``R S_b R``): two symmetric eigendecompositions, tiny negative eigenvalues from rounding
    clipped to 0. It equals ``Tr Re sqrtm(S_a S_b)`` of pytorch-fid without its failure modes
    (no complex parts, no eps offset needed when a covariance is singular, e.g. N <= D).
    The result is clipped at 0 (rounding can leave ~-1e-12 for identical sets).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.size
    for name, mu, cov in (("a", mu_a, cov_a), ("b", mu_b, cov_b)):
        if mu.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"frechet_distance: set {name} has mean {mu.shape} and cov {cov.shape}, "
                             f"expected [{d}] and [{d}, {d}]")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def frechet_distance(a, b) -> float:
    """Frechet distance between two feature sets, given as :class:`FeatureStats` or ``[N, D]``
    features (arrays or tensors). See :func:`frechet_distance_from_moments`."""
    sa = a if isinstance(a, FeatureStats) else FeatureStats.from_features(a)
    sb = b if isinstance(b, FeatureStats) else FeatureStats.from_features(b)
    for name, s in (("a", sa), ("b", sb)):
        if s.count < 2:
            raise ValueError(f"frechet_distance: set {name} has {s.count} features, need at least 2")
    return frechet_distance_from_moments(sa.mean, sa.cov, sb.mean, sb.cov)


class KernelDistance(NamedTuple):
    mean: float  # mean unbiased MMD^2 over subsets, squared kernel units (unscaled)
    std: float   # std (ddof=0) of the per-subset estimates


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``k(x, y) = (x . y / d + 1)^3`` for all pairs: ``[n, d], [m, d] -> [n, m]``."""
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with :func:`polynomial_kernel`:
    the mean of ``k(x_i, x_j)`` and of ``k(y_i, y_j)`` over ``i != j``, minus twice the mean of
    ``k(x_i, y_j)`` over all pairs."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KernelDistance:
    """KID/KVD-style kernel distance between features ``[N_a, D]`` and ``[N_b, D]``.

    For each of ``subsets`` rounds, ``m = min(subset_size, N_a, N_b)`` rows are drawn without
    replacement from each set (``np.random.default_rng(seed)``: deterministic given ``seed``) and
    the unbiased MMD^2 of :func:`mmd2_unbiased` is computed; returns its mean and std. The
    estimator is unbiased, so it can be slightly negative for identical distributions.
    """
    a, b = _as_features(feats_a, "features a"), _as_features(feats_b, "features b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: features have dims {a.shape[1]} and {b.shape[1]}, expected equal")
    m = min(subset_size, len(a), len(b))
    if m < 2 or subsets < 1:
        raise ValueError(f"kernel_distance: need >= 2 features per set and >= 1 subset "
                         f"(got {len(a)}, {len(b)} features, subset_size={subset_size}, subsets={subsets})")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                       for _ in range(subsets)])
    return KernelDistance(float(values.mean()), float(values.std()))
