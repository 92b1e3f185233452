"""CKNNA / SE-CKNNA (metrics/cknna.py) against hand computation and its invariances."""

import math

import pytest
import torch

from latentforge.metrics import cknna as ck


def hsic_by_hand(K, L):
    """Song et al. 2012, Eq. 5, written out term by term on lists."""
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    t1 = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    t2 = sum(map(sum, Kt)) * sum(map(sum, Lt)) / ((n - 1) * (n - 2))
    t3 = sum(Kt[i][k] * Lt[k][j] for i in range(n) for j in range(n) for k in range(n))
    return (t1 + t2 - 2 * t3 / (n - 2)) / (n * (n - 3))


def knn_by_hand(K, k):
    n = len(K)
    mask = [[0.0] * n for _ in range(n)]
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: -K[i][j])
        for j in order[:k]:
            mask[i][j] = 1.0
    return mask


def gram(X):
    return [[sum(a * b for a, b in zip(x, y, strict=True)) for y in X] for x in X]


def test_cknna_matches_a_hand_computed_small_case():
    angles = [0.0, 0.31, 1.13, 2.02, 2.57, 3.79]  # no ties among neighbours
    A = [[math.cos(a), math.sin(a)] for a in angles]
    B = [[math.cos(2 * a), math.sin(2 * a)] for a in angles]  # a different neighbourhood
    K, L = gram(A), gram(B)
    mk, ml = knn_by_hand(K, 2), knn_by_hand(L, 2)
    m = [[mk[i][j] * ml[i][j] for j in range(6)] for i in range(6)]
    masked = lambda M, X: [[M[i][j] * X[i][j] for j in range(6)] for i in range(6)]  # noqa: E731
    kl = hsic_by_hand(masked(m, K), masked(m, L))
    kk = hsic_by_hand(masked(mk, K), masked(mk, K))
    ll = hsic_by_hand(masked(ml, L), masked(ml, L))
    expected = kl / (math.sqrt(kk * ll) + 1e-6)
    got = ck.cknna(
        torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64), topk=2
    )
    assert got == pytest.approx(expected, abs=1e-9)
    assert abs(got) < 0.999  # not the trivial case


def test_cknna_is_one_for_the_same_geometry_and_needs_enough_rows():
    torch.manual_seed(0)
    a = ck.prepare_features(torch.randn(40, 8))
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert ck.cknna(a, a @ q, topk=10) == pytest.approx(1.0, abs=1e-4)
    assert ck.cknna(a, ck.prepare_features(torch.randn(40, 8)), topk=10) < 0.5
    with pytest.raises(ValueError, match="rows"):
        ck.cknna(a[:5], a[:5], topk=10)


def test_prepare_features_clips_outliers_and_normalises():
    x = torch.ones(8, 5)
    x[0, 0] = 100.0  # above the 0.95 quantile of the magnitudes
    out = ck.prepare_features(x)
    assert torch.allclose(out.norm(dim=1), torch.ones(8))
    assert torch.allclose(out[0], out[1])


def test_pool_and_transforms():
    grid = torch.arange(8.0).view(1, 2, 2, 2)
    assert torch.equal(ck.pool_patches(grid), torch.tensor([[1.5, 5.5]]))
    assert torch.equal(ck.pool_patches(grid.flatten(2).transpose(1, 2)), ck.pool_patches(grid))
    rot, scale = ck.equivariance_params(3, seed=0)
    assert rot in ck.ROTATIONS and scale in ck.SCALES
    assert ck.equivariance_params(3, seed=0) == (rot, scale)
    img = torch.rand(3, 8, 8)
    out = ck.rotate_and_scale(img, 90, 0.5)
    assert out.shape == (3, 4, 4)
    assert torch.equal(ck.rotate_and_scale(img, 90, 1.0)[:, 0, 0], img[:, 0, -1])
    noisy = ck.add_noise(img, 0.1, 5)
    assert torch.equal(noisy, ck.add_noise(img, 0.1, 5)) and noisy.min() >= 0 and noisy.max() <= 1


def test_transformed_sets_follow_the_recorded_transforms():
    images = torch.rand(6, 3, 16, 16)
    sets = ck.transformed_sets(images, seed=3)
    assert list(sets) == ["clean", "equivariance", *(f"noise_{s:.2f}" for s in ck.NOISE_LEVELS)]
    assert all(x.shape == images.shape and x.min() >= 0 and x.max() <= 1 for x in sets.values())
    assert torch.equal(sets["clean"], images)
    for i in range(6):
        rotation, scale = ck.equivariance_params(i, 3)
        if scale == 1.0:  # turned only
            assert torch.allclose(
                sets["equivariance"][i], torch.rot90(images[i], rotation // 90, (1, 2))
            )
        assert torch.equal(sets["noise_0.10"][i], ck.add_noise(images[i], 0.1, i, 3))
    assert torch.equal(ck.transformed_sets(images, seed=3)["noise_0.20"], sets["noise_0.20"])
