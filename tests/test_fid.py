"""FID through torch-fidelity's InceptionV3 (randomly initialised here: nothing is
downloaded), the ADM batch format, and the clear error without weights."""

import numpy as np
import pytest
import torch

from latentforge.metrics.frechet import FeatureStats, frechet_distance
from latentforge.metrics.inception import (
    INCEPTION_FILE,
    inception_features,
    load_inception,
    reference_stats,
    write_adm_npz,
)


def random_inception_file(directory) -> str:
    """A weights file of torch-fidelity's InceptionV3 architecture with random values (what a
    user's downloaded file would be, minus the training)."""
    from unittest import mock

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
def random_inception(tmp_path_factory):
    """The random weights loaded through the real loader."""
    return load_inception(random_inception_file(tmp_path_factory.mktemp("inception")))


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
