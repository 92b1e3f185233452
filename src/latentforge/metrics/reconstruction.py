"""Reconstruction metrics of uint8 image pairs: PSNR, and SSIM and LPIPS through maintained
packages; and the reconstructions themselves (:func:`reconstruct`).

- SSIM (Wang et al. 2004) by ``pytorch-msssim``: the paper's 11 x 11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, no padding, averaged over the RGB channels, per image.
- LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric") by the ``lpips`` package, v0.1 linear layers (shipped inside the package) on an
  AlexNet or VGG16 backbone. The backbone comes from torchvision's ImageNet weights in torch's
  hub cache (``<torch.hub.get_dir()>/checkpoints/<file>``); they are never downloaded here:
  without the file, :func:`load_lpips` raises one error naming it and how to provide it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytorch_msssim
import torch

from latentforge.generators.generate import tokenizer_batch
from latentforge.images import images_to_float, to_uint8

LPIPS_NETS = ("alex", "vgg")
SSIM_DESCRIPTION = "pytorch-msssim SSIM (11x11 Gaussian window, sigma 1.5, RGB mean)"


@torch.no_grad()
def reconstruct(
    tokenizer, images: np.ndarray, batch_size: int, device: str | torch.device
) -> np.ndarray:
    """Decoded encodings (uint8) of uint8 (N, H, W, 3) ``images``, computed on ``device``, at
    most ``batch_size`` images (and :data:`~latentforge.generators.generate.TOKENIZER_PIXELS`
    pixels) per call."""
    out = []
    batch_size = tokenizer_batch(images.shape[1], batch_size)
    for i in range(0, len(images), batch_size):
        x = images_to_float(torch.from_numpy(images[i : i + batch_size]))
        x = x.to(device)
        out.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.maximum((diff**2).reshape(len(a), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float64 (B, 3, H, W) in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double()


@torch.no_grad()
def ssim(a: np.ndarray, b: np.ndarray, batch_size: int = 250) -> float:
    """Mean per-image SSIM of two uint8 image sets (N, H, W, 3) of the same shape (sides of
    at least 11 pixels, the window size)."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM of differently shaped sets: {a.shape} vs {b.shape}")
    scores = [
        pytorch_msssim.ssim(
            _to_float(a[i : i + batch_size]),
            _to_float(b[i : i + batch_size]),
            data_range=255,
            size_average=False,
        )
        for i in range(0, len(a), batch_size)
    ]
    return float(torch.cat(scores).mean())


def lpips_backbone_url(net: str = "alex") -> str:
    """torchvision's ImageNet weights that lpips loads for its ``net`` backbone."""
    import torchvision.models as tvm  # heavy (seconds to import), needed only for LPIPS

    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS backbone {net!r}: expected one of {list(LPIPS_NETS)}")
    weights = tvm.AlexNet_Weights if net == "alex" else tvm.VGG16_Weights
    return weights.IMAGENET1K_V1.url


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision keeps (and lpips looks up) the backbone weights of ``net``."""
    name = lpips_backbone_url(net).rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def require_lpips_backbone(
    net: str = "alex", otherwise: str = "drop lpips from evaluate.metrics"
) -> Path:
    """The backbone weights file of ``net``; when absent, one error naming it and the fix
    (``otherwise``: the alternative offered to whoever asked for LPIPS)."""
    path = lpips_backbone_path(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS ({net}) needs torchvision's ImageNet backbone weights {path}, which do not "
            f"exist. Download {lpips_backbone_url(net)} once (on a machine with network "
            f"access) and put it at {path} (torch.hub.get_dir() follows $TORCH_HOME), or "
            f"{otherwise}"
        )
    return path


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The ``lpips`` package's LPIPS (v0.1, calibrated linear layers) on the ImageNet
    ``net`` backbone from torch's hub cache, frozen in eval mode; never downloads."""
    import lpips  # heavy (seconds to import), needed only for LPIPS

    require_lpips_backbone(net)  # lpips would otherwise have torchvision download it
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", verbose=False)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def lpips_distance(
    a: np.ndarray, b: np.ndarray, model: torch.nn.Module, batch_size: int = 250
) -> float:
    """Mean per-image LPIPS of two uint8 image sets (N, H, W, 3) under ``model`` (an
    ``lpips.LPIPS``, e.g. from :func:`load_lpips`)."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS of differently shaped sets: {a.shape} vs {b.shape}")
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(a), batch_size):
        x = _to_float(a[i : i + batch_size]).float().div(127.5).sub(1.0)  # [-1, 1]
        y = _to_float(b[i : i + batch_size]).float().div(127.5).sub(1.0)
        scores.append(model(x.to(device), y.to(device)).flatten().cpu())  # (B,)
    return float(torch.cat(scores).double().mean())


def lpips_description(model: torch.nn.Module) -> str:
    """How an LPIPS model is named as the extractor of ``lpips`` in metrics.json."""
    rand = " (random backbone: tests only)" if getattr(model, "pnet_rand", False) else ""
    return f"lpips v{model.version} {model.pnet_type}{rand}"
