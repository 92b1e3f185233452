"""Image helpers shared by training, sampling, evaluation and reports: uint8 <-> float
tensors and tiled grids. Images are uint8 (N, H, W, 3) arrays on disk and in datasets, and
float [-1, 1] (B, 3, H, W) tensors in models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float [-1, 1] (B, 3, H, W)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_of(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one array."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = np.zeros((rows * cols - n, h, w, c), dtype=images.dtype)
    x = np.concatenate([images, pad]).reshape(rows, cols, h, w, c)
    return x.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def grid_rows(labels: np.ndarray, max_images: int, num_classes: int) -> list[list[int]]:
    """Sample indices of the class-sorted grid, one row per class and up to ``max_images``
    in all: every class when each gets two images or more, else ~sqrt(max_images) classes
    spread over the label range (ImageNet: 10 classes x 10 at ``grid_images=100``)."""
    per_class = max_images // num_classes
    classes = list(range(num_classes))
    if per_class < 2:
        shown = max(1, min(num_classes, round(math.sqrt(max_images))))
        classes = sorted({int(c) for c in np.linspace(0, num_classes - 1, shown).round()})
        per_class = max(1, max_images // len(classes))
    rows = [np.flatnonzero(labels == c)[:per_class].tolist() for c in classes]
    return [r for r in rows if r]


def save_grid(images: np.ndarray, row_lengths: list[int], out_dir: Path) -> None:
    """``grid.png``: ``images`` in rows of ``row_lengths``, padded to the longest row."""
    width = max(row_lengths)
    rows, start = [], 0
    for length in row_lengths:
        row = list(images[start : start + length]) + [np.zeros_like(images[0])] * (width - length)
        rows.append(np.concatenate(row, axis=1))
        start += length
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_dir / "grid.png")
