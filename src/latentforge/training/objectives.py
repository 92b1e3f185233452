"""Training objectives: what one batch costs, for the tokenizer and for the generator."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.images import images_to_float


class TokenizerObjective(nn.Module):
    """Calls ``Tokenizer.loss`` through ``forward`` so DDP sees the call. The discriminator
    (if any) is a submodule, so DDP synchronises it too; called with ``fake=``
    (reconstructions of the autoencoder's step) the objective is the discriminator's loss."""

    def __init__(self, tokenizer: nn.Module, discriminator: nn.Module | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator

    def forward(self, batch: dict[str, torch.Tensor], nimg: int, generator=None, fake=None):
        images = images_to_float(batch["image"])
        if fake is not None:
            return self.tokenizer.discriminator_loss(self.discriminator, images, fake)
        extra = self.tokenizer.conditioning(batch)  # e.g. captions from the labels
        if self.discriminator is None:
            return self.tokenizer.loss(images, nimg, **extra)
        return self.tokenizer.loss(images, nimg, discriminator=self.discriminator, **extra)


class GeneratorObjective(nn.Module):
    """Normalises latents with the dataset statistics, then the transport loss."""

    def __init__(self, model: nn.Module, transport, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.transport = transport
        # shaped to broadcast against (B, *latent_shape) (models.latent_stat): per channel,
        # per element or scalar, as the tokenizer family normalises its latents
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], nimg: int, generator=None):
        latent, feats = flip_augment(batch, generator)
        x1 = (latent - self.mean) / self.std  # (B, C, H, W) or 1-D tokens (B, C, N)
        cls = standardize_cls(batch["vfm_cls"]) if "vfm_cls" in batch else None
        return self.transport.loss(
            self.model, x1, batch["label"].long(), generator=generator, features=feats, cls=cls
        )


def standardize_cls(cls: torch.Tensor) -> torch.Tensor:
    """REG's class token at unit scale, like the normalised latents: each vector to zero
    mean and unit variance over its dimensions (the VFM's own scale is arbitrary; the
    mirrored image keeps the token, which describes the whole image)."""
    cls = cls.float()
    return (cls - cls.mean(-1, keepdim=True)) / cls.std(-1, keepdim=True).clamp(min=1e-6)


def flip_augment(batch: dict[str, torch.Tensor], generator=None):
    """LightningDiT's flip augmentation: with ``latent_flip`` in the batch (the latent of the
    mirrored image), each sample takes it with probability 0.5, drawn from ``generator``;
    its REPA features (B, D, h, w) are mirrored with it. Returns (latent, features or None)."""
    latent = batch["latent"].float()
    feats = batch["vfm"].float() if "vfm" in batch else None
    if "latent_flip" not in batch:
        return latent, feats
    flip = torch.rand(len(latent), generator=generator, device=latent.device) < 0.5  # (B,)
    mirrored = batch["latent_flip"].float()
    latent = torch.where(flip.view(-1, *[1] * (latent.ndim - 1)), mirrored, latent)
    if feats is not None:
        feats = torch.where(flip.view(-1, 1, 1, 1), feats.flip(-1), feats)
    return latent, feats
