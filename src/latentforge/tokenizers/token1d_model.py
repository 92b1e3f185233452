"""The 1-D token tokenizer (SoftVQ-VAE, MAETok) and its training objective; the family's
configs and registry entries are in :mod:`latentforge.tokenizers.token1d`.

Training as ``Hhhhhhao/continuous_tokenizer`` (``losses/vq_loss.py``, ``modelling/tokenizer.py``
at f4d60a0): L2 (or L1) + perceptual (its weight ramped up over ``perceptual_warmup``
images); SoftVQ's codebook entropy loss; REPA-style token alignment; MAETok's masked
auxiliary targets; a hinge GAN whose discriminator loss is ``disc_weight`` x (hinge +
``lecam_weight`` x LeCAM) + ``cr_weight`` x the consistency term (MSE between the logits of
weakly and strongly augmented images), and whose generator term is ``disc_weight`` x (the
adaptive weight, for MAETok) x hinge, both from ``disc_start`` images.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.feature_gan import FeatureGAN
from latentforge.tokenizers.token1d_nets import (
    SoftVQuantizer,
    TokenArch,
    TokenDecoder,
    TokenEncoder,
)
from latentforge.tokenizers.vfm import load_vfm

if TYPE_CHECKING:
    from latentforge.tokenizers.token1d import Token1DConfig

# keys of the official checkpoints (and ours) that only training uses
TRAINING_ONLY_KEYS = re.compile(
    r"^(repa_model|projection|clip_model|hog_generator|(clip_)?(de_)?scale)\.|"
    r"^(decoder|post_quant_conv|to_pixel)_(hog|dino|clip|supcls)\.|^quantize\.codebook_used$"
)


def inference_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict without its training-only entries."""
    return {k: v for k, v in sd.items() if not TRAINING_ONLY_KEYS.match(k)}


def build_perceptual(cfg: Token1DConfig) -> nn.Module | None:
    """LPIPS, the VFM feature distance (four layers spread over the VFM's depth) or None."""
    if cfg.perceptual == "none" or cfg.perceptual_weight <= 0:
        return None
    if cfg.perceptual == "lpips":
        return losses.LPIPSLoss(cfg.perceptual_net)
    vfm = load_vfm(cfg.perceptual_vfm)
    vfm.layers = sorted({round(vfm.depth * (k + 1) / 4) - 1 for k in range(4)})
    return losses.VFMFeatureDistance(vfm)


def projector(dim: int, width: int, out: int) -> nn.Sequential:
    """The REPA projector MLP (``projection.{0,2,4}``): dim -> width -> width -> out, SiLU."""
    return nn.Sequential(
        nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out)
    )


def spread_tokens(tokens: torch.Tensor, positions: int) -> torch.Tensor:
    """(B, L, C) -> (B, positions, C): each token repeated over its contiguous share of the
    positions (the official ``repa_align: repeat``), nearest when L does not divide them."""
    if positions % tokens.shape[1] == 0:
        return tokens.repeat_interleave(positions // tokens.shape[1], dim=1)
    return F.interpolate(tokens.transpose(1, 2), size=positions, mode="nearest").transpose(1, 2)


def on_grid(feats: torch.Tensor, side: int) -> torch.Tensor:
    """VFM patch features (B, C, h, w) on the tokenizer's side x side grid, as (B, N, C)."""
    if feats.shape[-2:] != (side, side):
        feats = F.interpolate(feats, size=(side, side), mode="bilinear", antialias=True)
    return feats.flatten(2).transpose(1, 2).float()


def mask_ratio(lo: float, hi: float, spread: float = 0.25) -> float:
    """MAETok's mask ratio: normal(hi, spread) truncated to [lo, hi] (scipy's truncnorm
    with loc = hi as the official code), by inverse CDF."""
    a = torch.special.ndtr(torch.tensor((lo - hi) / spread, dtype=torch.float64))
    u = a + (0.5 - a) * torch.rand((), dtype=torch.float64)
    return float(hi + spread * torch.special.ndtri(u))


class Token1D(FeatureGAN, Tokenizer):
    """ViT encoder -> L latent tokens (soft-quantised for SoftVQ) -> ViT decoder."""

    def __init__(
        self, arch: TokenArch, cfg: Token1DConfig, resolution: int, perceptual=None
    ) -> None:
        super().__init__()
        self.arch, self.cfg, self.resolution = arch, cfg, resolution
        self.latent_channels = arch.channels
        self.encoder = TokenEncoder(arch, resolution)
        self.quant_conv = nn.Linear(arch.width, arch.channels)
        self.quantize = (
            SoftVQuantizer(arch.codebooks, arch.codebook_size, arch.channels, arch.tau)
            if arch.codebooks
            else None
        )
        self.post_quant_conv = nn.Linear(arch.channels, arch.dec_width)
        self.decoder = TokenDecoder(arch, resolution)
        self.encoder.init_weights()
        self.decoder.init_weights()
        self._frozen = {"perceptual": perceptual}
        if not cfg.freeze_encoder:
            self._add_training_heads(arch, cfg, resolution)
        else:  # MAETok's second phase: only the pixel decoder learns
            for part in (self.encoder, self.quant_conv, self.quantize):
                if part is not None:
                    part.requires_grad_(False)

    def _vfm(self, spec: str, weights: str | None):
        for m in self._frozen.values():  # one copy of a VFM used for two targets
            if getattr(m, "name", None) == spec:
                return m
        return load_vfm(spec, resize=self.cfg.vfm_input_size, weights=weights)

    def _add_training_heads(self, arch: TokenArch, cfg: Token1DConfig, resolution: int):
        """REPA's projector and MAETok's auxiliary decoders, under the official names."""
        if cfg.repa_weight > 0:
            self._frozen["repa"] = self._vfm(cfg.repa_vfm, cfg.repa_vfm_weights)
            width = self._frozen["repa"].embed_dim
            self.projection = projector(arch.channels, cfg.repa_proj_dim, width)
        if cfg.mask_max <= 0:
            return
        if arch.decoder_patch != arch.patch:
            raise ValueError("mask modelling needs the decoder's patch equal to the encoder's")
        targets = {}
        if cfg.hog_weight > 0:
            if arch.patch % cfg.hog_cell:
                raise ValueError(f"tokenizer.hog_cell {cfg.hog_cell} does not divide {arch.patch}")
            targets["hog"] = 27 * (arch.patch // cfg.hog_cell) ** 2
        for key, spec, weights in (
            ("dino", cfg.aux_vfm, cfg.aux_vfm_weights),
            ("clip", cfg.aux_vfm2, cfg.aux_vfm2_weights),
        ):
            if spec:
                self._frozen[key] = self._vfm(spec, weights)
                targets[key] = self._frozen[key].embed_dim
        # shallow MoVQ decoders with a class token (the official vit_tinytiny_..._movq2)
        aux = replace(arch, movq=True, dec_cls_token=True)
        dims = (cfg.aux_width, cfg.aux_depth, cfg.aux_heads)
        for key, out in targets.items():
            dec = TokenDecoder(aux, resolution, dims, to_pixel=False)
            dec.init_weights()
            setattr(self, f"decoder_{key}", dec)
            setattr(self, f"post_quant_conv_{key}", nn.Linear(arch.channels, cfg.aux_width))
            setattr(self, f"to_pixel_{key}", nn.Linear(cfg.aux_width, out))

    @property
    def perceptual(self) -> nn.Module | None:
        return self._frozen["perceptual"]

    def latent_shape(self, resolution: int) -> tuple[int, int]:
        return (self.arch.channels, self.arch.tokens)

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        """Args: images (B, 3, H, W) in [-1, 1]; mask (B, N) bool (training). Returns the
        latent tokens (B, L, D) and SoftVQ's logits (None for MAETok)."""
        z = self.quant_conv(self.encoder(images, mask))  # (B, L, D)
        if self.quantize is None:
            return z, None
        return self.quantize(z)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns latents (B, D, L) (``sample`` is
        ignored: the encoder is deterministic)."""
        return self.tokens(images)[0].transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, D, L). Returns images (B, 3, H, W), roughly [-1, 1]."""
        if tuple(latents.shape[1:]) != (self.arch.channels, self.arch.tokens):
            raise ValueError(
                f"latents {tuple(latents.shape[1:])}, expected "
                f"{(self.arch.channels, self.arch.tokens)} (D, L)"
            )
        z = latents.transpose(1, 2)  # (B, L, D)
        return self.decoder(self.post_quant_conv(z), z)

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Our training checkpoints hold the training-only heads too; drop those this model
        (built for inference) does not have, then load strictly."""
        own = self.state_dict()
        sd = {k: v for k, v in state.items() if k in own or not TRAINING_ONLY_KEYS.match(k)}
        self.load_state_dict(sd, strict=True)

    # ------------------------------------------------------------------------- training

    def sample_mask(self, batch: int, device) -> torch.Tensor:
        """(B, N) bool: ceil(N * ratio) image tokens per image, at random positions; one
        ratio per batch (MAETok's ``random_masking``)."""
        n = self.encoder.side**2
        k = math.ceil(n * mask_ratio(self.cfg.mask_min, self.cfg.mask_max))
        order = torch.rand(batch, n, device=device).argsort(dim=1)
        mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
        return mask.scatter_(1, order[:, :k], True)

    def loss(
        self, images: torch.Tensor, nimg: int, discriminator: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Reconstruction + perceptual + the latent terms (+ the GAN generator term from
        ``disc_start`` images; ``fake`` is then the detached reconstruction for the
        discriminator's step); the parts are logged."""
        cfg = self.cfg
        masking = self.training and cfg.mask_max > 0 and not cfg.freeze_encoder
        mask = self.sample_mask(images.shape[0], images.device) if masking else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_encoder):
            z, logits = self.tokens(images, mask)
        x_hat = self.decoder(self.post_quant_conv(z), z)
        recon = losses.reconstruction_loss(images, x_hat, cfg.recon)
        out = {"recon": recon.detach()}
        nll = recon
        if self.perceptual is not None:
            p = self.perceptual(images, x_hat)
            ramp = min(1.0, nimg / cfg.perceptual_warmup) if cfg.perceptual_warmup > 0 else 1.0
            nll = nll + cfg.perceptual_weight * ramp * p
            out[f"perceptual_{cfg.perceptual}"] = p.detach()
        total = nll + self.latent_losses(images, z, logits, mask, out)
        if discriminator is not None and self.gan_active(nimg):
            g = losses.hinge_g_loss(discriminator(x_hat))
            weight = torch.as_tensor(cfg.disc_weight)
            if cfg.disc_adaptive and self.training and torch.is_grad_enabled():
                last = self.decoder.to_pixel.model.weight  # Esser et al. 2021, Eq. 7
                weight = weight * losses.adaptive_weight(nll, g, last, cfg.disc_max_weight)
            total = total + weight * g
            out.update(g_loss=g.detach(), g_weight_eff=weight.detach(), fake=x_hat.detach())
        out["loss"] = total
        return out

    def latent_losses(self, images, z, logits, mask, out: dict) -> torch.Tensor:
        """SoftVQ's entropy loss, the REPA-style alignment and MAETok's masked auxiliary
        targets, as far as configured; each part logged in ``out``."""
        cfg = self.cfg
        total = z.new_zeros((), dtype=torch.float32)
        if logits is not None and cfg.entropy_weight > 0 and not cfg.freeze_encoder:
            e = losses.codebook_entropy_loss(logits, cfg.entropy_temperature)
            total = total + cfg.entropy_weight * e
            out["entropy"] = e.detach()
        if "repa" in self._frozen:
            feats = self._frozen["repa"](images).patch[-1]  # (B, C, h, w), no gradients
            target = feats.flatten(2).transpose(1, 2)
            r = losses.neg_cos(spread_tokens(self.projection(z), target.shape[1]), target)
            total = total + cfg.repa_weight * r
            out["repa"] = r.detach()
        if mask is not None:
            total = total + self.aux_losses(images, z, mask, out)
        return total

    def _aux_predict(self, key: str, z: torch.Tensor) -> torch.Tensor:
        h = getattr(self, f"post_quant_conv_{key}")(z)
        return getattr(self, f"to_pixel_{key}")(getattr(self, f"decoder_{key}")(h, z))

    def aux_losses(self, images, z, mask: torch.Tensor, out: dict) -> torch.Tensor:
        """MAETok: HOG (MSE) and VFM features (-cos) predicted at the masked tokens."""
        cfg, total = self.cfg, z.new_zeros((), dtype=torch.float32)
        m = mask.float()
        if hasattr(self, "decoder_hog"):
            target = losses.hog_target(images, self.arch.patch, cfg.hog_cell)  # (B, N, F)
            mse = (self._aux_predict("hog", z).float() - target).pow(2).mean(-1)  # (B, N)
            hog = (mse * m).sum() / m.sum().clamp(min=1)
            total = total + cfg.hog_weight * hog
            out["aux_hog"] = hog.detach()
        for key in ("dino", "clip"):
            if key in self._frozen:
                target = on_grid(self._frozen[key](images).patch[-1], self.encoder.side)
                a = losses.neg_cos(self._aux_predict(key, z), target, mask)
                total = total + cfg.aux_weight * a
                out[f"aux_{key}"] = a.detach()
        return total

    def gan_active(self, nimg: int) -> bool:
        """Whether the GAN terms are on after ``nimg`` images seen."""
        return self.cfg.disc_weight > 0 and nimg >= self.cfg.disc_start

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """disc_weight x (hinge + lecam_weight x LeCAM) on weakly augmented real images and
        reconstructions, + cr_weight x MSE between those logits and the logits of strongly
        augmented copies (colour, translation, cutout 0.5, always)."""
        cfg = self.cfg
        real, fake = images.detach(), fake.detach()
        logits_real, logits_fake = discriminator(real), discriminator(fake)
        d = losses.hinge_d_loss(logits_real, logits_fake)
        out = {"d_loss": d.detach()}
        total = d
        if cfg.lecam_weight > 0:
            reg = discriminator.lecam(logits_real, logits_fake)
            total = total + cfg.lecam_weight * reg
            out["lecam"] = reg.detach()
        total = cfg.disc_weight * total
        if cfg.cr_weight > 0:
            strong = losses.DiffAugment(1.0, cutout=0.5)
            weak = torch.cat([logits_real, logits_fake])
            hard = torch.cat([discriminator.discriminator(strong(x)) for x in (real, fake)])
            cr = F.mse_loss(weak, hard)
            total = total + cfg.cr_weight * cr
            out["cr"] = cr.detach()
        out.update(
            loss=total,
            logits_real=logits_real.detach().mean(),
            logits_fake=logits_fake.detach().mean(),
        )
        return out
