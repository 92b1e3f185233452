"""FID features: torch-fidelity's InceptionV3 (the TF-compatible port used for published
FID numbers), loaded only from a local file, and the ADM reference-batch format.

Weights are never downloaded here. They come from an explicit path, or from torch's hub
cache where torch-fidelity itself keeps them
(``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``); when
neither exists the error names the file and how to provide it.

ADM reference batches (Dhariwal & Nichol 2021, openai/guided-diffusion ``evaluations``),
e.g. ``VIRTUAL_imagenet256_labeled.npz``, hold images ``arr_0`` (uint8 N x H x W x 3) and
precomputed pool-3 statistics ``mu`` / ``sigma``; our ``samples.npz`` use the same
``arr_0`` layout, so the official evaluator runs on them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentforge.metrics.frechet import FeatureStats

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)


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
    """torch-fidelity's ``inception-v3-compat`` extractor returning pool-3 (2048) features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights)
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    ).to(device)


@torch.no_grad()
def inception_features(images: np.ndarray, extractor, batch_size: int = 100) -> np.ndarray:
    """Pool-3 features (N, 2048) float64 of uint8 images (N, H, W, 3), any size (resized to
    299 inside the extractor, TF1-style, as for published FID)."""
    device = next(extractor.parameters()).device
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        (out,) = extractor(x.to(device))
        feats.append(out.double().cpu().numpy())
    return np.concatenate(feats)


def reference_stats(path: str | Path, extractor=None, batch_size: int = 100) -> FeatureStats:
    """Statistics of an ADM reference batch: its stored ``mu``/``sigma`` when present
    (``n`` = its image count if it has images, else -1), otherwise computed from ``arr_0``."""
    with np.load(path) as f:
        n = len(f["arr_0"]) if "arr_0" in f else -1
        if "mu" in f and "sigma" in f:
            return FeatureStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n)
        if "arr_0" not in f:
            raise ValueError(f"{path}: neither mu/sigma nor arr_0 images (not an ADM batch)")
        images = f["arr_0"]
    if extractor is None:
        raise ValueError(f"{path} holds images only: pass the Inception extractor")
    return FeatureStats.of(inception_features(images, extractor, batch_size))


def write_adm_npz(path: str | Path, images: np.ndarray, **extra: np.ndarray) -> None:
    """Samples as an ADM batch: ``arr_0`` uint8 (N, H, W, 3), plus e.g. ``labels``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM batches are uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    np.savez(path, arr_0=images, **extra)
