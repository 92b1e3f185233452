"""Class-conditional metrics by the embedded classifier (:mod:`latentforge.metrics.shapesnet`):
its features and predictions of images, accuracy per class and the confusion matrix."""

from __future__ import annotations

import numpy as np
import torch

from latentforge.metrics import shapesnet  # load_shapesnet looked up when called (tests swap it)
from latentforge.shapes import NUM_CLASSES


@torch.no_grad()
def classify(
    images: np.ndarray, device: str | torch.device, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    """Embedded classifier features (N, D) float64 and predicted classes (N,) of uint8
    images (N, H, W, 3), computed on ``device``."""
    net = shapesnet.load_shapesnet(device)
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(device)
        feats.append(net.features(x).double().cpu().numpy())
        preds.append(net(x).argmax(dim=1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds)


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
    cols = max(NUM_CLASSES, int(preds.max(initial=0)) + 1)
    flat = np.bincount(labels.astype(np.int64) * cols + preds, minlength=num_classes * cols)
    return flat[: num_classes * cols].reshape(num_classes, cols)
