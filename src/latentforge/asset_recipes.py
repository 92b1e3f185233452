"""Recipes of the embedded assets: the shapes ViT (stand-in VFM) and the shapes classifier.

Both are trained on the ``shapes`` training split (seed 0, the wide layout that contains
the default one) and checked on its held-out split. A one-off, single-process torch loop: these networks are
tiny, and the recipe must rebuild the committed weights bit-for-bit on a laptop, without a cluster.
``latentforge train-asset experiments/assets/<name>.yaml`` runs it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from latentforge.metrics.shapesnet import ShapesNet, save_shapesnet
from latentforge.shapes import HOLDOUT_OFFSET, NUM_CLASSES, WIDE, render_shapes
from latentforge.tokenizers.vfm import conv_stem_patch_embed

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class AssetConfig:
    """Schema of an asset recipe."""

    name: Literal["shapes-vit", "shapesnet"] = "shapesnet"
    resolution: int = 64
    train_images: int = 20000  # distinct training images (shapes seed 0)
    holdout_images: int = 2000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    warmup_fraction: float = 0.05  # linear warm-up, then cosine decay
    weight_decay: float = 0.05
    seed: int = 0
    augment: bool = True  # blur + noise, so that slightly soft samples classify well
    width: int = 16  # shapesnet conv width
    feature_dim: int = 128  # shapesnet penultimate width
    embed_dim: int = 128  # shapes-vit
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 8
    conv_stem: bool = True  # shapes-vit: conv stem patch embedding (Xiao et al. 2021)
    output: str = ""  # default: the package's assets dir


VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.25, 0.25, 0.25)


def build_asset_model(cfg: AssetConfig) -> nn.Module:
    if cfg.name == "shapesnet":
        return ShapesNet(NUM_CLASSES, cfg.width, cfg.feature_dim)
    embed = conv_stem_patch_embed if cfg.conv_stem else None
    return VisionTransformer(**vit_kwargs(cfg), **({"embed_layer": embed} if embed else {}))


def vit_kwargs(cfg: AssetConfig) -> dict:
    return {
        "img_size": cfg.resolution,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "num_classes": NUM_CLASSES,
        "global_pool": "token",
    }


def vit_input(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> the ViT's normalised input (as the VFM adapter does)."""
    mean = torch.tensor(VIT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(VIT_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (down-up resampling) and Gaussian noise on float [-1, 1] images."""
    b = x.shape[0]
    soft = torch.rand(b, generator=gen) < 0.5
    if soft.any():
        size = x.shape[-1]
        small = F.interpolate(x[soft], scale_factor=0.5, mode="bilinear", antialias=True)
        x = x.clone()
        x[soft] = F.interpolate(small, size=(size, size), mode="bilinear")
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def accuracy(
    model: nn.Module, cfg: AssetConfig, images: torch.Tensor, labels: torch.Tensor
) -> float:
    model.eval()
    preds = []
    for i in range(0, len(images), 500):
        x = images[i : i + 500]
        preds.append(model(vit_input(x) if cfg.name == "shapes-vit" else x).argmax(1))
    model.train()
    return float((torch.cat(preds) == labels).float().mean())


def train_asset(cfg: AssetConfig, log=print) -> dict:
    """Train the asset, write its safetensors, return held-out accuracy and timing."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    images, labels = render_shapes(range(cfg.train_images), cfg.resolution, seed=0, **WIDE)
    held, held_labels = render_shapes(
        range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + cfg.holdout_images), cfg.resolution, seed=0, **WIDE
    )
    x_all, y_all = to_float(images), torch.from_numpy(labels)
    x_held, y_held = to_float(held), torch.from_numpy(held_labels)
    model = build_asset_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * (cfg.train_images // cfg.batch_size)
    warm = max(1, int(cfg.warmup_fraction * steps))

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.train_images, generator=gen)
        for i in range(0, cfg.train_images - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = augment(x_all[idx], gen) if cfg.augment else x_all[idx]
            logits = model(vit_input(x) if cfg.name == "shapes-vit" else x)
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        acc = accuracy(model, cfg, x_held, y_held)
        log(
            f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} loss={loss.item():.3f} holdout_acc={acc:.4f} ({time.time() - t0:.0f} s)"
        )
    result = {"holdout_accuracy": acc, "seconds": time.time() - t0, "steps": step}
    path = Path(cfg.output) if cfg.output else ASSETS / f"{cfg.name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_asset(model, cfg, path, result)
    result["path"] = str(path)
    return result


def save_asset(model: nn.Module, cfg: AssetConfig, path: Path, result: dict) -> None:
    extra = {
        "recipe": f"experiments/assets/{cfg.name}.yaml",
        "holdout_accuracy": f"{result['holdout_accuracy']:.4f}",
    }
    if cfg.name == "shapesnet":
        save_shapesnet(model, path, extra)
        return
    sd = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "family": "timm",
        "model_kwargs": json.dumps(vit_kwargs(cfg)),
        "mean": json.dumps(list(VIT_MEAN)),
        "std": json.dumps(list(VIT_STD)),
        "img_size": str(cfg.resolution),
        "patch_size": str(cfg.patch_size),
        "dtype": "float16",
        "stem": "conv" if cfg.conv_stem else "patch",
        **extra,
    }
    save_file(sd, str(path), metadata=meta)
