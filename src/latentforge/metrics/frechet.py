"""Fréchet distance between Gaussians fitted to feature sets, computed stably.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Fréchet 1957; Heusel et al. 2017)

``tr((S1 S2)^(1/2))`` equals ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, and the inner matrix is
symmetric positive semi-definite, so both roots come from ``eigh`` in float64: no complex
parts, no ``sqrtm`` failures, and correct for rank-deficient covariances (few samples).
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
