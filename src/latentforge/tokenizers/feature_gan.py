"""The frozen-ViT-feature GAN's hooks, shared by the families that train with it (RAE,
MAETok / SoftVQ-VAE): the discriminator of StyleGAN-T as RAE adapted it
(:class:`~latentforge.tokenizers.losses.VFMDiscriminator`) behind DiffAugment, with
LeCAM's running averages, and its optimizer settings."""

from __future__ import annotations

from torch import nn

from latentforge.tokenizers import losses
from latentforge.tokenizers.vfm import load_vfm


class FeatureGAN:
    """Mixin for a :class:`~latentforge.tokenizers.base.Tokenizer` whose config has
    ``disc_weight``, ``disc_vfm``, ``disc_vfm_weights``, ``disc_kernel``, ``diffaug_prob``,
    ``diffaug_cutout``, ``lecam_decay``, ``disc_lr`` and ``disc_betas``."""

    def make_discriminator(self) -> nn.Module | None:
        """The frozen-ViT-feature discriminator behind DiffAugment (with LeCAM's averages),
        or None without the GAN (``disc_weight`` 0)."""
        cfg = self.cfg
        if cfg.disc_weight <= 0:
            return None
        vfm = load_vfm(cfg.disc_vfm, weights=cfg.disc_vfm_weights)
        disc = losses.VFMDiscriminator(vfm, kernel_size=cfg.disc_kernel)
        aug = losses.DiffAugment(cfg.diffaug_prob, cutout=cfg.diffaug_cutout)
        return losses.GANCritic(disc, aug, losses.LeCAM(cfg.lecam_decay))

    def discriminator_optimizer(self, base_lr: float) -> dict:
        """The discriminator's learning rate (``disc_lr``, else the tokenizer's) and betas
        (``disc_betas``, else (0.9, 0.95))."""
        betas = tuple(self.cfg.disc_betas or (0.9, 0.95))
        return {"disc_lr": self.cfg.disc_lr or base_lr, "disc_betas": betas}
