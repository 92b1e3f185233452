"""Features for FD_VFM (Stein et al. 2023, "Exposing flaws of generative model evaluation
metrics", FD_DINOv2): a vision foundation model's class token."""

from __future__ import annotations

import numpy as np
import torch

from latentforge.images import images_to_float


@torch.no_grad()
def vfm_features(images: np.ndarray, vfm, batch_size: int) -> tuple[np.ndarray, str]:
    """A VFM's class token (the mean patch token of its last layer when it has none) of
    uint8 images (N, H, W, 3), on the device of ``vfm``'s weights: features (N, C) float64
    and which token was used."""
    device = next(vfm.parameters()).device
    feats, token = [], "class token"
    for i in range(0, len(images), batch_size):
        out = vfm(images_to_float(torch.from_numpy(images[i : i + batch_size])).to(device))
        if out.cls is None:
            token = "mean patch token"
        pooled = out.cls if out.cls is not None else out.patch[-1].mean(dim=(2, 3))  # (B, C)
        feats.append(pooled.double().cpu().numpy())
    return np.concatenate(feats), token
