"""Multi-scale PatchGAN with feature matching (Wang et al. 2018, "High-Resolution Image
Synthesis and Semantic Manipulation with Conditional GANs", pix2pixHD), as VFM-VAE's last
stage trains its decoder with it (Bi et al. 2025; tianciB/VFM-VAE
``networks/discriminator.py`` and ``training/loss.py``, read, not copied).

``scales`` PatchGANs of the same shape look at the image and at 2x, 4x, ... average-pooled
copies of it; each returns the outputs of all its layers, so that the generator can match
the discriminator's intermediate features of real and reconstructed images (L1, the real
side detached) besides the least-squares GAN term on the last layer's logits. Its
normalisation is a *virtual* batch norm: statistics per group of ``virtual_batch`` samples,
never running averages, so a logit does not depend on the rest of a large batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.tokenizers import losses


class LocalBatchNorm2d(nn.Module):
    """Batch norm over groups of ``virtual_batch`` consecutive samples (per channel, over the
    group and the positions; biased variance), with a learned scale and shift."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        groups = math.ceil(b / self.virtual_batch)
        if b % groups:
            raise ValueError(f"batch {b} does not split into {groups} equal groups")
        g = x.reshape(groups, b // groups, c, h, w)
        mean = g.mean(dim=(1, 3, 4), keepdim=True)
        var = g.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return (g * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)).reshape(
            b, c, h, w
        )


class PatchGANLayers(nn.Module):
    """One PatchGAN whose forward returns every layer's output: ``layers`` stride-2 4x4
    convolutions (widths ``channels * 2**i`` up to 512), a stride-1 one, a 4x4 convolution
    to one logit channel; local batch norm and LeakyReLU(0.2) between them, none after the
    first; padding 2, as pix2pixHD pads."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        widths = [min(channels * 2**i, 512) for i in range(layers + 1)]
        blocks = [nn.Sequential(nn.Conv2d(in_channels, widths[0], 4, 2, 2), nn.LeakyReLU(0.2))]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(widths[i - 1], widths[i], 4, stride, 2),
                    LocalBatchNorm2d(widths[i]),
                    nn.LeakyReLU(0.2),
                )
            )
        blocks.append(nn.Sequential(nn.Conv2d(widths[-1], 1, 4, 1, 2)))
        self.blocks = nn.ModuleList(blocks)
        for m in self.modules():  # DCGAN initialisation, as pix2pixHD
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, LocalBatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


class MultiscalePatchGAN(nn.Module):
    """``scales`` PatchGANs, the i-th on the image average-pooled i times (3x3, stride 2,
    padding not counted). Returns, per scale from the full size down, every layer's output
    (the last is the logit map)."""

    def __init__(self, scales: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(PatchGANLayers(3, channels, layers) for _ in range(scales))

    def forward(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        out, x = [], images
        for i, disc in enumerate(self.scales):
            out.append(disc(x))
            if i + 1 < len(self.scales):
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return out


def lsgan_d_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Least-squares GAN (Mao et al. 2017) for the discriminator, mean over scales:
    (D(x) - 1)^2 + D(x_hat)^2 on each scale's logits."""
    terms = [
        F.mse_loss(r[-1], torch.ones_like(r[-1])) + f[-1].pow(2).mean()
        for r, f in zip(real, fake, strict=True)
    ]
    return torch.stack(terms).mean()


def lsgan_g_loss(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Least-squares GAN for the generator, mean over scales: (D(x_hat) - 1)^2."""
    return torch.stack([F.mse_loss(f[-1], torch.ones_like(f[-1])) for f in fake]).mean()


def feature_matching_loss(
    real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]
) -> torch.Tensor:
    """pix2pixHD's feature matching: L1 between the discriminator's intermediate outputs
    (all layers but the logits) of reconstructions and of real images (detached), each
    weighted 4 / (layers - 1) / scales."""
    total = fake[0][0].new_zeros(())
    for r, f in zip(real, fake, strict=True):
        weight = 4.0 / max(len(r) - 1, 1) / len(real)
        for rf, ff in zip(r[:-1], f[:-1], strict=True):
            total = total + weight * F.l1_loss(ff, rf.detach())
    return total


# ------------------------------------------------------- with a second (hinge) critic


def critics(discriminator: nn.Module) -> dict[str, nn.Module]:
    """The critics of a discriminator: a ModuleDict's entries (``multiscale`` is this
    module's, any other a hinge critic), or the one given, as ``single``."""
    if isinstance(discriminator, nn.ModuleDict):
        return dict(discriminator.items())
    return {"single": discriminator}


def generator_terms(
    discriminator: nn.Module,
    images: torch.Tensor,
    fake: torch.Tensor,
    hinge_weight: float,
    patchgan_weight: float,
    feature_matching_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's weighted GAN terms and their detached parts: the hinge term of each
    hinge critic; least squares and feature matching (real images' features computed
    without gradients) on the multi-scale PatchGAN."""
    total, out = fake.new_zeros(()), {}
    for name, critic in critics(discriminator).items():
        if name == "multiscale":
            with torch.no_grad():
                real = critic(images)
            fake_out = critic(fake)
            g, fm = lsgan_g_loss(fake_out), feature_matching_loss(real, fake_out)
            total = total + patchgan_weight * g + feature_matching_weight * fm
            out.update(g_patchgan=g.detach(), feature_matching=fm.detach())
        else:
            g = losses.hinge_g_loss(critic(fake))
            total = total + hinge_weight * g
            out["g_loss"] = g.detach()
    return total, out


def discriminator_terms(
    discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor, patchgan_weight: float
) -> dict[str, torch.Tensor]:
    """The discriminators' loss (``loss``) and its detached parts: each hinge critic's
    hinge loss plus ``patchgan_weight`` x the multi-scale PatchGAN's least squares."""
    real, fake = images.detach(), fake.detach()
    total, out = real.new_zeros(()), {}
    for name, critic in critics(discriminator).items():
        if name == "multiscale":
            d = lsgan_d_loss(critic(real), critic(fake))
            total = total + patchgan_weight * d
            out["d_patchgan"] = d.detach()
        else:
            d = losses.hinge_d_loss(critic(real), critic(fake))
            total = total + d
            out["d_loss"] = d.detach()
    return {"loss": total, **out}
