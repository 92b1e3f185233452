"""CKNNA and SE-CKNNA: how alike two representations of the same images are.

CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis", Sec. 2 and App. A):
centered kernel alignment restricted to mutual k-nearest neighbours. With inner-product
kernels K = A A^T and L = B B^T of n row-normalised features, and the mask M_ij = 1 when j is
among the k nearest neighbours of i under both kernels (i != j),

    CKNNA(A, B) = HSIC(M * K, M * L) / sqrt(HSIC(M_K * K, M_K * K) HSIC(M_L * L, M_L * L)),

with HSIC the unbiased estimator (Song et al. 2012, Eq. 5) and M_K, M_L the masks of each
kernel with itself (its own k nearest neighbours).

SE-CKNNA (Bi et al. 2025, "Vision Foundation Models Can Be Good Tokenizers for Latent
Diffusion Models", tianciB/VFM-VAE ``tools/evaluate_alignment``): CKNNA (k = 10) between a
model's and a VFM's patch-mean-pooled features of the same images after semantics-
preserving transforms: per image a rotation by k x 90 degrees and a downscaling by one of
{1, 3/4, 1/2, 1/4}, or additive Gaussian pixel noise of sigma in {0.05, 0.1, 0.15, 0.2}.
Features are clipped at the 0.95 quantile of their magnitudes and L2-normalised first.

Pure tensor math: no I/O, the device is the tensors'.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ROTATIONS = (0, 90, 180, 270)
SCALES = (1.0, 0.75, 0.5, 0.25)
NOISE_LEVELS = (0.05, 0.1, 0.15, 0.2)
TOPK = 10


def pool_patches(features: torch.Tensor) -> torch.Tensor:
    """Mean over positions: (B, C, h, w) grids or (B, N, C) tokens -> (B, C)."""
    if features.dim() == 4:
        return features.float().mean(dim=(2, 3))
    if features.dim() == 3:
        return features.float().mean(dim=1)
    return features.float()


def prepare_features(feats: torch.Tensor, q: float = 0.95) -> torch.Tensor:
    """(n, d) features clipped to +-the q-quantile of all their magnitudes (the element at
    rank int(q * numel) of the sorted magnitudes), then L2-normalised per row."""
    feats = feats.float()
    if q < 1:
        mags = feats.abs().flatten().sort().values
        limit = mags[min(int(q * mags.numel()), mags.numel() - 1)]
        feats = feats.clamp(-limit, limit)
    return F.normalize(feats, dim=-1)


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of two (n, n) kernels, n >= 4 (Song et al. 2012, Eq. 5)."""
    n = K.shape[0]
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    value = (K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * (K @ L).sum() / (n - 2)
    return value / (n * (n - 3))


def knn_mask(K: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, n) 0/1 mask of each row's ``topk`` largest off-diagonal entries."""
    k_hat = K.clone().fill_diagonal_(float("-inf"))
    idx = k_hat.topk(topk, dim=1).indices
    return torch.zeros_like(K).scatter_(1, idx, 1.0)


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = TOPK) -> float:
    """CKNNA of two (n, d_a), (n, d_b) feature sets of the same n images (rows already
    prepared, see :func:`prepare_features`), in [-1, 1]; 1 when their mutual-kNN
    kernels agree."""
    if topk < 2:
        raise ValueError("CKNNA needs topk >= 2")
    if feats_a.shape[0] != feats_b.shape[0] or feats_a.shape[0] < topk + 1:
        raise ValueError(
            f"CKNNA needs the same number of rows (> topk) in both sets: "
            f"{feats_a.shape[0]} and {feats_b.shape[0]}"
        )
    K = feats_a.double() @ feats_a.double().T  # (n, n)
    L = feats_b.double() @ feats_b.double().T
    mk, ml = knn_mask(K, topk), knn_mask(L, topk)
    m = mk * ml
    kl = hsic_unbiased(m * K, m * L)
    kk = hsic_unbiased(mk * K, mk * K)
    ll = hsic_unbiased(ml * L, ml * L)
    return float(kl / ((kk * ll).sqrt() + 1e-6))


def se_cknna(model_feats: torch.Tensor, vfm_feats: torch.Tensor, topk: int = TOPK) -> float:
    """SE-CKNNA of pooled (n, d) features of one transformed image set: both sets clipped
    and normalised, then :func:`cknna`."""
    return cknna(prepare_features(model_feats), prepare_features(vfm_feats), topk)


def equivariance_params(index: int, seed: int = 0) -> tuple[int, float]:
    """(rotation in degrees, scale) of image ``index``: as the official transform records,
    drawn by NumPy's legacy generator seeded with seed + index."""
    rs = np.random.RandomState(seed + index)
    rotation = int(rs.choice(ROTATIONS))
    return rotation, float(rs.choice(SCALES))


def rotate_and_scale(image: torch.Tensor, rotation: int, scale: float) -> torch.Tensor:
    """One (C, H, W) image turned counter-clockwise by ``rotation`` degrees and shrunk by
    ``scale`` (bilinear, antialiased); what a tokenizer's encoder sees of it."""
    x = torch.rot90(image, k=rotation // 90, dims=(-2, -1))
    if scale != 1.0:
        x = F.interpolate(
            x[None], scale_factor=scale, mode="bilinear", align_corners=False, antialias=True
        )[0]
    return x


def add_noise(image: torch.Tensor, sigma: float, index: int, seed: int = 0) -> torch.Tensor:
    """One (C, H, W) image in [0, 1] plus Gaussian noise of std ``sigma`` (drawn in (H, W, C)
    order by NumPy seeded with seed + index, as the official records), clipped to [0, 1]."""
    c, h, w = image.shape
    noise = np.random.RandomState(seed + index).normal(0, sigma, (h, w, c)).astype(np.float32)
    noise_t = torch.from_numpy(noise).permute(2, 0, 1).to(image.device)  # (C, H, W)
    return (image + noise_t).clamp(0, 1)


# ----------------------------------------------------------------------------- a tokenizer


def transformed_sets(images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The image sets of SE-CKNNA from (n, 3, H, W) images in [0, 1]: ``clean``;
    ``equivariance`` (image i turned and shrunk by :func:`equivariance_params`, then brought
    back to H x W, as the official pipeline's tokenizer transform resizes what it is given);
    ``noise_<sigma>`` for each of :data:`NOISE_LEVELS` (:func:`add_noise`)."""
    h, w = images.shape[-2:]
    turned = []
    for i, image in enumerate(images):
        rotation, scale = equivariance_params(i, seed)
        x = rotate_and_scale(image, rotation, scale)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        turned.append(x.clamp(0, 1))
    sets = {"clean": images, "equivariance": torch.stack(turned)}
    for sigma in NOISE_LEVELS:
        noisy = [add_noise(image, sigma, i, seed) for i, image in enumerate(images)]
        sets[f"noise_{sigma:.2f}"] = torch.stack(noisy)
    return sets


@torch.no_grad()
def tokenizer_alignment(
    tokenizer, vfm, images: torch.Tensor, batch_size: int, seed: int = 0, topk: int = TOPK
) -> dict[str, float]:
    """SE-CKNNA of a tokenizer's latents with a VFM's patch features over (n, 3, H, W)
    images in [0, 1] (n > ``topk``), on the device of the tensors and models given.

    Per set of :func:`transformed_sets`: the tokenizer's latents (its posterior mean) and
    the VFM's last-level patch tokens, each mean-pooled over positions, then
    :func:`se_cknna`. ``se_cknna`` is the mean over the transformed sets (equivariance and
    the four noise levels: what the metric adds over plain CKNNA); the clean set's value,
    the equivariance set's and the mean of the noise sets are given beside it."""
    per_set = {}
    for name, x in transformed_sets(images, seed).items():
        latents, feats = [], []
        for i in range(0, len(x), batch_size):
            batch = x[i : i + batch_size] * 2 - 1  # the models take [-1, 1]
            latents.append(tokenizer.encode(batch).flatten(2).mean(-1).float().cpu())
            feats.append(vfm(batch).patch[-1].float().mean(dim=(2, 3)).cpu())
        per_set[name] = se_cknna(torch.cat(latents), torch.cat(feats), topk)
    noise = [v for k, v in per_set.items() if k.startswith("noise_")]
    transformed = [per_set["equivariance"], *noise]
    return {
        "se_cknna": float(np.mean(transformed)),
        "se_cknna_clean": per_set["clean"],
        "se_cknna_equivariance": per_set["equivariance"],
        "se_cknna_noise": float(np.mean(noise)),
    }
