"""Tokenizer losses: reconstruction, KL, VF alignment, feature perceptual loss, adaptive weights.

VF loss (Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models", Sec. 3.2; hustvl/LightningDiT ``vavae``): the latent z is
projected to the VFM width by a 1x1 convolution, z' = W z, and compared with the frozen
VFM's patch features f on the same N-position grid through

- the marginal cosine similarity loss (their Eq. 2)
  ``L_mcos = 1/N sum_i relu(1 - m1 - cos(z'_i, f_i))``, and
- the marginal distance-matrix similarity loss (their Eq. 3)
  ``L_mdms = 1/N^2 sum_{i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)``,

with margins m1 (``margin_cos``) and m2 (``margin_dist``); L_vf = L_mdms + L_mcos (both
weighted 1 in the reference). Its weight is made adaptive (their Eq. 4, after Esser et al.
2021's adaptive GAN weight):
``w = ||grad_last L_rec|| / ||grad_last L_vf||`` at the encoder's last layer, times
``vf_weight``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, kind: Literal["l1", "l2"] = "l1"
) -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error per image value."""
    diff = x_hat.float() - x.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.square().mean()
    raise ValueError(f"reconstruction loss {kind!r}: expected 'l1' or 'l2'")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, values_per_image: int = 1) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each image's latent elements,
    averaged over the batch, divided by ``values_per_image``.

    LDM and VA-VAE sum their losses over pixels, so their ``kl_weight`` (1e-6) is relative
    to a per-image *sum* of reconstruction errors. Our reconstruction loss is a per-value
    mean; passing ``values_per_image = 3*H*W`` keeps the published weight's meaning.
    """
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean() / values_per_image


def marginal_cos_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over positions of relu(1 - margin - cos(z_i, f_i)).

    Shapes: z, f (B, C, h, w) on the same grid; cosine over C.
    """
    cos = F.cosine_similarity(z, f, dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).mean()


def marginal_distmat_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over all position pairs (i, j) of one image of
    relu(|cos(z_i, z_j) - cos(f_i, f_j)| - margin), averaged over the batch.

    Shapes: z (B, Cz, h, w), f (B, Cf, h, w); the channel widths may differ.
    """
    zn = F.normalize(z.flatten(2), dim=1)  # (B, Cz, N)
    fn = F.normalize(f.flatten(2), dim=1)  # (B, Cf, N)
    gz = zn.transpose(1, 2) @ zn  # (B, N, N)
    gf = fn.transpose(1, 2) @ fn  # (B, N, N)
    return F.relu((gz - gf).abs() - margin).mean()


def vf_loss(
    z_proj: torch.Tensor, feats: torch.Tensor, margin_cos: float, margin_dist: float
) -> torch.Tensor:
    """L_mdms + L_mcos between projected latents and VFM patch features.

    Shapes: z_proj (B, C, h, w), the latent after the 1x1 projection to the VFM width C;
    feats (B, C, h', w'), the VFM's patch grid for this image size. When the grids differ
    z_proj is resized (bilinear) to (h', w'); a 1x1 projection and a bilinear resize
    commute, so this equals projecting the resized latent.
    """
    if z_proj.shape[-2:] != feats.shape[-2:]:
        z_proj = F.interpolate(z_proj, size=feats.shape[-2:], mode="bilinear", align_corners=False)
    feats = feats.to(z_proj.dtype)
    return marginal_distmat_loss(z_proj, feats, margin_dist) + marginal_cos_loss(
        z_proj, feats, margin_cos
    )


def feature_perceptual_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Perceptual loss on frozen-VFM features (not LPIPS: no learned per-channel weights).

    For each layer, the features are unit-normalised over channels at every position (as
    LPIPS does before its learned weights) and compared by squared distance, i.e.
    2 - 2 cos; the mean over positions and layers is returned.

    Shapes: two lists of (B, C, h, w) grids, one per VFM layer.
    """
    dists = [
        (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).square().sum(1).mean()
        for a, b in zip(fake, real, strict=True)
    ]
    return torch.stack(dists).mean()


def adaptive_weight(
    main: torch.Tensor,
    other: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e8,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``||d main / d last_layer|| / (||d other / d last_layer|| + eps)``: finite, detached,
    clamped to [0, max_weight] (VA-VAE Eq. 4; VA-VAE uses eps 1e-4 and max 1e8).

    Both gradients come from ``torch.autograd.grad`` with ``retain_graph=True``, so the
    caller can still back-propagate a loss built from ``main`` and ``other``; ``.grad``
    fields are not touched.
    """
    g_main = torch.autograd.grad(main, last_layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(other, last_layer, retain_graph=True)[0]
    w = g_main.float().norm() / (g_other.float().norm() + eps)
    w = torch.nan_to_num(w, nan=0.0, posinf=max_weight)
    return w.clamp(0.0, max_weight).detach()
