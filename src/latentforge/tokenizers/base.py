"""The Tokenizer interface: images in [-1, 1] <-> latents."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Image tokenizer: ``encode`` images to latents, ``decode`` latents to images.

    Subclasses implement ``encode``, ``decode`` and ``loss``; grid tokenizers set
    ``downsample`` (spatial factor) and ``latent_channels`` for :meth:`latent_shape`, 1-D
    token tokenizers override it. Latent normalisation (per channel, per element or scalar,
    as the family's registry entry declares) is data of the latent dataset and is applied
    by the platform, never here.
    """

    downsample: int
    latent_channels: int

    # Frozen networks a family uses (its VFM, a perceptual loss's network, ...) go in
    # ``self._frozen`` (a dict), outside the module tree: no state_dict entries, no
    # optimizer, and deep copies (the EMA) share them instead of holding their own.

    def __deepcopy__(self, memo: dict) -> Tokenizer:
        """A copy with its own weights that shares ``_frozen`` (the dict itself, so a network
        that one of them loads later is loaded once): with DINOv2-L as the VFM an EMA copy
        saves 1.2 GB per worker."""
        frozen = self.__dict__.get("_frozen")
        if frozen is not None:
            memo[id(frozen)] = frozen
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for m in (self.__dict__.get("_frozen") or {}).values():
            if m is not None:
                m._apply(fn, recurse)  # .to(device) moves the frozen networks along
        return self

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, H, W) of the latent of a ``resolution``x``resolution`` image ((C, N) for 1-D
        token tokenizers)."""
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not divisible by {self.downsample}")
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1], (B, 3, H, W). Returns latents (B, *latent_shape)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, *latent_shape). Returns images float, roughly [-1, 1], (B, 3, H, W)."""
        raise NotImplementedError

    def loss(self, images: torch.Tensor, nimg: int) -> dict[str, torch.Tensor]:
        """Training objective on a batch; ``nimg`` = images seen so far (for schedules).

        Returns a dict whose ``"loss"`` entry is the total to back-propagate; other
        entries are detached parts for logging. Tokenizers with a GAN also take
        ``discriminator=`` and, in the GAN phase, return the detached reconstruction as
        ``"fake"`` for the discriminator's step.
        """
        raise NotImplementedError

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict:
        """Further keyword arguments of :meth:`loss` drawn from a training batch (its
        ``label``, ...): none unless a family's loss uses them (Siglip-VAE's captions)."""
        return {}

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights this family saved in training (``model.safetensors``) into a model
        built for inference; strict unless a family drops training-only parts."""
        self.load_state_dict(state, strict=True)

    def make_discriminator(self) -> nn.Module | None:
        """A fresh discriminator for adversarial training, or None (no GAN)."""
        return None

    def discriminator_optimizer(self, base_lr: float) -> dict:
        """The discriminator's Adam settings for :class:`~latentforge.training.loop.Job`:
        ``disc_lr`` and ``disc_betas`` (Esser et al. 2021: the autoencoder's lr, (0.5, 0.9))."""
        return {"disc_lr": base_lr, "disc_betas": (0.5, 0.9)}

    def gan_active(self, nimg: int) -> bool:
        """Whether the GAN terms are on after ``nimg`` images seen."""
        return False

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The discriminator's objective on real ``images`` and reconstructions ``fake``;
        a dict as :meth:`loss` returns."""
        raise NotImplementedError
