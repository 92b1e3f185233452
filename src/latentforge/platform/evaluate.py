"""Evaluation of one run: generation and reconstruction metrics, named honestly.

What each metric of ``evaluate.metrics`` is (direction, meaning, extractor, kind) is in the
metric table, :mod:`latentforge.metrics.table`; the math in the rest of
:mod:`latentforge.metrics`; real images and the cache of their features in
:mod:`latentforge.platform.reference_cache`. This module computes the wanted metrics of one
run on a given device and writes ``metrics.json``: generation metrics of class-conditional
samples vs real training images (``fd_shapesnet`` with a real-vs-real baseline for scale;
the Inception family from one InceptionV3 pass; ``fd_vfm`` under a key naming its VFM) and
reconstruction metrics of held-out images vs their reconstructions. ``fid`` is reserved for
Inception features.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from latentforge import models  # load_tokenizer looked up when called (tests swap it)
from latentforge.config import ExperimentConfig, to_dict
from latentforge.images import grid_of
from latentforge.metrics import inception  # its passes looked up when called (tests swap them)
from latentforge.metrics.cknna import TOPK, tokenizer_alignment
from latentforge.metrics.classification import classify, confusion, per_class
from latentforge.metrics.fd_vfm import vfm_features
from latentforge.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_inf
from latentforge.metrics.reconstruction import (
    SSIM_DESCRIPTION,
    load_lpips,
    lpips_description,
    lpips_distance,
    psnr,
    reconstruct,
    require_lpips_backbone,
    ssim,
)
from latentforge.metrics.table import (
    FEATURE_SET_METRICS,
    INCEPTION_METRICS,
    METRIC_NAMES,
    RECON_METRICS,
    SAMPLE_METRICS,
    SHAPESNET_METRICS,
    VFM_METRICS,
    metric_entry,
    vfm_metric_name,
)
from latentforge.platform import reference_cache  # real_images looked up when called (tests)
from latentforge.platform.reference_cache import REAL_IMAGES_RULE
from latentforge.platform.workers import stage_task, worker_setup
from latentforge.tokenizers import vfm as vfm_models  # load_vfm looked up when called (tests)

__all__ = ["REAL_IMAGES_RULE", "check_inputs", "check_metrics", "evaluate", "run_evaluation"]

# the extractors as metrics.json names them
SHAPESNET = "shapesnet penultimate features"
INCEPTION_POOL = "torch-fidelity inception-v3-compat pool3 (2048)"
INCEPTION_LOGITS = "torch-fidelity inception-v3-compat logits_unbiased (1008)"
INCEPTION_SPATIAL = (
    "torch-fidelity inception-v3-compat Mixed_6d.branch1x1 (TF mixed_6/conv), "
    "channels 0-6 of 17x17 (2023)"
)
PR_NEIGHBOURS = 3  # k of Kynkäänniemi et al. 2019, as in ADM's evaluator


def check_metrics(names: list[str]) -> None:
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"evaluate.metrics: unknown {unknown}; known: {list(METRIC_NAMES)}")


def check_inputs(cfg: ExperimentConfig, wanted: set[str]) -> None:
    """Fail before any work on what is missing: a weights file, reference images."""
    ec = cfg.evaluate
    if wanted & INCEPTION_METRICS:
        inception.inception_weights_path(ec.inception_weights)  # raises, naming the file
    needs = sorted(FEATURE_SET_METRICS & wanted)
    if needs and ec.fid_reference and not inception.adm_has_images(ec.fid_reference):
        raise ValueError(
            f"evaluate.metrics {needs} compare feature sets, but evaluate.fid_reference "
            f"{ec.fid_reference} holds only precomputed mu/sigma (no arr_0 images). Use a "
            "reference batch with images (ADM's VIRTUAL_*.npz have them), unset "
            "evaluate.fid_reference to compare with evaluate.num_real training images, or "
            f"drop {needs} from evaluate.metrics"
        )
    ref = ec.fid_reference
    if (
        "sfid" in wanted
        and ref
        and not (inception.adm_has_spatial_stats(ref) or inception.adm_has_images(ref))
    ):
        raise ValueError(
            f"evaluate.metrics ['sfid'] needs spatial Inception statistics, but "
            f"evaluate.fid_reference {ref} holds neither mu_s/sigma_s nor arr_0 images to "
            "compute them from (only pool-3 mu/sigma). Use an ADM reference batch with mu_s/"
            "sigma_s or images, unset evaluate.fid_reference to compare with "
            "evaluate.num_real training images, or drop sfid from evaluate.metrics"
        )
    if "lpips" in wanted:
        require_lpips_backbone(ec.lpips_net)


def fd_inf_metrics(name: str, feats: np.ndarray, ref: FeatureStats, extractor, reference) -> dict:
    """FD∞ (Chong & Forsyth 2020) under ``name``, with the fit's slope and subset sizes."""
    fit = frechet_distance_inf(feats, ref)
    out = metric_entry(name, fit.value, len(feats), extractor, reference)
    out[f"{name}_slope"] = fit.slope
    out[f"{name}_sizes"] = fit.sizes
    return out


def generation_metrics(
    cfg: ExperimentConfig, samples: np.ndarray, labels: np.ndarray, wanted=None, *, device
) -> dict:
    """Embedded-classifier metrics of class-conditional samples: fd_shapesnet (with its
    real-vs-real baseline and, when wanted, FD∞) and class accuracy overall and per class;
    the classifier runs on ``device``."""
    ec = cfg.evaluate
    wanted = set(ec.metrics if wanted is None else wanted)
    feats, preds = classify(samples, device, ec.batch_size)

    def featurize(images: np.ndarray) -> np.ndarray:
        return classify(images, device, ec.batch_size)[0]

    ref = reference_cache.reference_stats(cfg, "train", ec.num_real, "shapesnet", featurize)
    n = len(samples)
    extractor, reference = f"{SHAPESNET} ({feats.shape[1]})", f"{ref.n} training images"
    out: dict = {"num_samples": n, "num_real": ref.n}
    fd = frechet_distance(FeatureStats.of(feats), ref)
    out |= metric_entry("fd_shapesnet", fd, n, extractor, reference)
    held, _ = reference_cache.real_images(cfg, "holdout", n)
    baseline = frechet_distance(FeatureStats.of(featurize(held)), ref)
    out |= metric_entry("fd_shapesnet_real_baseline", baseline, len(held), extractor, reference)
    out["num_baseline"] = len(held)
    if "fd_shapesnet_inf" in wanted:
        out |= fd_inf_metrics("fd_shapesnet_inf", feats, ref, extractor, reference)
    accuracy = float(np.mean(preds == labels))
    out |= metric_entry("class_accuracy", accuracy, n, "shapesnet classifier")
    out |= per_class("class_accuracy", labels, preds, cfg.data.num_classes)
    out["class_confusion"] = confusion(labels, preds, cfg.data.num_classes).tolist()
    return out


def _inception_pass(samples: np.ndarray, extractor, batch_size: int, spatial: bool):
    """Pool-3 features, logits and (when ``spatial``, by a hook on the same pass) sFID
    features of the samples, from one InceptionV3 pass."""
    capture = inception.capturing_spatial(extractor) if spatial else nullcontext()
    with capture as spatial_batches:
        pool, logits = inception.inception_outputs(samples, extractor, batch_size)
    return pool, logits, (np.concatenate(spatial_batches) if spatial else None)


def _frechet_inception_metrics(cfg, wanted, pool, spatial, extractor, spatial_cache) -> dict:
    """FID, FID∞ and sFID of the samples' features among ``wanted``."""
    n, out = len(pool), {}
    if wanted & {"fid", "fid_inf"}:
        ref, source = reference_cache.inception_reference_stats(cfg, extractor, spatial_cache)
    if "fid" in wanted:
        fid = frechet_distance(FeatureStats.of(pool), ref)
        out |= metric_entry("fid", fid, n, INCEPTION_POOL, source)
    if "fid_inf" in wanted:
        out |= fd_inf_metrics("fid_inf", pool, ref, INCEPTION_POOL, source)
    if "sfid" in wanted:
        spatial_ref, spatial_source = reference_cache.inception_spatial_reference_stats(
            cfg, extractor
        )
        sfid = frechet_distance(FeatureStats.of(spatial), spatial_ref)
        out |= metric_entry("sfid", sfid, n, INCEPTION_SPATIAL, spatial_source)
    return out


def _feature_set_metrics(cfg, wanted, pool, real, real_source) -> dict:
    """KID, precision and recall among ``wanted``: samples' vs reference pool-3 features."""
    ec, n, out = cfg.evaluate, len(pool), {}
    if "kid" in wanted:
        mean, std, size = inception.kernel_inception_distance(
            pool, real, ec.kid_subset_size, ec.kid_subsets
        )
        out |= metric_entry("kid", mean, n, INCEPTION_POOL, real_source)
        out |= {"kid_std": std, "kid_subset_size": size, "kid_subsets": ec.kid_subsets}
    if wanted & {"precision", "recall"}:
        precision, recall = inception.precision_recall(pool, real, k=PR_NEIGHBOURS)
        pr = f"{INCEPTION_POOL}, k={PR_NEIGHBOURS}"
        for name, value in (("precision", precision), ("recall", recall)):
            if name in wanted:
                out |= metric_entry(name, value, n, pr, real_source)
    return out


def fid_metrics(cfg: ExperimentConfig, samples: np.ndarray, wanted=("fid",), *, device) -> dict:
    """The Inception metrics in ``wanted`` (FID, FID∞, sFID, IS, KID, precision/recall) from
    one InceptionV3 pass over the samples on ``device`` (sFID's features by a hook on that
    pass), against ``evaluate.fid_reference`` (an ADM batch) or, when unset,
    ``evaluate.num_real`` training images (reference cached on disk). FD is our float64 one;
    IS, KID and precision/recall are torch-fidelity's functions."""
    ec = cfg.evaluate
    wanted = set(wanted) & INCEPTION_METRICS
    check_inputs(cfg, wanted)
    extractor = inception.load_inception(ec.inception_weights, device)
    pool, logits, spatial = _inception_pass(samples, extractor, ec.batch_size, "sfid" in wanted)
    spatial_cache = reference_cache.spatial_reference_cache(cfg) if "sfid" in wanted else None
    if wanted & FEATURE_SET_METRICS:  # first: the statistics below then reuse its cache
        real, real_source = reference_cache.inception_reference_features(
            cfg, extractor, spatial_cache
        )
    out = _frechet_inception_metrics(cfg, wanted, pool, spatial, extractor, spatial_cache)
    if "is" in wanted:
        mean, std, splits = inception.inception_score(logits)
        out |= metric_entry("is", mean, len(samples), INCEPTION_LOGITS)
        out |= {"is_std": std, "is_splits": splits}
    if wanted & FEATURE_SET_METRICS:
        out |= _feature_set_metrics(cfg, wanted, pool, real, real_source)
    return out


def vfm_metrics(cfg: ExperimentConfig, samples: np.ndarray, *, device) -> dict:
    """FD_VFM (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics",
    FD_DINOv2): our Fréchet distance on the class token of ``evaluate.fd_vfm`` (run on
    ``device``), samples vs ``evaluate.num_real`` training images, under a key naming the
    VFM (``fd_shapes_vit``), with its real-vs-real baseline ``<key>_real_baseline`` for
    scale: as many held-out real images vs the same reference."""
    ec = cfg.evaluate
    vfm = vfm_models.load_vfm(ec.fd_vfm, weights=ec.fd_vfm_weights).to(device)
    cache_name = f"vfm-{ec.fd_vfm}" + (
        f"@{Path(ec.fd_vfm_weights).name}" if ec.fd_vfm_weights else ""
    )

    def featurize(images: np.ndarray) -> np.ndarray:
        return vfm_features(images, vfm, ec.batch_size)[0]

    ref = reference_cache.reference_stats(cfg, "train", ec.num_real, cache_name, featurize)
    feats, token = vfm_features(samples, vfm, ec.batch_size)
    name, extractor = vfm_metric_name(ec.fd_vfm), f"{ec.fd_vfm} {token} ({feats.shape[1]})"
    reference = f"{ref.n} training images"
    fd = frechet_distance(FeatureStats.of(feats), ref)
    held, _ = reference_cache.real_images(cfg, "holdout", len(samples))
    baseline = frechet_distance(FeatureStats.of(featurize(held)), ref)
    out = metric_entry(name, fd, len(samples), extractor, reference)
    return out | metric_entry(f"{name}_real_baseline", baseline, len(held), extractor, reference)


def _shapesnet_recon_metrics(cfg, held, held_labels, recon, reference, device) -> dict:
    """rfd_shapesnet and recon_class_accuracy (overall and per class)."""
    bs, n = cfg.evaluate.batch_size, len(held)
    recon_feats, recon_preds = classify(recon, device, bs)
    rfd = frechet_distance(
        FeatureStats.of(recon_feats), FeatureStats.of(classify(held, device, bs)[0])
    )
    extractor = f"{SHAPESNET} ({recon_feats.shape[1]})"
    out = metric_entry("rfd_shapesnet", rfd, n, extractor, reference)
    # the ceiling of class_accuracy through this tokenizer: a generator whose latents were
    # perfect encodings would decode to images like these
    accuracy = float(np.mean(recon_preds == held_labels))
    out |= metric_entry("recon_class_accuracy", accuracy, n, "shapesnet classifier")
    out |= per_class("recon_class_accuracy", held_labels, recon_preds, cfg.data.num_classes)
    return out


def reconstruction_metrics(
    cfg: ExperimentConfig, tokenizer, out_dir: Path, lpips_model=None, *, device
) -> dict:
    """The wanted reconstruction metrics (rfd_shapesnet, psnr, ssim, lpips) of held-out
    images vs their reconstructions by ``tokenizer`` on ``device``, and ``recon.png``;
    ``lpips_model`` defaults to :func:`load_lpips`."""
    ec, wanted = cfg.evaluate, set(cfg.evaluate.metrics)
    held, held_labels = reference_cache.real_images(cfg, "holdout", ec.num_recon)
    recon = reconstruct(tokenizer, held, ec.batch_size, device)
    pairs = np.stack([held[:32], recon[:32]], axis=1).reshape(-1, *held.shape[1:])
    Image.fromarray(grid_of(pairs, cols=16)).save(out_dir / "recon.png")
    n, reference = len(held), f"{len(held)} held-out images"
    out: dict = {"num_recon": n}
    if "psnr" in wanted:
        out |= metric_entry("psnr", psnr(recon, held), n, "pixels (uint8)", reference)
    if "ssim" in wanted:
        value = ssim(recon, held, ec.batch_size)
        out |= metric_entry("ssim", value, n, SSIM_DESCRIPTION, reference)
    if "lpips" in wanted:
        model = lpips_model if lpips_model is not None else load_lpips(ec.lpips_net, device)
        value = lpips_distance(recon, held, model, ec.batch_size)
        out |= metric_entry("lpips", value, n, lpips_description(model), reference)
    if "rfd_shapesnet" in wanted:
        out |= _shapesnet_recon_metrics(cfg, held, held_labels, recon, reference, device)
    if "se_cknna" in wanted:
        out |= alignment_metrics(cfg, tokenizer, held, device=device)
    return out


def alignment_metrics(cfg: ExperimentConfig, tokenizer, held: np.ndarray, *, device) -> dict:
    """SE-CKNNA (:func:`~latentforge.metrics.cknna.tokenizer_alignment`) of the tokenizer's
    latents with ``evaluate.fd_vfm``'s patch features, over the held-out images."""
    ec = cfg.evaluate
    if len(held) <= TOPK:
        raise ValueError(
            f"evaluate.metrics ['se_cknna'] needs more than {TOPK} held-out images (its "
            f"k nearest neighbours): evaluate.num_recon is {len(held)}"
        )
    vfm = vfm_models.load_vfm(ec.fd_vfm, weights=ec.fd_vfm_weights).to(device)
    images = torch.from_numpy(held).permute(0, 3, 1, 2).float().div(255).to(device)
    values = tokenizer_alignment(tokenizer, vfm, images, ec.batch_size)
    extractor = f"tokenizer latents vs {ec.fd_vfm} mean patch token, k={TOPK}"
    out = metric_entry(
        "se_cknna", values.pop("se_cknna"), len(held), extractor, f"{len(held)} held-out images"
    )
    return out | values


def evaluate(cfg: ExperimentConfig, paths: dict, out_dir: str | Path, device="cpu") -> dict:
    """All configured metrics of one run -> ``out_dir/metrics.json``; the networks (feature
    extractors, tokenizer) run on ``device``."""
    check_metrics(cfg.evaluate.metrics)
    wanted = set(cfg.evaluate.metrics)
    check_inputs(cfg, wanted)
    metrics: dict = {}
    if wanted & SAMPLE_METRICS:
        with np.load(Path(paths["samples"], "samples.npz")) as f:
            samples, labels = f["arr_0"], f["labels"]
    if wanted & SHAPESNET_METRICS:
        metrics.update(generation_metrics(cfg, samples, labels, wanted, device=device))
    if wanted & INCEPTION_METRICS:
        metrics.update(fid_metrics(cfg, samples, wanted, device=device))
    if wanted & VFM_METRICS & SAMPLE_METRICS:
        metrics.update(vfm_metrics(cfg, samples, device=device))
    if wanted & RECON_METRICS:
        tokenizer = models.load_tokenizer(cfg, paths["tokenizer"], device)
        metrics.update(reconstruction_metrics(cfg, tokenizer, Path(out_dir), device=device))
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _evaluate_on_gpu(experiment: dict, paths: dict, out_dir: str) -> dict:
    """:func:`evaluate` in a Ray task holding a GPU (``ray.use_gpu``)."""
    cfg, device = worker_setup(experiment)
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
    # a fresh process (no TF32 setting of a sampling task), which exits after it
    task = stage_task(_evaluate_on_gpu, cfg)
    return ray.get(task.remote(to_dict(cfg), paths, str(out_dir)))
