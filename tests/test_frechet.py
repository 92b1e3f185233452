"""Fréchet distance: against an independent computation, and on rank-deficient inputs."""

import numpy as np
import pytest
import torch

from latentforge.metrics.frechet import FeatureStats, frechet_distance


def reference_fd(mu1, s1, mu2, s2):
    """Independent route: eigenvalues of S1 @ S2 (real, non-negative for PSD S1, S2)."""
    eig = torch.linalg.eigvals(torch.from_numpy(s1 @ s2)).real.clamp(min=0).sqrt().sum().item()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * eig)


def test_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 1.0
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    assert frechet_distance(sa, sb) == pytest.approx(
        reference_fd(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-8
    )


def test_identical_sets_give_zero_and_symmetry():
    x = np.random.default_rng(1).normal(size=(300, 8))
    s = FeatureStats.of(x)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-9)
    y = FeatureStats.of(x[:150] * 2)
    assert frechet_distance(s, y) == pytest.approx(frechet_distance(y, s), rel=1e-9)


def test_gaussians_closed_form():
    # Diagonal covariances: FD = |mu|^2 + sum (sqrt(a) - sqrt(b))^2
    a = FeatureStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]), 10)
    b = FeatureStats(np.ones(3), np.diag([4.0, 4.0, 1.0]), 10)
    assert frechet_distance(a, b) == pytest.approx(3 + 1 + 0 + 4)


def test_rank_deficient_covariances_stay_finite_and_real():
    rng = np.random.default_rng(2)
    a, b = FeatureStats.of(rng.normal(size=(10, 64))), FeatureStats.of(rng.normal(size=(12, 64)))
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd >= 0
    assert fd == pytest.approx(reference_fd(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_save_load(tmp_path):
    s = FeatureStats.of(np.random.default_rng(3).normal(size=(20, 4)))
    s.save(tmp_path / "s.npz")
    t = FeatureStats.load(tmp_path / "s.npz")
    assert t.n == 20 and np.allclose(t.sigma, s.sigma)


@pytest.mark.parametrize("dim, n", [(64, 500), (512, 300), (2048, 600), (2048, 4000)])
def test_matches_reference_across_dimensions(dim, n):
    """Dimensions 64-2048, with fewer samples than dimensions (rank-deficient) included."""
    rng = np.random.default_rng(dim + n)
    a = FeatureStats.of(rng.normal(size=(n, dim)))
    b = FeatureStats.of(rng.normal(size=(n, dim)) * 1.1 + 0.05)
    expected = reference_fd(a.mu, a.sigma, b.mu, b.sigma)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_invariant_to_sample_order():
    x = np.random.default_rng(3).normal(size=(200, 32))
    y = np.random.default_rng(4).normal(size=(150, 32))
    fd = frechet_distance(FeatureStats.of(x), FeatureStats.of(y))
    shuffled = FeatureStats.of(x[np.random.default_rng(5).permutation(200)])
    assert frechet_distance(shuffled, FeatureStats.of(y)) == pytest.approx(fd, rel=1e-9)
