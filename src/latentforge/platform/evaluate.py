"""Evaluation of one run: generation and reconstruction metrics, named honestly.

``evaluate.metrics`` names (see :data:`METRICS`):

- generation, class-conditional samples vs real training images:
  ``fd_shapesnet`` (Fréchet distance of the embedded classifier's penultimate features, with
  a real-vs-real baseline: held-out real images vs the same reference, same count, for
  scale), ``fd_shapesnet_inf`` (its FD∞ extrapolation), ``class_accuracy`` (the embedded
  classifier's predictions vs the requested labels, overall and per class); the Inception
  family ``fid``, ``fid_inf``, ``sfid`` (FD on spatial features, Nash et al. 2021, as ADM's
  evaluator computes it), ``is``, ``kid``, ``precision``, ``recall``, all from one
  InceptionV3 pass over the samples; ``fd_vfm``, FD on a VFM's class token (FD_DINOv2 of
  Stein et al. 2023), reported under a key naming the VFM (``fd_shapes_vit``, ...), with
  the same real-vs-real baseline as ``fd_shapesnet``.
- reconstruction, held-out images vs their reconstructions: ``rfd_shapesnet``, ``psnr``,
  ``ssim``, ``lpips``.

``fid`` is reserved for Inception features. In ``metrics.json`` every metric ``m`` comes
with ``m_num_samples``, ``m_extractor`` and, where it compares with a reference set,
``m_reference``. Reference features and statistics are cached on disk under
run_dir/cache, keyed by the data config, split, count and extractor (or, for an ADM
reference batch, by the file and the extractor).
"""

from __future__ import annotations

import contextvars
import json
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

from latentforge.config import ExperimentConfig, config_hash
from latentforge.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_inf

# how evaluation picks real images (:func:`real_images`): in its cache keys and its hash
REAL_IMAGES_RULE = "real-images: hashed subset"

METRICS = (
    "fd_shapesnet",
    "fd_shapesnet_inf",
    "class_accuracy",
    "fid",
    "fid_inf",
    "sfid",
    "is",
    "kid",
    "precision",
    "recall",
    "fd_vfm",
    "rfd_shapesnet",
    "psnr",
    "ssim",
    "lpips",
)
SHAPESNET_METRICS = frozenset({"fd_shapesnet", "fd_shapesnet_inf", "class_accuracy"})
INCEPTION_METRICS = frozenset({"fid", "fid_inf", "sfid", "is", "kid", "precision", "recall"})
FEATURE_SET_METRICS = frozenset({"kid", "precision", "recall"})  # need reference features
SAMPLE_METRICS = SHAPESNET_METRICS | INCEPTION_METRICS | {"fd_vfm"}
RECON_METRICS = frozenset({"rfd_shapesnet", "psnr", "ssim", "lpips"})

SHAPESNET = "shapesnet penultimate features"
INCEPTION_POOL = "torch-fidelity inception-v3-compat pool3 (2048)"
INCEPTION_LOGITS = "torch-fidelity inception-v3-compat logits_unbiased (1008)"
INCEPTION_SPATIAL = (
    "torch-fidelity inception-v3-compat Mixed_6d.branch1x1 (TF mixed_6/conv), "
    "channels 0-6 of 17x17 (2023)"
)
SSIM = "pytorch-msssim SSIM (11x11 Gaussian window, sigma 1.5, RGB mean)"
PR_NEIGHBOURS = 3  # k of Kynkäänniemi et al. 2019, as in ADM's evaluator


def check_metrics(names: list[str]) -> None:
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"evaluate.metrics: unknown {unknown}; known: {list(METRICS)}")


def check_inputs(cfg: ExperimentConfig, wanted: set[str]) -> None:
    """Fail before any work on what is missing: a weights file, reference images."""
    from latentforge.metrics.inception import (
        adm_has_images,
        adm_has_spatial_stats,
        inception_weights_path,
    )
    from latentforge.metrics.reconstruction import require_lpips_backbone

    ec = cfg.evaluate
    if wanted & INCEPTION_METRICS:
        inception_weights_path(ec.inception_weights)  # raises, naming the file
    needs = sorted(FEATURE_SET_METRICS & wanted)
    if needs and ec.fid_reference and not adm_has_images(ec.fid_reference):
        raise ValueError(
            f"evaluate.metrics {needs} compare feature sets, but evaluate.fid_reference "
            f"{ec.fid_reference} holds only precomputed mu/sigma (no arr_0 images). Use a "
            "reference batch with images (ADM's VIRTUAL_*.npz have them), unset "
            "evaluate.fid_reference to compare with evaluate.num_real training images, or "
            f"drop {needs} from evaluate.metrics"
        )
    ref = ec.fid_reference
    if "sfid" in wanted and ref and not (adm_has_spatial_stats(ref) or adm_has_images(ref)):
        raise ValueError(
            f"evaluate.metrics ['sfid'] needs spatial Inception statistics, but "
            f"evaluate.fid_reference {ref} holds neither mu_s/sigma_s nor arr_0 images to "
            "compute them from (only pool-3 mu/sigma). Use an ADM reference batch with mu_s/"
            "sigma_s or images, unset evaluate.fid_reference to compare with "
            "evaluate.num_real training images, or drop sfid from evaluate.metrics"
        )
    if "lpips" in wanted:
        require_lpips_backbone(ec.lpips_net)


def described(
    name: str, value, num_samples: int, extractor: str, reference: str | None = None
) -> dict:
    """``name`` with its sample count, extractor and (when compared with one) reference."""
    out = {name: value, f"{name}_num_samples": num_samples, f"{name}_extractor": extractor}
    if reference is not None:
        out[f"{name}_reference"] = reference
    return out


def real_images(cfg: ExperimentConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 N x H x W x 3) and labels of a split of the data: a fixed sample
    drawn across the split (``load_images(subset=n)``), not its first n files, which in
    class-sorted listings (ImageNet's folders) would hold a handful of classes. Read in
    order, so the same images on every run (fewer when some of them are corrupt)."""
    from latentforge.platform.data import load_images

    ds = load_images(cfg.data, split, subset=n).dataset.limit(n)
    ds.context.execution_options.preserve_order = True  # which n rows: never by timing
    images, labels = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


DEVICE = contextvars.ContextVar("evaluate_device", default="cpu")  # set by :func:`evaluate`


@torch.no_grad()
def classify(images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Embedded classifier features (N, D) and predicted classes (N,) of uint8 images."""
    from latentforge.metrics.shapesnet import load_shapesnet

    net = load_shapesnet(DEVICE.get())
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(DEVICE.get())
        feats.append(net.features(x).double().cpu().numpy())
        preds.append(net(x).argmax(dim=1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds)


def file_identity(path: str | Path) -> list:
    """Resolved path, size and mtime: changes whenever the file is rewritten."""
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def extractor_weights(cfg: ExperimentConfig, extractor: str) -> Path | None:
    """The weights file behind a cached extractor's features, where there is one (a hub
    model named by its spec has none here: the name identifies it)."""
    ec = cfg.evaluate
    if extractor == "shapesnet":
        from latentforge.metrics.shapesnet import ASSETS

        return ASSETS / "shapesnet.safetensors"
    if extractor.startswith("inception"):
        from latentforge.metrics.inception import inception_weights_path

        return inception_weights_path(ec.inception_weights)
    if extractor.startswith("vfm-"):
        if ec.fd_vfm_weights:
            return Path(ec.fd_vfm_weights)
        if ec.fd_vfm and ec.fd_vfm.startswith("local:"):
            from latentforge.tokenizers.vfm import local_asset

            return local_asset(ec.fd_vfm.split(":", 1)[1])
    return None


def _cache_file(cfg: ExperimentConfig, split: str, n: int, extractor: str, suffix: str) -> Path:
    """Cache of real images' features, keyed by everything they depend on: the data config,
    split, count, the sampling rule of :func:`real_images` and the extractor's weights file
    (so retrained weights never meet another file's cached features)."""
    weights = extractor_weights(cfg, extractor)
    identity = file_identity(weights) if weights is not None and weights.exists() else None
    key = config_hash(extractor, cfg.data, split, n, REAL_IMAGES_RULE, identity)
    name = re.sub(r"[^\w.-]+", "_", extractor)
    return Path(cfg.run_dir, "cache", f"real-{split}-{n}-{name}-{key}{suffix}.npz")


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write through a temporary file, so an interrupted run leaves no broken cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _featurize(cfg: ExperimentConfig, featurize):
    return featurize or (lambda images: classify(images, cfg.evaluate.batch_size)[0])


def reference_features(
    cfg: ExperimentConfig, split: str, n: int, extractor: str = "shapesnet", featurize=None
) -> np.ndarray:
    """Features (N, D) of ``n`` real images of ``split`` under ``extractor`` (``featurize``
    maps uint8 images to features, the embedded classifier's by default), cached under
    run_dir/cache as float32 (exact: every extractor here computes in float32)."""
    path = _cache_file(cfg, split, n, extractor, "-features")
    if path.exists():
        with np.load(path) as f:
            return f["features"].astype(np.float64)
    images, _ = real_images(cfg, split, n)
    feats = np.asarray(_featurize(cfg, featurize)(images), dtype=np.float64)
    _save_npz(path, features=feats.astype(np.float32))
    return feats


def reference_stats(
    cfg: ExperimentConfig, split: str, n: int, extractor: str = "shapesnet", featurize=None
) -> FeatureStats:
    """Feature statistics of ``n`` real images of ``split`` under ``extractor`` (named in
    the cache key; ``featurize`` as in :func:`reference_features`, whose cache is reused when
    present), cached under run_dir/cache."""
    path = _cache_file(cfg, split, n, extractor, "")
    if path.exists():
        return FeatureStats.load(path)
    if _cache_file(cfg, split, n, extractor, "-features").exists():
        feats = reference_features(cfg, split, n, extractor, featurize)
    else:
        images, _ = real_images(cfg, split, n)
        feats = _featurize(cfg, featurize)(images)
    stats = FeatureStats.of(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def _adm_cache_file(cfg: ExperimentConfig, extractor: str, suffix: str) -> Path:
    """Cache file for ``evaluate.fid_reference`` under ``extractor``, keyed by the file's
    path, size and mtime."""
    src = Path(cfg.evaluate.fid_reference)
    key = config_hash(extractor, *file_identity(src))
    return Path(cfg.run_dir, "cache", f"adm-{src.stem}-{extractor}-{key}{suffix}.npz")


def spatial_reference_cache(cfg: ExperimentConfig) -> Path | None:
    """Where computed reference sFID statistics are cached (for ``evaluate.num_real``
    training images, or for the ADM batch's images); None when the batch stores them."""
    from latentforge.metrics.inception import adm_has_spatial_stats

    ec = cfg.evaluate
    if not ec.fid_reference:
        return _cache_file(cfg, "train", ec.num_real, "inception-spatial", "")
    if adm_has_spatial_stats(ec.fid_reference):
        return None
    return _adm_cache_file(cfg, "inception_spatial", "")


def _with_spatial_stats(pool_pass, extractor, spatial_cache: Path | None) -> np.ndarray:
    """Run ``pool_pass()``, an Inception pass over reference images returning their pool-3
    features; when ``spatial_cache`` is given and not there yet, the same pass also saves the
    images' sFID statistics to it, so FID and sFID read and embed the reference once."""
    from latentforge.metrics.inception import capturing_spatial

    if spatial_cache is None or spatial_cache.exists():
        return pool_pass()
    with capturing_spatial(extractor) as spatial:
        pool = pool_pass()
    stats = FeatureStats.of(np.concatenate(spatial))
    _save_npz(spatial_cache, mu=stats.mu, sigma=stats.sigma, n=stats.n)
    return pool


def _train_featurize(cfg: ExperimentConfig, extractor, spatial_cache: Path | None):
    """Pool-3 features of real images (see :func:`_with_spatial_stats` for ``spatial_cache``)."""
    from latentforge.metrics.inception import inception_features

    bs = cfg.evaluate.batch_size
    return lambda images: _with_spatial_stats(
        partial(inception_features, images, extractor, bs), extractor, spatial_cache
    )


def adm_reference_features(
    cfg: ExperimentConfig, extractor, spatial_cache: Path | None = None
) -> np.ndarray:
    """Inception pool-3 features of the images of the ADM batch ``evaluate.fid_reference``,
    cached under run_dir/cache keyed by the file (path, size, mtime) and the extractor
    (see :func:`_with_spatial_stats` for ``spatial_cache``)."""
    from latentforge.metrics.inception import adm_features

    src = Path(cfg.evaluate.fid_reference)
    path = _adm_cache_file(cfg, "inception", "-features")
    if path.exists():
        with np.load(path) as f:
            return f["features"].astype(np.float64)
    run = partial(adm_features, src, extractor, cfg.evaluate.batch_size)
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
    featurize = _train_featurize(cfg, extractor, spatial_cache)
    feats = reference_features(cfg, "train", ec.num_real, "inception", featurize)
    return feats, f"{len(feats)} training images"


def inception_reference_stats(
    cfg: ExperimentConfig, extractor, spatial_cache: Path | None = None
) -> tuple[FeatureStats, str]:
    """Reference pool-3 statistics for FID: the ADM batch's stored ``mu``/``sigma`` (else
    those of its images), or ``evaluate.num_real`` training images (cached either way; see
    :func:`_with_spatial_stats` for ``spatial_cache``)."""
    from latentforge.metrics.inception import reference_stats as adm_stats

    ec = cfg.evaluate
    if ec.fid_reference:
        with np.load(ec.fid_reference) as f:
            stored = "mu" in f and "sigma" in f
        if stored:
            return adm_stats(ec.fid_reference), ec.fid_reference
        feats = adm_reference_features(cfg, extractor, spatial_cache)
        return FeatureStats.of(feats), f"{ec.fid_reference} arr_0 ({len(feats)} images)"
    featurize = _train_featurize(cfg, extractor, spatial_cache)
    ref = reference_stats(cfg, "train", ec.num_real, "inception", featurize)
    return ref, f"{ref.n} training images"


def inception_spatial_reference_stats(cfg: ExperimentConfig, extractor) -> tuple[FeatureStats, str]:
    """Reference sFID statistics: the ADM batch's stored ``mu_s``/``sigma_s`` (else those of
    its images), or ``evaluate.num_real`` training images; computed ones are cached at
    :func:`spatial_reference_cache`, which the pool-3 reference pass may already have filled."""
    from latentforge.metrics import inception as inc

    ec = cfg.evaluate
    path = spatial_reference_cache(cfg)
    if path is None:
        return inc.reference_spatial_stats(ec.fid_reference), ec.fid_reference
    if not ec.fid_reference:
        featurize = partial(
            inc.inception_spatial_features, extractor=extractor, batch_size=ec.batch_size
        )
        ref = reference_stats(cfg, "train", ec.num_real, "inception-spatial", featurize)
        return ref, f"{ref.n} training images"
    if path.exists():
        ref = FeatureStats.load(path)
    else:
        ref = inc.reference_spatial_stats(ec.fid_reference, extractor, ec.batch_size)
        _save_npz(path, mu=ref.mu, sigma=ref.sigma, n=ref.n)
    return ref, f"{ec.fid_reference} arr_0 ({ref.n} images)"


def fd_inf_metrics(name: str, feats: np.ndarray, ref: FeatureStats, extractor, reference) -> dict:
    """FD∞ (Chong & Forsyth 2020) under ``name``, with the fit's slope and subset sizes."""
    fit = frechet_distance_inf(feats, ref)
    out = described(name, fit.value, len(feats), extractor, reference)
    out[f"{name}_slope"] = fit.slope
    out[f"{name}_sizes"] = fit.sizes
    return out


def fid_metrics(cfg: ExperimentConfig, samples: np.ndarray, wanted=("fid",)) -> dict:
    """The Inception metrics in ``wanted`` (FID, FID∞, sFID, IS, KID, precision/recall) from
    one InceptionV3 pass over the samples (sFID's features by a hook on that pass), against
    ``evaluate.fid_reference`` (an ADM batch) or, when unset, ``evaluate.num_real`` training
    images (reference cached on disk). FD is our float64 one; IS, KID and precision/recall
    are torch-fidelity's functions."""
    from latentforge.metrics import inception as inc

    ec = cfg.evaluate
    wanted = set(wanted) & INCEPTION_METRICS
    check_inputs(cfg, wanted)
    extractor = inc.load_inception(ec.inception_weights, DEVICE.get())
    capture = inc.capturing_spatial(extractor) if "sfid" in wanted else nullcontext()
    with capture as spatial:  # sFID features from the same pass, by a hook
        pool, logits = inc.inception_outputs(samples, extractor, ec.batch_size)
    spatial_cache = spatial_reference_cache(cfg) if "sfid" in wanted else None
    n = len(samples)
    out: dict = {}
    if wanted & FEATURE_SET_METRICS:  # first: the statistics below then reuse its cache
        real, real_source = inception_reference_features(cfg, extractor, spatial_cache)
    if wanted & {"fid", "fid_inf"}:
        ref, source = inception_reference_stats(cfg, extractor, spatial_cache)
    if "fid" in wanted:
        out |= described(
            "fid", frechet_distance(FeatureStats.of(pool), ref), n, INCEPTION_POOL, source
        )
    if "fid_inf" in wanted:
        out |= fd_inf_metrics("fid_inf", pool, ref, INCEPTION_POOL, source)
    if "sfid" in wanted:
        spatial_ref, spatial_source = inception_spatial_reference_stats(cfg, extractor)
        sfid = frechet_distance(FeatureStats.of(np.concatenate(spatial)), spatial_ref)
        out |= described("sfid", sfid, n, INCEPTION_SPATIAL, spatial_source)
    if "is" in wanted:
        mean, std, splits = inc.inception_score(logits)
        out |= described("is", mean, n, INCEPTION_LOGITS) | {"is_std": std, "is_splits": splits}
    if "kid" in wanted:
        mean, std, size = inc.kernel_inception_distance(
            pool, real, ec.kid_subset_size, ec.kid_subsets
        )
        out |= described("kid", mean, n, INCEPTION_POOL, real_source)
        out |= {"kid_std": std, "kid_subset_size": size, "kid_subsets": ec.kid_subsets}
    if wanted & {"precision", "recall"}:
        precision, recall = inc.precision_recall(pool, real, k=PR_NEIGHBOURS)
        pr = f"{INCEPTION_POOL}, k={PR_NEIGHBOURS}"
        for name, value in (("precision", precision), ("recall", recall)):
            if name in wanted:
                out |= described(name, value, n, pr, real_source)
    return out


def vfm_metric_name(spec: str) -> str:
    """The metrics.json key of ``fd_vfm`` for a VFM spec: ``local:shapes-vit`` ->
    ``fd_shapes_vit``, ``hf:facebook/dinov2-base`` -> ``fd_dinov2_base``."""
    name = spec.partition(":")[2].rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
    return "fd_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@torch.no_grad()
def vfm_features(images: np.ndarray, vfm, batch_size: int) -> tuple[np.ndarray, str]:
    """A VFM's class token (the mean patch token of its last layer when it has none) of
    uint8 images: features (N, C) float64 and which token was used."""
    from latentforge.images import images_to_float

    device = next(vfm.parameters()).device
    feats, token = [], "class token"
    for i in range(0, len(images), batch_size):
        out = vfm(images_to_float(torch.from_numpy(images[i : i + batch_size])).to(device))
        if out.cls is None:
            token = "mean patch token"
        pooled = out.cls if out.cls is not None else out.patch[-1].mean(dim=(2, 3))  # (B, C)
        feats.append(pooled.double().cpu().numpy())
    return np.concatenate(feats), token


def vfm_metrics(cfg: ExperimentConfig, samples: np.ndarray) -> dict:
    """FD_VFM (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics",
    FD_DINOv2): our Fréchet distance on the class token of ``evaluate.fd_vfm``, samples vs
    ``evaluate.num_real`` training images, under a key naming the VFM (``fd_shapes_vit``),
    with its real-vs-real baseline ``<key>_real_baseline`` for scale: as many held-out real
    images vs the same reference."""
    from latentforge.tokenizers.vfm import load_vfm

    ec = cfg.evaluate
    vfm = load_vfm(ec.fd_vfm, weights=ec.fd_vfm_weights).to(DEVICE.get())
    cache_name = f"vfm-{ec.fd_vfm}" + (
        f"@{Path(ec.fd_vfm_weights).name}" if ec.fd_vfm_weights else ""
    )
    ref = reference_stats(
        cfg,
        "train",
        ec.num_real,
        cache_name,
        lambda images: vfm_features(images, vfm, ec.batch_size)[0],
    )
    feats, token = vfm_features(samples, vfm, ec.batch_size)
    name, extractor = vfm_metric_name(ec.fd_vfm), f"{ec.fd_vfm} {token} ({feats.shape[1]})"
    reference = f"{ref.n} training images"
    fd = frechet_distance(FeatureStats.of(feats), ref)
    held, _ = real_images(cfg, "holdout", len(samples))
    baseline = frechet_distance(FeatureStats.of(vfm_features(held, vfm, ec.batch_size)[0]), ref)
    out = described(name, fd, len(samples), extractor, reference)
    return out | described(f"{name}_real_baseline", baseline, len(held), extractor, reference)


def generation_metrics(
    cfg: ExperimentConfig, samples: np.ndarray, labels: np.ndarray, wanted=None
) -> dict:
    """Embedded-classifier metrics of class-conditional samples: fd_shapesnet (with its
    real-vs-real baseline and, when wanted, FD∞) and class accuracy overall and per class."""
    wanted = set(cfg.evaluate.metrics if wanted is None else wanted)
    feats, preds = classify(samples, cfg.evaluate.batch_size)
    ref = reference_stats(cfg, "train", cfg.evaluate.num_real)
    n = len(samples)
    extractor, reference = f"{SHAPESNET} ({feats.shape[1]})", f"{ref.n} training images"
    out: dict = {"num_samples": n, "num_real": ref.n}
    out |= described(
        "fd_shapesnet", frechet_distance(FeatureStats.of(feats), ref), n, extractor, reference
    )
    held, _ = real_images(cfg, "holdout", n)
    baseline = frechet_distance(FeatureStats.of(classify(held, cfg.evaluate.batch_size)[0]), ref)
    out |= described("fd_shapesnet_real_baseline", baseline, len(held), extractor, reference)
    out["num_baseline"] = len(held)
    if "fd_shapesnet_inf" in wanted:
        out |= fd_inf_metrics("fd_shapesnet_inf", feats, ref, extractor, reference)
    out |= described("class_accuracy", float(np.mean(preds == labels)), n, "shapesnet classifier")
    out |= per_class("class_accuracy", labels, preds, cfg.data.num_classes)
    out["class_confusion"] = confusion(labels, preds, cfg.data.num_classes).tolist()
    return out


def per_class(name: str, labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """``<name>_per_class`` (accuracy of each class; None where it has no samples) and
    ``<name>_per_class_num_samples``."""
    counts = [int(np.sum(labels == c)) for c in range(num_classes)]
    accuracy = [
        float(np.mean(preds[labels == c] == c)) if k else None for c, k in enumerate(counts)
    ]
    return {f"{name}_per_class": accuracy, f"{name}_per_class_num_samples": counts}


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (requested class, predicted class) of the embedded classifier, which always
    chooses among all ``shapes`` classes (a run on fewer still sees every column)."""
    from latentforge.shapes import NUM_CLASSES

    cols = max(NUM_CLASSES, int(preds.max(initial=0)) + 1)
    flat = np.bincount(labels.astype(np.int64) * cols + preds, minlength=num_classes * cols)
    return flat[: num_classes * cols].reshape(num_classes, cols)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.maximum((diff**2).reshape(len(a), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


@torch.no_grad()
def reconstruct(tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Decoded encodings of uint8 (N, H, W, 3) ``images``, at most ``batch_size`` images
    (and :data:`~latentforge.generators.generate.TOKENIZER_PIXELS` pixels) per call."""
    from latentforge.generators.generate import tokenizer_batch
    from latentforge.images import images_to_float, to_uint8

    out = []
    batch_size = tokenizer_batch(images.shape[1], batch_size)
    for i in range(0, len(images), batch_size):
        x = images_to_float(torch.from_numpy(images[i : i + batch_size]))
        x = x.to(DEVICE.get())
        out.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))
    return np.concatenate(out)


def lpips_description(model) -> str:
    rand = " (random backbone: tests only)" if getattr(model, "pnet_rand", False) else ""
    return f"lpips v{model.version} {model.pnet_type}{rand}"


def reconstruction_metrics(
    cfg: ExperimentConfig, tokenizer, out_dir: Path, lpips_model=None
) -> dict:
    """The wanted reconstruction metrics (rfd_shapesnet, psnr, ssim, lpips) of held-out
    images vs their reconstructions; ``lpips_model`` defaults to :func:`load_lpips`."""
    from PIL import Image

    from latentforge.images import grid_of
    from latentforge.metrics.reconstruction import load_lpips, lpips_distance, ssim

    ec, wanted = cfg.evaluate, set(cfg.evaluate.metrics)
    held, held_labels = real_images(cfg, "holdout", ec.num_recon)
    recon = reconstruct(tokenizer, held, ec.batch_size)
    pairs = np.stack([held[:32], recon[:32]], axis=1).reshape(-1, *held.shape[1:])
    Image.fromarray(grid_of(pairs, cols=16)).save(out_dir / "recon.png")
    n, reference = len(held), f"{len(held)} held-out images"
    out: dict = {"num_recon": n}
    if "psnr" in wanted:
        out |= described("psnr", psnr(recon, held), n, "pixels (uint8)", reference)
    if "ssim" in wanted:
        out |= described("ssim", ssim(recon, held, ec.batch_size), n, SSIM, reference)
    if "lpips" in wanted:
        model = lpips_model if lpips_model is not None else load_lpips(ec.lpips_net, DEVICE.get())
        value = lpips_distance(recon, held, model, ec.batch_size)
        out |= described("lpips", value, n, lpips_description(model), reference)
    if "rfd_shapesnet" in wanted:
        recon_feats, recon_preds = classify(recon, ec.batch_size)
        rfd = frechet_distance(
            FeatureStats.of(recon_feats), FeatureStats.of(classify(held, ec.batch_size)[0])
        )
        extractor = f"{SHAPESNET} ({recon_feats.shape[1]})"
        out |= described("rfd_shapesnet", rfd, n, extractor, reference)
        # the ceiling of class_accuracy through this tokenizer: a generator whose latents were
        # perfect encodings would decode to images like these
        accuracy = float(np.mean(recon_preds == held_labels))
        out |= described("recon_class_accuracy", accuracy, n, "shapesnet classifier")
        out |= per_class("recon_class_accuracy", held_labels, recon_preds, cfg.data.num_classes)
    return out


def evaluate(cfg: ExperimentConfig, paths: dict, out_dir: str | Path, device="cpu") -> dict:
    """All configured metrics of one run -> ``out_dir/metrics.json``; the networks (feature
    extractors, tokenizer) run on ``device``."""
    token = DEVICE.set(str(device))
    try:
        return _evaluate(cfg, paths, Path(out_dir))
    finally:
        DEVICE.reset(token)


def _evaluate(cfg: ExperimentConfig, paths: dict, out_dir: Path) -> dict:
    from latentforge.models import load_tokenizer

    check_metrics(cfg.evaluate.metrics)
    wanted = set(cfg.evaluate.metrics)
    check_inputs(cfg, wanted)
    metrics: dict = {}
    if wanted & SAMPLE_METRICS:
        with np.load(Path(paths["samples"], "samples.npz")) as f:
            samples, labels = f["arr_0"], f["labels"]
    if wanted & SHAPESNET_METRICS:
        metrics.update(generation_metrics(cfg, samples, labels, wanted))
    if wanted & INCEPTION_METRICS:
        metrics.update(fid_metrics(cfg, samples, wanted))
    if "fd_vfm" in wanted:
        metrics.update(vfm_metrics(cfg, samples))
    if wanted & RECON_METRICS:
        tokenizer = load_tokenizer(cfg, paths["tokenizer"], DEVICE.get())
        metrics.update(reconstruction_metrics(cfg, tokenizer, out_dir))
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _evaluate_task(experiment: dict, paths: dict, out_dir: str) -> dict:
    """:func:`evaluate` in a Ray task holding a GPU (``ray.use_gpu``)."""
    import ray

    from latentforge.config import from_dict

    cfg = from_dict(experiment)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held = ray.get_runtime_context().get_assigned_resources()
    return {"metrics": evaluate(cfg, paths, out_dir, device), "device": device, "resources": held}


def run_evaluation(cfg: ExperimentConfig, paths: dict, out_dir: str | Path) -> dict:
    """:func:`evaluate` where the run's compute is: in-process on the driver for CPU runs;
    with ``ray.use_gpu``, in a Ray task holding one GPU (a cluster's head has none, and
    the Inception pass over 50k samples and the tokenizer at 256 px belong on a GPU).
    Returns the metrics, the device they were computed on and (in a task) the resources
    it held."""
    if not cfg.ray.use_gpu:
        return {"metrics": evaluate(cfg, paths, out_dir), "device": "cpu"}
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from latentforge.config import to_dict

    # a fresh process (no TF32 setting of a sampling task), which exits after it
    task = ray.remote(max_calls=1)(_evaluate_task).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(task.remote(to_dict(cfg), paths, str(out_dir)))
