"""Tokenizer losses: reconstruction, KL, VF alignment, adaptive weights.

VF loss (Yao et al. 2025, "Reconstruction vs. Generation", Sec. 3): the latent z is
projected to the VFM width by a 1x1 convolution and compared with the VFM patch features f
on the same grid through

- the marginal cosine similarity loss  mean_ij relu(1 - m1 - cos(z'_ij, f_ij)), and
- the marginal distance-matrix loss    mean_(i,j),(k,l) relu(|cos(z'_ij, z'_kl) - cos(f_ij, f_kl)| - m2),

with margins m1 (``margin_cos``) and m2 (``margin_dist``). The VF term is weighted
adaptively by ||grad_last L_rec|| / ||grad_last L_vf|| at the encoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error per pixel."""
    diff = x_hat.float() - x.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements per image, divided by the number
    of image values ``pixels`` (3*H*W), so that with a per-pixel mean reconstruction loss a
    weight keeps the meaning it has in LDM/VA-VAE's sum-reduced losses (1e-6)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / pixels


def marginal_cos_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """z, f: (B, C, h, w) on the same grid. Mean over positions of relu(1 - m - cos)."""
    cos = F.cosine_similarity(z, f, dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).mean()


def marginal_distmat_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over position pairs of relu(|cos_z(i, j) - cos_f(i, j)| - m), per image."""
    zn = F.normalize(z.flatten(2), dim=1)  # (B, C, N)
    fn = F.normalize(f.flatten(2), dim=1)
    gz = zn.transpose(1, 2) @ zn  # (B, N, N)
    gf = fn.transpose(1, 2) @ fn
    return F.relu((gz - gf).abs() - margin).mean()


def vf_loss(
    z_proj: torch.Tensor, feats: torch.Tensor, margin_cos: float, margin_dist: float
) -> torch.Tensor:
    """VF loss between projected latents and VFM features; the latent grid is resized to the
    VFM's patch grid for the image size at hand."""
    if z_proj.shape[-2:] != feats.shape[-2:]:
        z_proj = F.interpolate(z_proj, size=feats.shape[-2:], mode="bilinear", align_corners=False)
    feats = feats.to(z_proj.dtype)
    return marginal_distmat_loss(z_proj, feats, margin_dist) + marginal_cos_loss(
        z_proj, feats, margin_cos
    )


def adaptive_weight(
    main: torch.Tensor, other: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e8
) -> torch.Tensor:
    """||d main / d last|| / (||d other / d last|| + 1e-4), detached and clamped to
    [0, max_weight] (Esser et al. 2021's adaptive GAN weight, reused by VA-VAE for VF)."""
    g_main = torch.autograd.grad(main, last_layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(other, last_layer, retain_graph=True)[0]
    w = g_main.norm() / (g_other.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()
