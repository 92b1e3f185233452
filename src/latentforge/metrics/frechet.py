"""Fréchet distance between Gaussians fitted to feature sets, computed stably.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Fréchet 1957; Heusel et al. 2017)

``tr((S1 S2)^(1/2))`` equals ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, and the inner matrix is
symmetric positive semi-definite, so both roots come from ``eigh`` in float64: no complex
parts, no ``sqrtm`` failures, and correct for rank-deficient covariances (few samples).

:func:`frechet_distance_inf` extrapolates FD to infinitely many samples (FID∞, Chong &
Forsyth 2020), removing most of the estimator's bias for small sample budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureStats:
    """Mean, covariance and sample count of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features, got {x.shape}")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0])

    def save(self, path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path) -> FeatureStats:
        with np.load(path) as f:
            return cls(f["mu"], f["sigma"], int(f["n"]) if "n" in f else -1)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians (float64, eigendecomposition-based)."""
    diff = a.mu - b.mu
    root = _psd_sqrt(a.sigma)
    inner = root @ b.sigma @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0.0, None)).sum()
    fd = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


@dataclass
class FDInfinity:
    """FD extrapolated to N -> infinity, with the fit's slope and the points it was fit to."""

    value: float  # the intercept of FD_N = value + slope / N
    slope: float
    sizes: list[int]
    distances: list[float]


def frechet_distance_inf(
    features: np.ndarray,
    reference: FeatureStats,
    num_points: int = 15,
    min_fraction: float = 0.1,
    seed: int = 0,
) -> FDInfinity:
    """FD∞ (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where
    to find them", Sec. 3): the FD of N samples is biased upwards, to first order linearly in
    1/N (FD_N = FD∞ + k / N). Compute FD against ``reference`` on random subsets of
    ``features`` at ``num_points`` sizes evenly spaced from ``min_fraction * N`` to N (the
    paper: 15 sizes from 5k to 50k), fit a least-squares line against 1/N and return its
    intercept. The linear regime needs N well above the feature dimension; with fewer
    samples the result is a rough correction, not an unbiased estimate.
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    sizes = sorted({int(s) for s in np.linspace(max(2, min_fraction * n), n, num_points)})
    if len(sizes) < 2:
        raise ValueError(f"FD∞ needs at least 2 distinct subset sizes; got {n} samples")
    rng = np.random.default_rng(seed)
    root = _psd_sqrt(reference.sigma)  # once for all subsets
    fds = [
        _fd_to_features(reference, root, x[rng.choice(n, size, replace=False)]) for size in sizes
    ]
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=np.float64), fds, deg=1)
    return FDInfinity(float(intercept), float(slope), sizes, [float(f) for f in fds])


def _fd_to_features(ref: FeatureStats, root: np.ndarray, x: np.ndarray) -> float:
    """FD between ``ref`` (with ``root`` = ``ref.sigma^(1/2)``) and the features ``x`` (N, D).

    With ``Y = (x - mean) root / sqrt(N - 1)``, ``root S_x root = Y^T Y``, whose non-zero
    eigenvalues are those of ``Y Y^T``: an N x N problem when N < D (exact, and much cheaper
    than the D x D one for small subsets)."""
    mu = x.mean(axis=0)
    centred = (x - mu) / np.sqrt(len(x) - 1)
    y = centred @ root
    gram = y @ y.T if len(x) < x.shape[1] else y.T @ y
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum()
    diff = ref.mu - mu
    fd = diff @ diff + np.trace(ref.sigma) + (centred**2).sum() - 2.0 * tr_covmean
    return float(max(fd, 0.0))
