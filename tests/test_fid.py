"""FID and sFID through torch-fidelity's InceptionV3 (randomly initialised here: nothing is
downloaded), the ADM batch format, the clear error without weights, and IS / KID /
precision-recall on known features."""

from unittest import mock

import numpy as np
import pytest
import torch

from latentforge.metrics.frechet import FeatureStats, frechet_distance
from latentforge.metrics.inception import (
    INCEPTION_FILE,
    SPATIAL_DIM,
    adm_image_count,
    capturing_spatial,
    inception_features,
    inception_score,
    inception_spatial_features,
    kernel_inception_distance,
    load_inception,
    precision_recall,
    reference_spatial_stats,
    reference_stats,
    write_adm_npz,
    write_adm_npz_parts,
)


def random_inception_file(directory) -> str:
    """A weights file of torch-fidelity's InceptionV3 architecture with random values (what a
    user's downloaded file would be, minus the training)."""
    # heavy (seconds to import): only for the weights file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    # construct the architecture without any weights file: skip its load, keep the init
    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
        mock.patch("torch.load", lambda *a, **k: {}),
    ):
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path="random"
        )
    path = directory / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def random_inception(inception_file):
    """The random weights (conftest's session-wide file) loaded through the real loader."""
    return load_inception(inception_file)


def images(n, seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_missing_weights_error_names_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE) as e:
        load_inception()
    assert "evaluate.inception_weights" in str(e.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_inception(tmp_path / "absent.pth")


def test_features_and_fid_with_a_random_inception(random_inception):
    a, b = images(12, 0), images(12, 1)
    fa = inception_features(a, random_inception, batch_size=5)
    assert fa.shape == (12, 2048) and fa.dtype == np.float64
    assert np.array_equal(fa, inception_features(a, random_inception, batch_size=12))
    same = frechet_distance(FeatureStats.of(fa), FeatureStats.of(fa))
    assert abs(same) < 1e-6
    other = frechet_distance(
        FeatureStats.of(fa), FeatureStats.of(inception_features(b, random_inception))
    )
    assert other > 0


def test_adm_batch_round_trip_and_reference_stats(tmp_path, random_inception):
    x = images(6, 2)
    write_adm_npz(tmp_path / "samples.npz", x, labels=np.arange(6))
    with np.load(tmp_path / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], x) and f["arr_0"].dtype == np.uint8
    from_images = reference_stats(tmp_path / "samples.npz", random_inception)
    assert from_images.n == 6
    # a reference batch with precomputed statistics is used as stored
    np.savez(tmp_path / "ref.npz", arr_0=x, mu=from_images.mu, sigma=from_images.sigma)
    stored = reference_stats(tmp_path / "ref.npz")
    assert np.array_equal(stored.mu, from_images.mu) and stored.n == 6
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "bad.npz", x.astype(np.float32))


def test_adm_batch_streamed_from_parts_equals_the_whole(tmp_path):
    """Sampling streams its chunk files into the archive; np.load reads it as np.savez's."""
    x = images(7, 3)
    parts = [tmp_path / "a.npy", tmp_path / "b.npy"]
    np.save(parts[0], x[:4])
    np.save(parts[1], x[4:])
    shape = write_adm_npz_parts(tmp_path / "s.npz", parts, labels=np.arange(7) % 3)
    write_adm_npz(tmp_path / "whole.npz", x, labels=np.arange(7) % 3)
    assert shape == x.shape
    with np.load(tmp_path / "s.npz") as a, np.load(tmp_path / "whole.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["arr_0", "labels"]
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    np.save(parts[1], x[4:].astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz_parts(tmp_path / "bad.npz", parts)
    assert not (tmp_path / "bad.npz").exists()


def mixed_6_conv(images, extractor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations (N, 192, 17, 17) of TF's mixed_6/conv (Mixed_6d's 1x1 branch after
    batch norm and ReLU), read by our own hook on the module independently of the library,
    and the extractor's pool-3 output of the same pass."""
    seen = []
    handle = extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        pool = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))[0]
    handle.remove()
    return seen[0], pool


def fd_by_hand(x, y) -> float:
    """FD of two feature sets, independently of frechet.py: with C = centred / sqrt(N - 1),
    tr((S_x S_y)^(1/2)) is the nuclear norm of C_x C_y^T (exact for rank-deficient S)."""
    cx = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    cy = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    diff = x.mean(0) - y.mean(0)
    nuclear = np.linalg.svd(cx @ cy.T, compute_uv=False).sum()
    return float(diff @ diff + (cx**2).sum() + (cy**2).sum() - 2 * nuclear)


def test_spatial_features_are_mixed_6d_1x1_first_7_channels(random_inception):
    x = images(5, 3)
    act, plain_pool = mixed_6_conv(x, random_inception)
    assert act.shape == (5, 192, 17, 17)  # 17 x 17 x 192 at 299 x 299, like TF's mixed_6/conv
    with capturing_spatial(random_inception) as batches:
        pool = inception_features(x, random_inception, batch_size=3)
    assert [b.shape for b in batches] == [
        (3, SPATIAL_DIM),
        (2, SPATIAL_DIM),
    ] and SPATIAL_DIM == 2023
    # channels 0-6 in TF's (H, W, C) order, as ADM's mu_s / sigma_s are laid out
    expected = act[:, :7].permute(0, 2, 3, 1).reshape(5, -1).double().numpy()
    assert np.array_equal(np.concatenate(batches), expected)
    # the hook leaves the pool-3 path alone and is removed afterwards
    assert np.array_equal(pool, plain_pool.double().numpy())
    assert not random_inception.Mixed_6d.branch1x1._forward_hooks


def test_sfid_from_an_adm_batch_equals_fd_by_hand(tmp_path, random_inception):
    samples, ref = images(6, 4), images(7, 5)
    write_adm_npz(tmp_path / "ref.npz", ref)
    feats = inception_spatial_features(samples, random_inception, batch_size=4)
    assert feats.shape == (6, 2023) and feats.dtype == np.float64
    ref_stats = reference_spatial_stats(tmp_path / "ref.npz", random_inception)
    assert ref_stats.n == 7 and ref_stats.mu.shape == (2023,)
    sfid = frechet_distance(FeatureStats.of(feats), ref_stats)
    by_hand = fd_by_hand(  # (N, 7 * 17 * 17) in NCHW order: FD ignores a common permutation
        mixed_6_conv(samples, random_inception)[0][:, :7].flatten(1).double().numpy(),
        mixed_6_conv(ref, random_inception)[0][:, :7].flatten(1).double().numpy(),
    )
    assert sfid > 0 and sfid == pytest.approx(by_hand, rel=1e-6)
    same = frechet_distance(FeatureStats.of(feats), FeatureStats.of(feats))
    assert same == pytest.approx(0.0, abs=1e-6 * sfid)


def test_adm_spatial_statistics_are_read_or_named_as_missing(tmp_path):
    rng = np.random.default_rng(0)
    mu_s, sigma_s = rng.normal(size=2023), np.diag(rng.uniform(1, 2, size=2023))
    np.savez(
        tmp_path / "VIRTUAL_ref.npz",
        arr_0=images(3, 6),
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        mu_s=mu_s.astype(np.float32),
        sigma_s=sigma_s,
    )
    stored = reference_spatial_stats(tmp_path / "VIRTUAL_ref.npz")  # no extractor needed
    assert np.array_equal(stored.mu, mu_s.astype(np.float32)) and stored.mu.dtype == np.float64
    assert np.array_equal(stored.sigma, sigma_s) and stored.n == 3
    np.savez(tmp_path / "pool_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="pool_only.npz") as e:
        reference_spatial_stats(tmp_path / "pool_only.npz")
    assert "mu_s/sigma_s" in str(e.value) and "arr_0" in str(e.value)
    np.savez(tmp_path / "wrong.npz", mu_s=np.zeros(768), sigma_s=np.eye(768))
    with pytest.raises(ValueError, match="2023"):
        reference_spatial_stats(tmp_path / "wrong.npz")


def test_adm_image_count_reads_the_header_only(tmp_path, monkeypatch):
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((7, 4, 4, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3))
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(3), sigma=np.eye(3))
    monkeypatch.setattr(np.lib.format, "read_array", None)  # loading the array would fail
    assert adm_image_count(images) == 7 and adm_image_count(stats_only) == -1
    monkeypatch.undo()
    assert reference_stats(images).n == 7 and reference_stats(stats_only).n == -1


def test_is_kid_precision_recall_on_known_features():
    # IS: uniform predictions score 1; confident, balanced predictions over C classes score C
    assert inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)
    # 10 equally likely, confidently predicted classes: IS = 10, one chunk below 5k samples
    assert inception_score(np.tile(50 * np.eye(10), (3, 1))) == pytest.approx((10.0, 0.0, 1))
    # ADM's contiguous chunks, unshuffled: 12k samples -> 5k, 5k, 2k; a chunk of one class
    # scores 1, a chunk of all ten 10
    one = np.tile(50 * np.eye(10)[0], (5000, 1))
    ten = np.tile(50 * np.eye(10), (500, 1))
    mean, std, splits = inception_score(np.concatenate([one, ten, ten[:2000]]))
    assert splits == 3 and mean == pytest.approx((1 + 10 + 10) / 3, rel=1e-6)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    shifted = rng.normal(size=(200, 16)) + 1.0
    same, _, size = kernel_inception_distance(a, b, subset_size=100, subsets=20)
    far, std, _ = kernel_inception_distance(a, shifted, subset_size=100, subsets=20)
    assert size == 100 and abs(same) < 0.05 < far and std > 0
    assert kernel_inception_distance(a, shifted[:50])[2] == 50  # clamped to the smaller set
    assert precision_recall(a, a) == (1.0, 1.0)
    # samples collapsed near the mode: all realistic (precision), little coverage (recall)
    precision, recall = precision_recall(a[:60] * 0.2, a)
    assert precision == 1.0 and recall < 0.2
