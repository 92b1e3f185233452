"""Latent diagnostics of an extraction -> ``diagnostics.json`` beside its ``stats.json`` and
``manifest.json``: the wiring of :mod:`latentforge.metrics.diagnostics` (what each one is),
:mod:`latentforge.metrics.cknna` (SE-CKNNA) and the metric table's names.

The extract stage runs them after its extraction and again whenever it finds itself
cached, so a file that is missing (diagnostics turned on later) or partial (a killed run, a
diagnostic added to ``extract.diagnostics.metrics``) is completed, and a complete one is
left as it is: a diagnostic in the file is not computed again while the settings it was
computed under are the same. They are in no stage hash and change no stage's output; they
draw random numbers from their own seeded generators only.

- ``linear_probe`` and ``effective_dim`` read ``num_latents`` stored latents (``latent``,
  not the flips), spread over the shards (at most :data:`SPREAD_SHARDS` of them, evenly
  along the manifest, rows drawn by ``seed``) and normalised by the extraction's
  ``stats.json``.
- ``se_cknna`` and ``robustness`` (``robustness_shapesnet``) encode ``num_images``
  held-out images (evaluation's real-image rule, so evaluation's own held-out images).
  SE-CKNNA's VFM is ``extract.vfm`` when set, else ``evaluate.fd_vfm``; when it cannot be
  loaded here, ``latent_se_cknna_unavailable`` says why instead of a number.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import get_args

import numpy as np
import ray
import torch

from latentforge import models
from latentforge.config import ConfigError, ExperimentConfig, to_dict
from latentforge.metrics import diagnostics as diag
from latentforge.metrics.cknna import TOPK, tokenizer_alignment
from latentforge.metrics.classification import classify
from latentforge.metrics.frechet import FeatureStats, frechet_distance
from latentforge.metrics.reconstruction import psnr
from latentforge.metrics.table import (
    DIAGNOSTIC_NAMES,
    DiagnosticGroup,
    metric_entry,
    per_sigma_key,
)
from latentforge.platform import reference_cache
from latentforge.platform.shards import Store, tensor_column
from latentforge.platform.workers import stage_task, worker_setup
from latentforge.tokenizers import vfm as vfm_models

FILE = "diagnostics.json"
SPREAD_SHARDS = 64  # shards the probe's latents are drawn from, at most


def check_diagnostics(cfg: ExperimentConfig) -> None:
    """``extract.diagnostics``'s counts and noise sizes, or a :class:`ConfigError` naming
    the key (names are checked by the schema at load)."""
    d = cfg.extract.diagnostics
    for key in ("num_latents", "probe_test", "num_images"):
        if getattr(d, key) < 1:
            raise ConfigError(f"extract.diagnostics.{key}: must be positive, got {getattr(d, key)}")
    if d.probe_test >= d.num_latents:
        raise ConfigError(
            f"extract.diagnostics.probe_test: {d.probe_test} leaves no latents of "
            f"extract.diagnostics.num_latents ({d.num_latents}) to fit the probe on"
        )
    if d.probe_ridge <= 0 or any(s <= 0 for s in d.noise):
        raise ConfigError("extract.diagnostics: probe_ridge and every noise sigma must be > 0")


def vfm_spec(cfg: ExperimentConfig) -> dict:
    """SE-CKNNA's VFM: the extraction's (``extract.vfm``), else evaluation's."""
    ex, ev = cfg.extract, cfg.evaluate
    if ex.vfm:
        return {
            "key": "extract.vfm",
            "spec": ex.vfm,
            "weights": ex.vfm_weights,
            "resize": ex.vfm_resize,
        }
    return {
        "key": "evaluate.fd_vfm",
        "spec": ev.fd_vfm,
        "weights": ev.fd_vfm_weights,
        "resize": None,
    }


def settings_of(cfg: ExperimentConfig) -> dict:
    """What the file's values depend on besides the extraction itself."""
    settings = to_dict(cfg.extract.diagnostics)
    del settings["metrics"]
    return settings | {"vfm": vfm_spec(cfg)["spec"]}


# ----------------------------------------------------------------------------- latents


def sample_latents(out_dir: str | Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``n`` stored latents (N, *latent_shape) and their labels: ceil(n / k) rows
    drawn by ``seed`` from each of k <= :data:`SPREAD_SHARDS` shards evenly spaced along the
    manifest (a class-sorted source still gives several classes), in manifest order."""
    store = Store.open(out_dir)
    shards = store.read_json("manifest.json")["shards"]
    k = min(len(shards), SPREAD_SHARDS)
    picks = sorted({int(i) for i in np.linspace(0, len(shards) - 1, k).round()})
    per, rng = math.ceil(n / len(picks)), np.random.default_rng(seed)
    latents, labels = [], []
    for i in picks:
        table = store.read_table(shards[i]["file"], columns=["latent", "label"])
        rows = np.sort(rng.choice(table.num_rows, min(per, table.num_rows), replace=False))
        latents.append(tensor_column(table, "latent")[rows])
        labels.append(table.column("label").to_numpy()[rows])
    return torch.from_numpy(np.concatenate(latents)[:n]), torch.from_numpy(
        np.concatenate(labels)[:n]
    )


def probe_and_spectrum(cfg, out_dir, stats: dict, wanted: set, device) -> dict:
    """``linear_probe`` and ``effective_dim`` on the stored latents."""
    d = cfg.extract.diagnostics
    latents, labels = sample_latents(out_dir, d.num_latents, d.seed)
    mean, std = models.latent_mean_std(stats, device)
    x = diag.flatten(latents.to(device), mean, std)  # (N, D)
    out: dict = {}
    if "linear_probe" in wanted:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(d.seed))
        n_test = max(1, round(len(x) * d.probe_test / d.num_latents))
        test, fit = order[:n_test].to(device), order[n_test:].to(device)
        labels = labels.to(device)
        probe = diag.ridge_probe(x[fit], labels[fit], x[test], labels[test], d.probe_ridge)
        extractor = f"ridge classifier on normalised flattened latents ({x.shape[1]})"
        reference = f"fit on {probe['num_fit']} stored latents"
        out |= metric_entry("probe_accuracy", probe["accuracy"], n_test, extractor, reference)
        out |= {f"probe_{k}": probe[k] for k in ("num_fit", "num_test", "classes", "chance")}
    if "effective_dim" in wanted:
        spectrum = diag.effective_dimension(x)
        out |= metric_entry(
            "participation_ratio", spectrum["participation_ratio"], len(x), "covariance spectrum"
        )
        for q in diag.VARIANCE_SHARES:
            out[f"pca_dims_{round(q * 100)}"] = spectrum[f"dims_{round(q * 100)}"]
        out["latent_dim"] = spectrum["dim"]
    return out


# ----------------------------------------------------------------------------- images


def alignment(cfg, tokenizer, held: np.ndarray, device) -> dict:
    """``se_cknna``: :func:`~latentforge.metrics.cknna.tokenizer_alignment` under the key
    ``latent_se_cknna``, or why it is unavailable."""
    vfm_cfg = vfm_spec(cfg)
    if len(held) <= TOPK:
        return {"latent_se_cknna_unavailable": f"needs more than {TOPK} held-out images"}
    try:
        vfm_models.check_vfm_spec(vfm_cfg["key"], vfm_cfg["spec"], vfm_cfg["weights"])
        kwargs = {"resize": vfm_cfg["resize"], "weights": vfm_cfg["weights"]}
        vfm = vfm_models.load_vfm(vfm_cfg["spec"], **kwargs).to(device)
    except (OSError, ValueError) as e:
        return {"latent_se_cknna_unavailable": f"no VFM: {' '.join(str(e).split())}"}
    images = torch.from_numpy(held).permute(0, 3, 1, 2).float().div(255).to(device)
    values = tokenizer_alignment(
        tokenizer, vfm, images, cfg.extract.batch_size, cfg.extract.diagnostics.seed
    )
    extractor = f"latents vs {vfm_cfg['spec']} mean patch token, k={TOPK}"
    out = metric_entry(
        "latent_se_cknna",
        values.pop("se_cknna"),
        len(held),
        extractor,
        f"{len(held)} held-out images",
    )
    return out | {f"latent_{k}": v for k, v in values.items()}


def robustness(cfg, tokenizer, held: np.ndarray, stats: dict, wanted: set, device) -> dict:
    """``robustness`` (PSNR) and ``robustness_shapesnet`` (rfd_shapesnet) of decodes of
    noised latents vs the held-out images: per sigma, unperturbed (``_clean``) and the
    mean over the sigmas (the headline value)."""
    d = cfg.extract.diagnostics
    mean, std = models.latent_mean_std(stats, device)
    decodes = diag.noisy_decodes(
        tokenizer, held, mean, std, d.noise, cfg.extract.batch_size, d.seed, device
    )
    scores: dict[str, dict[float, float]] = {}
    if "robustness" in wanted:
        scores["robust_psnr"] = {sigma: psnr(images, held) for sigma, images in decodes.items()}
    if "robustness_shapesnet" in wanted:  # one classifier pass over originals and decodes
        feats = np.split(
            classify(np.concatenate([held, *decodes.values()]), device)[0], len(decodes) + 1
        )
        real = FeatureStats.of(feats[0])
        scores["robust_rfd_shapesnet"] = {
            sigma: frechet_distance(FeatureStats.of(f), real)
            for sigma, f in zip(decodes, feats[1:], strict=True)
        }
    reference = f"{len(held)} held-out images"
    out: dict = {}
    for name, values in scores.items():
        noisy = [values[float(s)] for s in d.noise]
        extractor = "pixels (uint8)" if name == "robust_psnr" else "shapesnet penultimate features"
        out |= metric_entry(name, float(np.mean(noisy)), len(held), extractor, reference)
        out[f"{name}_clean"] = values[0.0]
        out |= {per_sigma_key(name, s): values[float(s)] for s in d.noise}
    return out


# ----------------------------------------------------------------------------- the file

# the diagnostics of the stored latents, by their headline value
LATENT_GROUPS = {"linear_probe": "probe_accuracy", "effective_dim": "participation_ratio"}
IMAGE_GROUPS = frozenset({"se_cknna", "robustness", "robustness_shapesnet"})


def pending(cfg: ExperimentConfig, store: Store) -> tuple[list[str], dict]:
    """(the wanted diagnostics the file lacks, the file's contents worth keeping): all of
    them and nothing when it was computed under other settings."""
    wanted = list(dict.fromkeys(cfg.extract.diagnostics.metrics))
    kept = store.read_json(FILE) if store.exists(FILE) else {}
    if kept.get("settings") != settings_of(cfg):
        kept = {}
    done = set(kept.get("computed", []))
    return [g for g in wanted if g not in done], kept


def compute(cfg: ExperimentConfig, paths: dict, out_dir, todo: list[str], device) -> tuple:
    """The diagnostics ``todo`` of the extraction in ``out_dir`` on ``device``, and the
    seconds each part (stored latents, held-out images) took."""
    d, wanted = cfg.extract.diagnostics, set(todo)
    stats = Store.open(out_dir).read_json("stats.json")
    out, seconds = {}, {}
    if wanted & set(LATENT_GROUPS) and not Store.open(out_dir).exists("manifest.json"):
        why = "the shards have no manifest.json (an extraction from before manifests)"
        out |= {f"{LATENT_GROUPS[g]}_unavailable": why for g in wanted & set(LATENT_GROUPS)}
    elif wanted & set(LATENT_GROUPS):
        t0 = time.time()
        out |= probe_and_spectrum(cfg, out_dir, stats, wanted, device)
        seconds["latents"] = time.time() - t0
    if wanted & IMAGE_GROUPS:
        t0 = time.time()
        held, _ = reference_cache.real_images(cfg, "holdout", d.num_images)
        tokenizer = models.load_tokenizer(cfg, paths["tokenizer"], device)
        with torch.no_grad():
            if "se_cknna" in wanted:
                out |= alignment(cfg, tokenizer, held, device)
            if wanted & {"robustness", "robustness_shapesnet"}:
                out |= robustness(cfg, tokenizer, held, stats, wanted, device)
        seconds["images"] = time.time() - t0
    return out, seconds


def diagnose(cfg: ExperimentConfig, paths: dict, out_dir, device="cpu") -> dict:
    """Complete ``out_dir/diagnostics.json`` with the wanted diagnostics it lacks, computed
    on ``device`` (the tokenizer's weights in ``paths["tokenizer"]``); returns the file."""
    check_diagnostics(cfg)
    store = Store.open(out_dir)
    todo, kept = pending(cfg, store)
    if not todo:
        return kept
    values, seconds = compute(cfg, paths, out_dir, todo, device)
    order = get_args(DiagnosticGroup)  # the table's order, whatever the list's
    computed = sorted(set(kept.get("computed", [])) | set(todo), key=order.index)
    result = {k: v for k, v in kept.items() if k not in diag.BOOKKEEPING} | values
    result |= {"computed": computed, "settings": settings_of(cfg)}
    result["seconds"] = kept.get("seconds", {}) | seconds
    store.write_json(FILE, result)
    return result


def _diagnose_on_gpu(experiment: dict, paths: dict, out_dir: str) -> dict:
    """:func:`diagnose` in a Ray task holding a GPU (``ray.use_gpu``)."""
    cfg, device = worker_setup(experiment)
    return diagnose(cfg, paths, out_dir, device)


def run_diagnostics(cfg: ExperimentConfig, paths: dict, out_dir, log=print) -> dict:
    """:func:`diagnose` where the run's compute is (in-process on the driver for CPU runs,
    in a Ray task holding one GPU with ``ray.use_gpu``), when the file lacks any of the
    wanted diagnostics; nothing when ``extract.diagnostics.metrics`` is empty."""
    if not cfg.extract.diagnostics.metrics:
        return {}
    check_diagnostics(cfg)  # a ConfigError, not the failure below
    store = Store.open(out_dir)
    todo, kept = pending(cfg, store)
    if not todo:
        log(f"[diagnostics] cached: {store.path(FILE)}")
        return kept
    log(f"[diagnostics] {', '.join(todo)} -> {store.path(FILE)}")
    t0 = time.time()
    try:
        if cfg.ray.use_gpu:
            task = stage_task(_diagnose_on_gpu, cfg)
            result = ray.get(task.remote(to_dict(cfg), paths, str(out_dir)))
        else:
            result = diagnose(cfg, paths, out_dir)
    except Exception as e:  # noqa: BLE001 - re-raised, saying what still holds
        raise RuntimeError(
            f"the latent diagnostics failed ({type(e).__name__}: {e}); the extraction itself "
            "is done, and extract.diagnostics.metrics=[] skips them"
        ) from e
    log(f"[diagnostics] {summary(result)} ({time.time() - t0:.1f} s)")
    return result


def summary(result: dict) -> str:
    """One line of the headline values (and what is unavailable)."""
    parts = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()
        if k in DIAGNOSTIC_NAMES or k.endswith("_unavailable")
    ]
    return " ".join(parts)


def read_diagnostics(out_dir) -> dict[str, float]:
    """The numbers of an extraction's ``diagnostics.json`` ({} without one): what a sweep
    trial reports beside its metrics."""
    path = Path(out_dir, FILE)
    if not path.exists():
        return {}
    values = json.loads(path.read_text())
    return {
        k: v
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in diag.BOOKKEEPING
    }
