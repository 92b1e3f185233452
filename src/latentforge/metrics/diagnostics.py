"""Latent diagnostics: cheap measurements of a latent space, taken right after extraction,
that are meant to predict how well a diffusion model trained on it will generate; and the
Spearman rank correlation that checks them against generation quality across a sweep.

- **Linear probe** (class separability; the linear evaluation protocol of representation
  learning, e.g. SimCLR, Chen et al. 2020): a closed-form ridge classifier (least squares
  on one-hot targets, with an intercept) on the flattened, normalised latents of a fit
  set, scored on a held-out set.
- **SE-CKNNA** of the latents with a VFM's features (VFM-VAE, Bi et al. 2025): reused from
  :func:`latentforge.metrics.cknna.tokenizer_alignment`, not computed here.
- **Effective dimension** of the latent spectrum: the participation ratio
  PR = (sum_i l_i)^2 / sum_i l_i^2 of the eigenvalues l_i of the covariance of the
  normalised flattened latents (as in Gao et al. 2017, "A theory of multineuronal
  dimensionality, dynamics and measurement"): 1 for one direction, D for an isotropic
  spectrum; and the number of principal components holding 90% / 99% of the variance.
- **Decoding robustness**: the decoder's output when the normalised latent is perturbed
  by Gaussian noise of std sigma (then un-normalised): what a diffusion model's imperfect
  samples do to the images; scored against the original images by the caller.

Pure tensor math: no I/O; the device is the tensors' (or the one passed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from latentforge.generators.generate import tokenizer_batch
from latentforge.images import images_to_float, to_uint8

VARIANCE_SHARES = (0.90, 0.99)  # the pca_dims_<pct> of effective_dimension
# entries of diagnostics.json that are no diagnostic: what was computed, under which
# settings, in how many seconds
BOOKKEEPING = ("computed", "settings", "seconds")


def flatten(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(n, *latent_shape) latents normalised as the generator sees them ((z - mean) / std,
    the statistics broadcastable to a batch) and flattened to (n, D), in float64."""
    return ((latents.double() - mean.double()) / std.double()).flatten(1)


# ----------------------------------------------------------------------------- probe


def ridge_probe(
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ridge: float = 1e-3,
) -> dict:
    """Accuracy of a ridge classifier fitted on (n, D) features ``fit_x`` with integer
    labels ``fit_y`` and scored on ``test_x`` / ``test_y``; deterministic (closed form).

    W minimises ||X_c W - Y_c||^2 + ridge * n * ||W||^2 for the centred features X_c and
    centred one-hot targets Y_c; solved in the primal (D x D) or, with fewer samples than
    features, in the dual (n x n) form W = X_c^T (X_c X_c^T + ridge n I)^-1 Y_c. A test
    row's class is the argmax of its scores. ``chance`` is the test set's majority share."""
    fit_x, test_x = fit_x.double(), test_x.double()
    classes = int(max(fit_y.max(), test_y.max())) + 1
    targets = torch.nn.functional.one_hot(fit_y.long(), classes).to(fit_x)  # (n, K)
    x_mean, y_mean = fit_x.mean(0), targets.mean(0)
    xc, yc = fit_x - x_mean, targets - y_mean
    n, d = xc.shape
    if d <= n:
        gram = xc.T @ xc + ridge * n * torch.eye(d, dtype=xc.dtype, device=xc.device)
        weights = torch.linalg.solve(gram, xc.T @ yc)  # (D, K)
    else:
        gram = xc @ xc.T + ridge * n * torch.eye(n, dtype=xc.dtype, device=xc.device)
        weights = xc.T @ torch.linalg.solve(gram, yc)
    scores = (test_x - x_mean) @ weights + y_mean  # (m, K)
    correct = (scores.argmax(1) == test_y.to(scores.device)).double().mean()
    counts = torch.bincount(test_y.long().cpu(), minlength=classes)
    return {
        "accuracy": float(correct),
        "num_fit": n,
        "num_test": len(test_x),
        "classes": int((torch.bincount(fit_y.long().cpu(), minlength=classes) > 0).sum()),
        "chance": counts.max().item() / counts.sum().item(),
    }


# ----------------------------------------------------------------------------- spectrum


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64, >= 0) of the sample covariance of (n, D) rows.
    With fewer rows than columns the n x n Gram matrix is decomposed instead: its nonzero
    eigenvalues are the covariance's (at most n - 1 of them are nonzero)."""
    xc = x.double() - x.double().mean(0)
    n, d = xc.shape
    m = xc.T @ xc if d <= n else xc @ xc.T
    values = torch.linalg.eigvalsh(m / max(n - 1, 1))
    return values.clamp_min(0).flip(0)


def effective_dimension(x: torch.Tensor) -> dict:
    """The participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues l of
    (n, D) rows, and ``dims_<pct>``: the fewest principal components whose eigenvalues
    hold that share of the total variance; ``dim`` is D."""
    values = covariance_spectrum(x)
    total = values.sum()
    out = {"participation_ratio": float(total**2 / (values**2).sum().clamp_min(1e-300))}
    shares = values.cumsum(0) / total.clamp_min(1e-300)
    for q in VARIANCE_SHARES:
        # the first k whose cumulative share reaches q (a tolerance for rounding)
        out[f"dims_{round(q * 100)}"] = int((shares < q - 1e-12).sum()) + 1
    out["dim"] = x.shape[1]
    return out


# ----------------------------------------------------------------------------- robustness


@torch.no_grad()
def noisy_decodes(
    tokenizer,
    images: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    sigmas: Sequence[float],
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[float, np.ndarray]:
    """Decodes (uint8 (N, H, W, 3)) of uint8 ``images`` whose normalised latents were
    perturbed by ``sigma`` * eps, for sigma = 0 and each of ``sigmas``:
    z' = mean + std * ((z - mean) / std + sigma * eps) = z + sigma * std * eps, with z the
    tokenizer's posterior mean and one standard normal eps per image (seeded, drawn for
    the whole set at once on the CPU, the same for every sigma), so a decode depends on
    neither the batch split nor the device."""
    batch_size = tokenizer_batch(images.shape[1], batch_size)
    latents = []
    for i in range(0, len(images), batch_size):
        x = images_to_float(torch.from_numpy(images[i : i + batch_size])).to(device)
        latents.append(tokenizer.encode(x).float())
    z = torch.cat(latents)  # (N, *latent_shape)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device)
    std = std.to(z.device)
    out = {}
    for sigma in (0.0, *sigmas):
        noisy = z + sigma * std * eps
        decoded = [
            to_uint8(tokenizer.decode(noisy[i : i + batch_size]))
            for i in range(0, len(noisy), batch_size)
        ]
        out[float(sigma)] = np.concatenate(decoded)
    return out


# ----------------------------------------------------------------------------- ranks


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired values: the Pearson correlation of their
    average ranks (ties averaged), in [-1, 1]; None for fewer than 3 pairs or when either
    side is constant (no ranking)."""
    if len(a) != len(b):
        raise ValueError(f"Spearman of unpaired values: {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else None
