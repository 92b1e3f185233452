"""Real images for evaluation and the on-disk cache of their features and statistics.

Reference features and statistics are cached under run_dir/cache, keyed by the data config,
split, count, the rule of :func:`real_images` and the extractor with its weights file (or,
for an ADM reference batch ``evaluate.fid_reference``, by that file and the extractor).
The file names below are what existing run directories hold: changing any part of a name or
key orphans every cache made before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from latentforge.config import ExperimentConfig, config_hash
from latentforge.metrics import inception
from latentforge.metrics.frechet import FeatureStats
from latentforge.metrics.shapesnet import ASSETS
from latentforge.platform.data import load_images
from latentforge.tokenizers.vfm import local_asset

# how evaluation picks real images (:func:`real_images`): in its cache keys and its hash
REAL_IMAGES_RULE = "real-images: hashed subset"

Featurize = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> features (N, D)


def real_images(cfg: ExperimentConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 N x H x W x 3) and labels of a split of the data: a fixed sample
    drawn across the split (``load_images(subset=n)``), not its first n files, which in
    class-sorted listings (ImageNet's folders) would hold a handful of classes. Read in
    order, so the same images on every run (fewer when some of them are corrupt)."""
    ds = load_images(cfg.data, split, subset=n).dataset.limit(n)
    ds.context.execution_options.preserve_order = True  # which n rows: never by timing
    images, labels = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


def file_identity(path: str | Path) -> list:
    """Resolved path, size and mtime: changes whenever the file is rewritten."""
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def extractor_weights(cfg: ExperimentConfig, extractor: str) -> Path | None:
    """The weights file behind a cached extractor's features, where there is one (a hub
    model named by its spec has none here: the name identifies it)."""
    ec = cfg.evaluate
    if extractor == "shapesnet":
        return ASSETS / "shapesnet.safetensors"
    if extractor.startswith("inception"):
        return inception.inception_weights_path(ec.inception_weights)
    if extractor.startswith("vfm-"):
        if ec.fd_vfm_weights:
            return Path(ec.fd_vfm_weights)
        if ec.fd_vfm and ec.fd_vfm.startswith("local:"):
            return local_asset(ec.fd_vfm.split(":", 1)[1])
    return None


def cache_file(cfg: ExperimentConfig, split: str, n: int, extractor: str, suffix: str) -> Path:
    """Cache of real images' features, keyed by everything they depend on: the data config,
    split, count, the sampling rule of :func:`real_images` and the extractor's weights file
    (so retrained weights never meet another file's cached features)."""
    weights = extractor_weights(cfg, extractor)
    identity = file_identity(weights) if weights is not None and weights.exists() else None
    key = config_hash(extractor, cfg.data, split, n, REAL_IMAGES_RULE, identity)
    name = re.sub(r"[^\w.-]+", "_", extractor)
    return Path(cfg.run_dir, "cache", f"real-{split}-{n}-{name}-{key}{suffix}.npz")


def adm_cache_file(cfg: ExperimentConfig, extractor: str, suffix: str) -> Path:
    """Cache file for ``evaluate.fid_reference`` under ``extractor``, keyed by the file's
    path, size and mtime."""
    src = Path(cfg.evaluate.fid_reference)
    key = config_hash(extractor, *file_identity(src))
    return Path(cfg.run_dir, "cache", f"adm-{src.stem}-{extractor}-{key}{suffix}.npz")


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write through a temporary file, so an interrupted run leaves no broken cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def reference_features(
    cfg: ExperimentConfig, split: str, n: int, extractor: str, featurize: Featurize
) -> np.ndarray:
    """Features (N, D) of ``n`` real images of ``split`` under ``extractor`` (``featurize``
    maps uint8 images to features), cached under run_dir/cache as float32 (exact: every
    extractor here computes in float32)."""
    path = cache_file(cfg, split, n, extractor, "-features")
    if path.exists():
        with np.load(path) as f:
            return f["features"].astype(np.float64)
    images, _ = real_images(cfg, split, n)
    feats = np.asarray(featurize(images), dtype=np.float64)
    _save_npz(path, features=feats.astype(np.float32))
    return feats


def reference_stats(
    cfg: ExperimentConfig, split: str, n: int, extractor: str, featurize: Featurize
) -> FeatureStats:
    """Feature statistics of ``n`` real images of ``split`` under ``extractor`` (named in
    the cache key; ``featurize`` as in :func:`reference_features`, whose cache is reused when
    present), cached under run_dir/cache."""
    path = cache_file(cfg, split, n, extractor, "")
    if path.exists():
        return FeatureStats.load(path)
    if cache_file(cfg, split, n, extractor, "-features").exists():
        feats = reference_features(cfg, split, n, extractor, featurize)
    else:
        images, _ = real_images(cfg, split, n)
        feats = featurize(images)
    stats = FeatureStats.of(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def spatial_reference_cache(cfg: ExperimentConfig) -> Path | None:
    """Where computed reference sFID statistics are cached (for ``evaluate.num_real``
    training images, or for the ADM batch's images); None when the batch stores them."""
    ec = cfg.evaluate
    if not ec.fid_reference:
        return cache_file(cfg, "train", ec.num_real, "inception-spatial", "")
    if inception.adm_has_spatial_stats(ec.fid_reference):
        return None
    return adm_cache_file(cfg, "inception_spatial", "")


def _with_spatial_stats(pool_pass, extractor, spatial_cache: Path | None) -> np.ndarray:
    """Run ``pool_pass()``, an Inception pass over reference images returning their pool-3
    features; when ``spatial_cache`` is given and not there yet, the same pass also saves the
    images' sFID statistics to it, so FID and sFID read and embed the reference once."""
    if spatial_cache is None or spatial_cache.exists():
        return pool_pass()
    with inception.capturing_spatial(extractor) as spatial:
        pool = pool_pass()
    stats = FeatureStats.of(np.concatenate(spatial))
    _save_npz(spatial_cache, mu=stats.mu, sigma=stats.sigma, n=stats.n)
    return pool


def _pool_featurize(cfg: ExperimentConfig, extractor, spatial_cache: Path | None) -> Featurize:
    """Pool-3 features of real images (see :func:`_with_spatial_stats` for ``spatial_cache``)."""
    bs = cfg.evaluate.batch_size
    return lambda images: _with_spatial_stats(
        partial(inception.inception_features, images, extractor, bs), extractor, spatial_cache
    )


def adm_reference_features(
    cfg: ExperimentConfig, extractor, spatial_cache: Path | None = None
) -> np.ndarray:
    """Inception pool-3 features of the images of the ADM batch ``evaluate.fid_reference``,
    cached under run_dir/cache keyed by the file (path, size, mtime) and the extractor
    (see :func:`_with_spatial_stats` for ``spatial_cache``)."""
    src = Path(cfg.evaluate.fid_reference)
    path = adm_cache_file(cfg, "inception", "-features")
    if path.exists():
        with np.load(path) as f:
            return f["features"].astype(np.float64)
    run = partial(inception.adm_features, src, extractor, cfg.evaluate.batch_size)
    feats = _with_spatial_stats(run, extractor, spatial_cache)
    _save_npz(path, features=feats.astype(np.float32))
    return feats


def inception_reference_features(
    cfg: ExperimentConfig, extractor, spatial_cache: Path | None = None
) -> tuple[np.ndarray, str]:
    """Reference pool-3 features for KID and precision/recall, and what they are: the ADM
    batch's images, or ``evaluate.num_real`` training images (cached either way; see
    :func:`_with_spatial_stats` for ``spatial_cache``)."""
    ec = cfg.evaluate
    if ec.fid_reference:
        feats = adm_reference_features(cfg, extractor, spatial_cache)
        return feats, f"{ec.fid_reference} arr_0 ({len(feats)} images)"
    featurize = _pool_featurize(cfg, extractor, spatial_cache)
    feats = reference_features(cfg, "train", ec.num_real, "inception", featurize)
    return feats, f"{len(feats)} training images"


def inception_reference_stats(
    cfg: ExperimentConfig, extractor, spatial_cache: Path | None = None
) -> tuple[FeatureStats, str]:
    """Reference pool-3 statistics for FID: the ADM batch's stored ``mu``/``sigma`` (else
    those of its images), or ``evaluate.num_real`` training images (cached either way; see
    :func:`_with_spatial_stats` for ``spatial_cache``)."""
    ec = cfg.evaluate
    if ec.fid_reference:
        with np.load(ec.fid_reference) as f:
            stored = "mu" in f and "sigma" in f
        if stored:
            return inception.reference_stats(ec.fid_reference), ec.fid_reference
        feats = adm_reference_features(cfg, extractor, spatial_cache)
        return FeatureStats.of(feats), f"{ec.fid_reference} arr_0 ({len(feats)} images)"
    featurize = _pool_featurize(cfg, extractor, spatial_cache)
    ref = reference_stats(cfg, "train", ec.num_real, "inception", featurize)
    return ref, f"{ref.n} training images"


def inception_spatial_reference_stats(cfg: ExperimentConfig, extractor) -> tuple[FeatureStats, str]:
    """Reference sFID statistics: the ADM batch's stored ``mu_s``/``sigma_s`` (else those of
    its images), or ``evaluate.num_real`` training images; computed ones are cached at
    :func:`spatial_reference_cache`, which the pool-3 reference pass may already have filled."""
    ec = cfg.evaluate
    path = spatial_reference_cache(cfg)
    if path is None:
        return inception.reference_spatial_stats(ec.fid_reference), ec.fid_reference
    if not ec.fid_reference:
        featurize = partial(
            inception.inception_spatial_features, extractor=extractor, batch_size=ec.batch_size
        )
        ref = reference_stats(cfg, "train", ec.num_real, "inception-spatial", featurize)
        return ref, f"{ref.n} training images"
    if path.exists():
        ref = FeatureStats.load(path)
    else:
        ref = inception.reference_spatial_stats(ec.fid_reference, extractor, ec.batch_size)
        _save_npz(path, mu=ref.mu, sigma=ref.sigma, n=ref.n)
    return ref, f"{ec.fid_reference} arr_0 ({ref.n} images)"
