"""Fréchet distance: against an independent computation, and on rank-deficient inputs;
FD∞ extrapolation on Gaussians with a known bias."""

import numpy as np
import pytest
import torch

from latentforge.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_inf


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
    """A round trip keeps the mean, covariance and count exactly (float64)."""
    s = FeatureStats.of(np.random.default_rng(3).normal(size=(20, 4)) + [1.0, -2.0, 0.5, 3.0])
    s.save(tmp_path / "s.npz")
    t = FeatureStats.load(tmp_path / "s.npz")
    assert t.n == 20 and np.array_equal(t.sigma, s.sigma) and np.array_equal(t.mu, s.mu)
    assert t.mu.dtype == t.sigma.dtype == np.float64


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


def test_fd_inf_removes_most_of_the_small_sample_bias():
    """Samples of N(delta, I) against the exact N(0, I): the true FD is |delta|^2, and FD of
    N samples overshoots it by a bias ~ 1/N (Chong & Forsyth 2020) that FD∞ extrapolates away."""
    dim, n = 64, 3000
    truth = FeatureStats(np.zeros(dim), np.eye(dim), -1)
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(n, dim)) + 0.3 / np.sqrt(dim)
        full = frechet_distance(FeatureStats.of(x), truth)
        fit = frechet_distance_inf(x, truth, seed=seed)
        assert full - 0.09 > 0.3  # the bias at N = 3000 is large here
        assert abs(fit.value - 0.09) < 0.25 * (full - 0.09)
        assert fit.slope > 0 and fit.sizes[0] == 300 and fit.sizes[-1] == n
        assert len(fit.sizes) == 15 and fit.distances[-1] == pytest.approx(full, rel=1e-8)


@pytest.mark.parametrize("n, dim", [(12, 256), (300, 64)])
def test_fd_inf_points_match_frechet_distance(n, dim):
    """The subsets' distances (an N x N eigenproblem when N < D) equal the plain FD."""
    rng = np.random.default_rng(n)
    ref = FeatureStats.of(rng.normal(size=(n + 5, dim)))
    x = rng.normal(size=(n, dim)) * 1.2 + 0.1
    fit = frechet_distance_inf(x, ref, num_points=4)
    assert fit.sizes[-1] == n
    assert fit.distances[-1] == pytest.approx(frechet_distance(ref, FeatureStats.of(x)), rel=1e-6)
    with pytest.raises(ValueError, match="2 distinct"):
        frechet_distance_inf(x[:2], ref)
