"""Inception metrics: torch-fidelity's InceptionV3 (the TF-compatible port used for
published FID numbers), loaded only from a local file, the ADM reference-batch format, and
IS / KID / precision-recall computed by torch-fidelity's own functions from features of one
forward pass (pool-3 features and the logits come out of the same call).

Weights are never downloaded here. They come from an explicit path, or from torch's hub
cache where torch-fidelity itself keeps them
(``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``); when
neither exists the error names the file and how to provide it.

ADM reference batches (Dhariwal & Nichol 2021, openai/guided-diffusion ``evaluations``),
e.g. ``VIRTUAL_imagenet256_labeled.npz``, hold images ``arr_0`` (uint8 N x H x W x 3) and
precomputed pool-3 statistics ``mu`` / ``sigma`` and spatial statistics ``mu_s`` /
``sigma_s``; our ``samples.npz`` use the same ``arr_0`` layout, so the official evaluator
runs on them unchanged.

sFID (Nash et al. 2021, "Generating images with sparse representations") is FD on
spatial features, which see the arrangement of parts that pool-3's global average discards.
ADM's evaluator takes the first 7 channels of the TF graph's ``mixed_6/conv`` (17 x 17 x 7
= 2023 values, flattened in TF's H, W, C order). The TF graph numbers its blocks ``mixed``,
``mixed_1`` ... ``mixed_10``, and ``mixed_6`` is Mixed_6d; ``mixed_6/conv`` is that block's
1x1 branch after batch norm and ReLU: ``Mixed_6d.branch1x1`` in torch-fidelity's port (its
weight converter maps ``mixed_6/conv/*`` there). A forward hook on that module reads it
during the same pass that gives pool-3 and the logits.
"""

from __future__ import annotations

import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from latentforge.metrics.frechet import FeatureStats

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_OUTPUTS = ("2048", "logits_unbiased")  # torch-fidelity's names: pool-3, logits
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF's mixed_6/conv, (N, 192, 17, 17) at 299 x 299
SPATIAL_CHANNELS = 7  # ADM's evaluator keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """The local InceptionV3 weights file: ``weights`` if given, else torch's hub cache."""
    path = (
        Path(weights).expanduser()
        if weights
        else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"FID needs the InceptionV3 weights file {path}, which does not exist. Download "
            f"{INCEPTION_URL} once (on a machine with network access) and either put it at "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE} or set "
            "evaluate.inception_weights=<path>"
        )
    return path


def load_inception(weights: str | Path | None = None, device="cpu") -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat`` extractor returning, from one forward pass,
    pool-3 features (N, 2048) and the bias-free logits (N, 1008) that the Inception Score
    uses (torch-fidelity's ``logits_unbiased``)."""
    # torch-fidelity: heavy (seconds to import), needed only for Inception metrics
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights)
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", list(INCEPTION_OUTPUTS), feature_extractor_weights_path=str(path)
    ).to(device)


@torch.no_grad()
def inception_outputs(
    images: np.ndarray, extractor, batch_size: int = 100
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pool-3 features (N, 2048) and logits (N, 1008), float64, of uint8 images (N, H, W, 3)
    of any size (resized to 299 inside the extractor, TF1-style, as for published FID), from
    one pass. The logits are None for an extractor built without them."""
    device = next(extractor.parameters()).device
    pool, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        out = extractor(x.to(device))
        pool.append(out[0].double().cpu().numpy())
        if len(out) > 1:
            logits.append(out[1].double().cpu().numpy())
    return np.concatenate(pool), (np.concatenate(logits) if logits else None)


def inception_features(images: np.ndarray, extractor, batch_size: int = 100) -> np.ndarray:
    """Pool-3 features (N, 2048) float64 of uint8 images (N, H, W, 3)."""
    return inception_outputs(images, extractor, batch_size)[0]


def spatial_of(activation: torch.Tensor) -> np.ndarray:
    """sFID features (N, 2023) float64 of ``mixed_6/conv`` activations (N, 192, 17, 17): the
    first 7 channels flattened in TF's (H, W, C) order, so that they line up element by
    element with the ``mu_s`` / ``sigma_s`` of ADM's reference batches."""
    x = activation[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7)
    return x.reshape(len(x), -1).double().cpu().numpy()


@contextmanager
def capturing_spatial(extractor) -> Iterator[list[np.ndarray]]:
    """While open, every forward pass of ``extractor`` appends its sFID features (B, 2023)
    to the yielded list, read by a forward hook on :data:`SPATIAL_LAYER`; the extractor's
    own outputs (pool-3, logits) are unchanged."""
    batches: list[np.ndarray] = []
    layer = extractor.get_submodule(SPATIAL_LAYER)
    handle = layer.register_forward_hook(lambda module, args, out: batches.append(spatial_of(out)))
    try:
        yield batches
    finally:
        handle.remove()


def inception_spatial_features(images: np.ndarray, extractor, batch_size: int = 100) -> np.ndarray:
    """sFID features (N, 2023) float64 of uint8 images (N, H, W, 3) (see :func:`spatial_of`)."""
    with capturing_spatial(extractor) as batches:
        inception_outputs(images, extractor, batch_size)
    return np.concatenate(batches)


def adm_has_images(path: str | Path) -> bool:
    """Whether an ADM batch holds images (``arr_0``), not only precomputed statistics."""
    with np.load(path) as f:
        return "arr_0" in f


def adm_image_count(path: str | Path) -> int:
    """Number of images ``arr_0`` of an ADM batch (-1 if none), read from the array's header
    alone: a reference batch's images can be gigabytes."""
    with zipfile.ZipFile(path) as z:
        if "arr_0.npy" not in z.namelist():
            return -1
        with z.open("arr_0.npy") as fh:
            fmt = np.lib.format
            major, _ = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            return int(read(fh)[0][0])


def stored_stats(path: str | Path, f, mu: str, sigma: str) -> FeatureStats:
    """Precomputed statistics ``f[mu]``, ``f[sigma]`` of the open ADM batch ``f`` at
    ``path``; ``n`` is its image count if it has images, else -1."""
    return FeatureStats(
        f[mu].astype(np.float64), f[sigma].astype(np.float64), adm_image_count(path)
    )


def reference_stats(path: str | Path, extractor=None, batch_size: int = 100) -> FeatureStats:
    """Statistics of an ADM reference batch: its stored ``mu``/``sigma`` when present
    (``n`` = its image count if it has images, else -1), otherwise computed from ``arr_0``."""
    with np.load(path) as f:
        if "mu" in f and "sigma" in f:
            return stored_stats(path, f, "mu", "sigma")
        if "arr_0" not in f:
            raise ValueError(f"{path}: neither mu/sigma nor arr_0 images (not an ADM batch)")
    return FeatureStats.of(adm_features(path, extractor, batch_size))


def adm_has_spatial_stats(path: str | Path) -> bool:
    """Whether an ADM batch holds precomputed sFID statistics ``mu_s`` / ``sigma_s``."""
    with np.load(path) as f:
        return "mu_s" in f and "sigma_s" in f


def reference_spatial_stats(
    path: str | Path, extractor=None, batch_size: int = 100
) -> FeatureStats:
    """sFID statistics of an ADM reference batch: its stored ``mu_s``/``sigma_s`` when present
    (as ADM's evaluator reads them), otherwise computed from the images ``arr_0``."""
    with np.load(path) as f:
        if "mu_s" in f and "sigma_s" in f:
            stats = stored_stats(path, f, "mu_s", "sigma_s")
            if stats.mu.shape != (SPATIAL_DIM,):
                raise ValueError(
                    f"{path}: mu_s has shape {stats.mu.shape}, expected ({SPATIAL_DIM},) "
                    "(ADM's 7 x 17 x 17 mixed_6/conv features)"
                )
            return stats
        if "arr_0" not in f:
            raise ValueError(
                f"{path}: sFID needs spatial statistics mu_s/sigma_s or images arr_0 to compute "
                f"them from; it holds only {sorted(f.files)}"
            )
        images = f["arr_0"]
    if extractor is None:
        raise ValueError(f"{path} holds images only: pass the Inception extractor")
    return FeatureStats.of(inception_spatial_features(images, extractor, batch_size))


def adm_features(path: str | Path, extractor=None, batch_size: int = 100) -> np.ndarray:
    """Pool-3 features (N, 2048) of an ADM batch's images ``arr_0`` (all of them, as ADM's
    evaluator uses its whole reference batch for precision/recall)."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} holds no images (arr_0), only precomputed statistics")
        images = f["arr_0"]
    if extractor is None:
        raise ValueError(f"{path} holds images only: pass the Inception extractor")
    return inception_features(images, extractor, batch_size)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float, int]:
    """Inception Score (Salimans et al. 2016), ``exp E_x KL(p(y|x) || p(y))`` on the softmax
    of the unbiased logits of :func:`inception_outputs`, over contiguous chunks of
    ``split_size`` samples (the last one shorter), unshuffled: the convention of ADM's
    evaluator (Dhariwal & Nichol 2021), whose numbers papers report. torch-fidelity's 10
    shuffled splits agree at 50k samples but not below (1k samples: 10 x 100 vs 1 x 1000).
    Returns (mean, std over the chunks, number of chunks)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))  # log softmax
    scores = []
    for i in range(0, len(log_p), split_size):
        part = log_p[i : i + split_size]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores)), len(scores)


def kernel_inception_distance(
    samples: np.ndarray,
    reference: np.ndarray,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 2020,
) -> tuple[float, float, int]:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the
    unbiased MMD^2 estimate with the cubic kernel ``(x.y / d + 1)^3``, mean and std over
    ``subsets`` random subsets of ``subset_size`` from each set (clamped to the smaller set),
    by torch-fidelity's ``kid_features_to_metric``. Returns (mean, std, subset size used)."""
    from torch_fidelity.metric_kid import (  # heavy, needed only for KID
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    size = min(subset_size, len(samples), len(reference))
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(samples, dtype=np.float64)),
        torch.from_numpy(np.asarray(reference, dtype=np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size


def precision_recall(
    samples: np.ndarray, reference: np.ndarray, k: int = 3, batch_size: int = 2048
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching every point's k-th nearest neighbour; precision is the fraction
    of samples inside the reference manifold, recall the fraction of reference points inside
    the samples' manifold. ADM's evaluator uses k = 3 on pool-3 features. Computed by
    torch-fidelity's ``prc_features_to_metric`` in row blocks of ``batch_size`` (memory
    ``batch_size x N``)."""
    from torch_fidelity.metric_prc import (  # heavy, needed only here
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    out = prc_features_to_metric(
        torch.from_numpy(np.asarray(samples, dtype=np.float32)),  # generated first
        torch.from_numpy(np.asarray(reference, dtype=np.float32)),
        prc_neighborhood=k,
        prc_batch_size=batch_size,
        save_cpu_ram=True,
        verbose=False,
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def _check_adm(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM batches are uint8 N x H x W x 3, got {images.dtype} {images.shape}")


def write_adm_npz(path: str | Path, images: np.ndarray, **extra: np.ndarray) -> None:
    """Samples as an ADM batch: ``arr_0`` uint8 (N, H, W, 3), plus e.g. ``labels``."""
    images = np.asarray(images)
    _check_adm(images)
    np.savez(path, arr_0=images, **extra)


def write_adm_npz_parts(
    path: str | Path, parts: list[Path], **extra: np.ndarray
) -> tuple[int, ...]:
    """:func:`write_adm_npz` of the images stored in order across the ``.npy`` files
    ``parts``, streamed one part at a time into the archive's ``arr_0`` (memory: one part;
    50k samples at 256 px are 9.8 GB). Written to a temporary name, then renamed. Returns
    the shape of ``arr_0``."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    for a in arrays:
        _check_adm(a)
    if len({a.shape[1:] for a in arrays}) != 1:
        raise ValueError(f"parts of different image shapes: {[a.shape for a in arrays]}")
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for a in arrays:
                f.write(np.ascontiguousarray(a).data)
        for name, value in extra.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value))
    tmp.replace(path)
    return shape
