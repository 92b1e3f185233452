"""The metric table: every metric ``evaluate.metrics`` accepts, with its better direction, its
meaning, the network it needs and whether it judges samples or reconstructions; the
other entries of ``metrics.json`` (baselines, fit slopes, counts) with their meanings; and
the latent diagnostics of an extraction's ``diagnostics.json`` (``extract.diagnostics``).

Evaluation, the report and the sweep read it; nothing else lists metric names.

In ``metrics.json`` every metric ``m`` comes with ``m_num_samples``, ``m_extractor`` and,
where it compares with a reference set, ``m_reference`` (see :func:`metric_entry`).
``fd_vfm`` is written under a key naming its VFM (:func:`vfm_metric_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Direction = Literal["min", "max"]
Extractor = Literal["shapesnet", "inception", "vfm", "pixels", "lpips"]
Kind = Literal["generation", "reconstruction"]
# what ``extract.diagnostics.metrics`` can ask for (:mod:`latentforge.metrics.diagnostics`)
DiagnosticGroup = Literal[
    "linear_probe", "se_cknna", "effective_dim", "robustness", "robustness_shapesnet"
]


@dataclass(frozen=True)
class Metric:
    """A metric ``evaluate.metrics`` can ask for."""

    name: str
    direction: Direction  # which way is better
    description: str  # one line, shown beside the value in reports
    extractor: Extractor  # the network (or none: pixels) it needs
    kind: Kind  # generation: samples vs real images; reconstruction: held-out vs recon
    compares_feature_sets: bool = False  # needs the reference's features, not only statistics


@dataclass(frozen=True)
class Companion:
    """An entry of ``metrics.json`` that comes with a metric or the run, not asked for by
    name; ``direction`` is set where the entry is itself a score."""

    name: str
    description: str
    direction: Direction | None = None


@dataclass(frozen=True)
class Diagnostic:
    """A latent diagnostic of ``diagnostics.json``, computed after extraction by the entry
    ``group`` of ``extract.diagnostics.metrics``; a sweep rank-correlates it with its
    objective. ``direction`` is None where neither way is better in itself."""

    name: str
    group: DiagnosticGroup
    description: str
    direction: Direction | None = None


BASELINE_NOTE = "same distance for held-out real images vs the same reference (the floor)"
VFM_NOTE = "Fréchet distance of a VFM's class token, samples vs real (FD_DINOv2, Stein et al. 2023)"
KYNKAANNIEMI = "Kynkäänniemi et al. 2019"

# in the order ``evaluate.metrics`` lists them
METRICS: tuple[Metric, ...] = (
    Metric(
        "fd_shapesnet",
        "min",
        "Fréchet distance of embedded-classifier features, samples vs real (lower is better; not FID)",
        "shapesnet",
        "generation",
    ),
    Metric(
        "fd_shapesnet_inf",
        "min",
        "fd_shapesnet extrapolated to infinitely many samples (FD∞, Chong & Forsyth 2020)",
        "shapesnet",
        "generation",
    ),
    Metric(
        "class_accuracy",
        "max",
        "embedded classifier agrees with the requested class (chance = 1/classes)",
        "shapesnet",
        "generation",
    ),
    Metric(
        "fid",
        "min",
        "Fréchet Inception distance (torch-fidelity InceptionV3), samples vs fid_reference",
        "inception",
        "generation",
    ),
    Metric(
        "fid_inf",
        "min",
        "FID extrapolated to infinitely many samples (FID∞, Chong & Forsyth 2020)",
        "inception",
        "generation",
    ),
    Metric(
        "sfid",
        "min",
        "spatial FID (Nash et al. 2021): FD of Inception mixed_6/conv channels 0-6 (17x17), as ADM's evaluator",
        "inception",
        "generation",
    ),
    Metric(
        "is",
        "max",
        "Inception Score (Salimans et al. 2016): confident and diverse classes (higher is better)",
        "inception",
        "generation",
    ),
    Metric(
        "kid",
        "min",
        "Kernel Inception distance (Bińkowski et al. 2018): unbiased MMD², ± std over subsets",
        "inception",
        "generation",
        compares_feature_sets=True,
    ),
    Metric(
        "precision",
        "max",
        f"share of samples inside the real-image manifold (fidelity; {KYNKAANNIEMI})",
        "inception",
        "generation",
        compares_feature_sets=True,
    ),
    Metric(
        "recall",
        "max",
        f"share of real images inside the samples' manifold (coverage; {KYNKAANNIEMI})",
        "inception",
        "generation",
        compares_feature_sets=True,
    ),
    Metric("fd_vfm", "min", VFM_NOTE, "vfm", "generation"),
    Metric(
        "rfd_shapesnet",
        "min",
        "Fréchet distance, held-out reconstructions vs held-out images",
        "shapesnet",
        "reconstruction",
    ),
    Metric(
        "psnr",
        "max",
        "reconstruction PSNR on held-out images (dB, higher is better)",
        "pixels",
        "reconstruction",
    ),
    Metric(
        "ssim",
        "max",
        "reconstruction structural similarity (Wang et al. 2004; 1 = identical)",
        "pixels",
        "reconstruction",
    ),
    Metric(
        "lpips",
        "min",
        "reconstruction perceptual distance (Zhang et al. 2018; lower is better)",
        "lpips",
        "reconstruction",
    ),
    Metric(
        "se_cknna",
        "max",
        "SE-CKNNA of the latents with evaluate.fd_vfm's patch features over rotated, "
        "scaled and noised held-out images (Bi et al. 2025; 1 = same neighbourhoods)",
        "vfm",
        "reconstruction",
    ),
)

COMPANIONS: tuple[Companion, ...] = (
    Companion("fd_shapesnet_real_baseline", BASELINE_NOTE, "min"),
    Companion(
        "fd_shapesnet_inf_slope", "slope k of the FD∞ fit FD_N = FD∞ + k/N (the small-N bias)"
    ),
    Companion("class_accuracy_per_class", "class_accuracy of each class, in class order"),
    Companion("fid_inf_slope", "slope k of the FID∞ fit FID_N = FID∞ + k/N (the small-N bias)"),
    Companion("kid_subset_size", "samples per KID subset"),
    Companion("kid_subsets", "number of KID subsets"),
    Companion(
        "recon_class_accuracy",
        "embedded classifier on held-out reconstructions: the ceiling of class_accuracy",
        "max",
    ),
    Companion(
        "recon_class_accuracy_per_class",
        "recon_class_accuracy of each class: each class's ceiling",
    ),
    Companion("se_cknna_clean", "SE-CKNNA's alignment on the untransformed images (CKNNA)"),
    Companion("se_cknna_equivariance", "SE-CKNNA on the rotated and scaled images alone"),
    Companion("se_cknna_noise", "SE-CKNNA on the noised images, mean over the 4 noise levels"),
    Companion("num_samples", "generated samples evaluated"),
    Companion("num_real", "real training images of the reference statistics"),
    Companion("num_baseline", "held-out real images in fd_shapesnet_real_baseline"),
    Companion("num_recon", "held-out images reconstructed"),
)

# in the order diagnostics.json and the reports list them
DIAGNOSTICS: tuple[Diagnostic, ...] = (
    Diagnostic(
        "probe_accuracy",
        "linear_probe",
        "ridge-classifier accuracy on held-out normalised flattened latents (class "
        "separability; probe_chance: the majority class's share)",
        "max",
    ),
    Diagnostic(
        "latent_se_cknna",
        "se_cknna",
        "SE-CKNNA of the latents with a VFM's patch features at extraction (Bi et al. 2025)",
        "max",
    ),
    Diagnostic(
        "participation_ratio",
        "effective_dim",
        "effective dimension: (sum l)^2 / sum l^2 of the normalised latents' covariance "
        "eigenvalues l (1: one direction; latent_dim: isotropic)",
    ),
    Diagnostic(
        "pca_dims_90",
        "effective_dim",
        "principal components holding 90% of the normalised latents' variance",
    ),
    Diagnostic(
        "pca_dims_99",
        "effective_dim",
        "principal components holding 99% of the normalised latents' variance",
    ),
    Diagnostic(
        "robust_psnr",
        "robustness",
        "PSNR (dB) of decodes of noised normalised latents vs the images, mean over "
        "extract.diagnostics.noise (robust_psnr_sigma_<s>: at sigma s)",
        "max",
    ),
    Diagnostic(
        "robust_rfd_shapesnet",
        "robustness_shapesnet",
        "rfd_shapesnet of decodes of noised normalised latents vs the images, mean over "
        "extract.diagnostics.noise (robust_rfd_shapesnet_sigma_<s>: at sigma s)",
        "min",
    ),
)

DIAGNOSTIC_COMPANIONS: tuple[Companion, ...] = (
    Companion("probe_num_fit", "latents the probe was fitted on"),
    Companion("probe_num_test", "held-out latents it was scored on"),
    Companion("probe_classes", "classes among the latents it was fitted on"),
    Companion("probe_chance", "the held-out latents' majority-class share: a constant's accuracy"),
    Companion("latent_se_cknna_clean", "latent_se_cknna's alignment on untransformed images"),
    Companion("latent_se_cknna_equivariance", "latent_se_cknna on rotated and scaled images"),
    Companion("latent_se_cknna_noise", "latent_se_cknna on noised images (4 noise levels)"),
    Companion("latent_dim", "values per flattened latent (C x H x W): an isotropic spectrum's PR"),
    Companion("robust_psnr_clean", "PSNR of the unperturbed decodes (sigma 0)", "max"),
    Companion(
        "robust_rfd_shapesnet_clean", "rfd_shapesnet of the unperturbed decodes (sigma 0)", "min"
    ),
)

_ENTRIES: dict[str, Metric | Companion | Diagnostic] = {
    e.name: e for e in (*METRICS, *COMPANIONS, *DIAGNOSTICS, *DIAGNOSTIC_COMPANIONS)
}

METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
DIAGNOSTIC_NAMES: tuple[str, ...] = tuple(d.name for d in DIAGNOSTICS)


def _names(**fields) -> frozenset[str]:
    return frozenset(m.name for m in METRICS if all(getattr(m, k) == v for k, v in fields.items()))


SAMPLE_METRICS = _names(kind="generation")
RECON_METRICS = _names(kind="reconstruction")
SHAPESNET_METRICS = _names(kind="generation", extractor="shapesnet")
INCEPTION_METRICS = _names(extractor="inception")
VFM_METRICS = _names(extractor="vfm")
FEATURE_SET_METRICS = _names(compares_feature_sets=True)


def metric(name: str) -> Metric:
    """The table's entry of a metric ``evaluate.metrics`` accepts."""
    entry = _ENTRIES.get(name)
    if not isinstance(entry, Metric):
        raise KeyError(f"no metric {name!r}; known: {list(METRIC_NAMES)}")
    return entry


def vfm_metric_name(spec: str) -> str:
    """The metrics.json key of ``fd_vfm`` for a VFM spec: ``local:shapes-vit`` ->
    ``fd_shapes_vit``, ``hf:facebook/dinov2-base`` -> ``fd_dinov2_base``."""
    name = spec.partition(":")[2].rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
    return "fd_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def per_sigma_key(name: str, sigma: float) -> str:
    """A diagnostic's key at one noise size: ``robust_psnr_sigma_0.25``."""
    return f"{name}_sigma_{sigma:g}"


def diagnostic_of(key: str) -> Diagnostic | None:
    """The diagnostic a diagnostics.json key reports: its own entry, or the entry of a
    :func:`per_sigma_key`; None for the other keys."""
    entry = _ENTRIES.get(re.sub(r"_sigma_[0-9.e+-]+$", "", key))
    return entry if isinstance(entry, Diagnostic) else None


def direction(key: str) -> Direction | None:
    """Which way is better for a metrics.json or diagnostics.json entry: the table's
    direction (a per-sigma diagnostic's is its diagnostic's); ``min`` for a real-vs-real
    baseline and for ``fd_vfm`` under its VFM's name (a distance); None for what is no
    score (counts, slopes, per-class lists, effective dimensions)."""
    if key in _ENTRIES:
        return _ENTRIES[key].direction
    if (diagnostic := diagnostic_of(key)) is not None:
        return diagnostic.direction
    if key.endswith("_real_baseline") or key.startswith("fd_"):
        return metric("fd_vfm").direction
    return None


def higher_is_better(key: str) -> bool:
    return direction(key) == "max"


def note(key: str, metrics: Mapping) -> str:
    """The one-line meaning of the entry ``key`` of ``metrics`` (a metrics.json); empty when
    the table has none."""
    if key in _ENTRIES:
        return _ENTRIES[key].description
    if (diagnostic := diagnostic_of(key)) is not None:
        return f"{diagnostic.name} at noise sigma {key.rsplit('_sigma_', 1)[1]} alone"
    if key.endswith("_real_baseline"):  # fd_vfm's, named by its VFM
        return BASELINE_NOTE
    if key.startswith("fd_") and f"{key}_extractor" in metrics:  # fd_vfm, named by its VFM
        return VFM_NOTE
    return ""


def metric_entry(
    name: str, value, num_samples: int, extractor: str, reference: str | None = None
) -> dict:
    """The metrics.json entries of metric ``name``: its value, sample count, extractor and
    (when it compares with one) reference."""
    out = {name: value, f"{name}_num_samples": num_samples, f"{name}_extractor": extractor}
    if reference is not None:
        out[f"{name}_reference"] = reference
    return out
