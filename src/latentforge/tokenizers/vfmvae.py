"""VFM-VAE: a frozen vision foundation model as the encoder, a StyleGAN-T-style decoder.

Bi et al. 2025, "Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion
Models" (tianciB/VFM-VAE). The encoder is a frozen VFM (SigLIP2-L/16 at 512 px for the
published model, fed the [0, 1] image resized bilinearly by ``vfm_scale``) read at several
depths at once (the patch embedding, a middle block and the normed output). A small
adapter projects each level with an attention projection (UniTok's, Ma et al. 2025),
folds 2x2 patches into channels (PixelUnshuffle), concatenates the levels and projects
them to the posterior's mean and log-variance (``final_quant``); ``post_quant`` widens the
latent again for the decoder. The decoder follows StyleGAN-T (Sauer et al. 2023): a style
vector w from an MLP on the spatially pooled latent modulates ConvNeXt-style layers, the
latent is re-injected into the early blocks, the early blocks have self-attention
(GigaGAN's, Kang et al. 2023, with a null key/value), and every block adds an RGB skip
output (multi-scale images for the multi-scale pixel loss).

The networks are in :mod:`~latentforge.tokenizers.vfmvae_nets` (their layers in
:mod:`~latentforge.tokenizers.vfmvae_layers`); this module holds the tokenizer, its
training objective and its registry entry. Parameter names follow the released
``G_ema`` (``ldm_adapter.*``, ``mapping.*``, ``synthesis.*``) so that the published
checkpoint loads strictly once the frozen VFM (``vfm_encoder.*``) is dropped. Modules and training losses are written from the paper
and from reading the official code; no code is copied from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses, pix2pixhd
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.vfm import VFM, check_loss_vfms, check_vfm_spec, load_vfm
from latentforge.tokenizers.vfm_levels import encode_levels
from latentforge.tokenizers.vfmvae_layers import Mapping
from latentforge.tokenizers.vfmvae_nets import CONFIGS, Adapter, Synthesis, VFMVAEArch

__all__ = ["CONFIGS", "VFMVAE", "VFMVAEArch", "VFMVAEConfig"]

# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Stage:
    """One stage of the published recipe: its loss weights and what trains."""

    kl: float
    vf: float
    l1: float
    perceptual: float
    ssim: float
    equivariance: bool
    trains: tuple[str, ...]  # parameter-name prefixes that train
    # multi-scale L1 (released: on for the first 5M images of stage 0, so never later)
    multiscale: bool = False


_ALL = ("ldm_adapter.", "mapping.", "synthesis.")
_DECODER = ("ldm_adapter.post_quant.", "mapping.", "synthesis.")
# stage 3 trains "the second half of the decoder" (SECOND_HALF: the upper half of the
# synthesis blocks and their latent inputs; above 32 px at 256 px). The released code names
# them synthesis.b64, ..., which matches no parameter, so there it trains none of them
SECOND_HALF = ("synthesis.second-half",)
STAGES: dict[str, Stage] = {
    "strong-alignment": Stage(1e-6, 5.0, 1.0, 10.0, 0.0, True, _ALL, True),  # stage 0, 20M
    "weak-alignment": Stage(1e-6, 1.0, 1.0, 10.0, 0.0, True, _ALL),  # stage 1, +20M
    "ssim-finetune": Stage(0.0, 0.0, 1.0, 2.0, 1.0, True, _DECODER),  # stage 2, +1M
    "gan-finetune": Stage(0.0, 0.0, 0.0, 0.0, 0.0, False, SECOND_HALF),  # stage 3, +3M
}


@dataclass
class VFMVAEConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for VFM-VAE."""

    name: str = "vfmvae"
    config: str = "shapes"  # key of CONFIGS
    latent_channels: int | None = None  # override the named config's z channels
    vfm: str = "local:shapes-vit"  # the frozen encoder (hf:google/siglip2-large-patch16-512)
    vfm_weights: str | None = None  # explicit weights file for timm: VFMs
    # stage of the published recipe (STAGES): its loss weights and trained parameters;
    # the weights below, when set, replace the stage's
    stage: Literal["strong-alignment", "weak-alignment", "ssim-finetune", "gan-finetune"] = (
        "strong-alignment"
    )
    kl_weight: float | None = None
    vf_weight: float | None = None
    vf_adaptive: bool = True  # x ||grad L_rec|| / ||grad L_vf|| at final_quant's last layer
    l1_weight: float | None = None
    perceptual_weight: float | None = None
    ssim_weight: float | None = None
    equivariance: bool | None = None  # scale / 90-degree rotation regularisation
    equivariance_p: float = 0.5  # chance of transforming z (else, maybe, the input)
    equivariance_p_input_scale: float = 0.25  # chance of a smaller input otherwise
    # L1 of the smaller RGB outputs against the resized target, largest first (released:
    # 0.1 for each of the 5, during the first 5M images)
    multiscale_weights: list[float] = field(default_factory=lambda: [0.1] * 5)
    multiscale_end_images: float = 5.0e6
    # perceptual term: LPIPS (lpips package, torchvision backbone from the torch hub cache;
    # the official code uses the same VGG LPIPS) or, offline, a VFM feature distance
    perceptual: Literal["none", "vfm", "lpips"] = "lpips"
    perceptual_vfm: str | None = None  # perceptual=vfm: VFM spec (None: tokenizer.vfm)
    # hinge GAN; 0 = off. With disc_vfm: StyleGAN-T's projected discriminator, as released
    # (heads on a frozen ViT's features at several depths behind DiffAugment color /
    # translation / cutout 0.2; released: timm vit_small_patch16_224.dino), the one RAE
    # adapted (losses.VFMDiscriminator). Without it and without disc_scales: one PatchGAN
    # (losses.NLayerDiscriminator)
    disc_weight: float = 0.0
    # stage 3's second discriminator: pix2pixHD's multi-scale PatchGAN (disc_scales of them,
    # released: 3; least squares) with feature matching (pix2pixhd.py); 0 = off
    disc_scales: int = 0
    patchgan_weight: float = 1.0
    feature_matching_weight: float = 10.0
    disc_start: float = 0.0
    disc_vfm: str | None = None  # tokenizers/vfm.py spec of the projected discriminator's ViT
    disc_vfm_weights: str | None = None  # explicit weights file for a timm: disc_vfm
    disc_kernel: int = 9  # kernel of the projected heads' token convolution
    diffaug_cutout: float = 0.2  # DiffAugment's cutout side (fraction of the image)
    disc_layers: int = 3  # PatchGAN depth
    disc_channels: int = 64  # PatchGAN width
    sample_posterior: bool = True  # training decodes z ~ q(z|x); encode() returns the mean
    # the released G_ema (or our safetensors) to start from or, with
    # train.tokenizer_images=0, to use as it is
    weights: str | None = None


def stage_of(cfg: VFMVAEConfig) -> Stage:
    """The configured stage with the config's explicit weights in place of its own."""
    base = STAGES[cfg.stage]
    keys = ("kl", "vf", "l1", "perceptual", "ssim", "equivariance")
    given = {k: getattr(cfg, f"{k}_weight" if k != "equivariance" else k) for k in keys}
    values = {k: getattr(base, k) if v is None else v for k, v in given.items()}
    return Stage(**values, trains=base.trains, multiscale=base.multiscale)


class VFMVAE(Tokenizer):
    """Frozen VFM + adapter encoder, StyleGAN-T-style decoder."""

    def __init__(
        self,
        arch: VFMVAEArch,
        cfg: VFMVAEConfig,
        vfm: VFM | None = None,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.arch, self.cfg = arch, cfg
        self.downsample = arch.downsample
        self.latent_channels = arch.z_channels
        stage = stage_of(cfg)
        z_wide = arch.z_channels * arch.decompress
        self.ldm_adapter = Adapter(arch, arch.vfm_dim if stage.vf > 0 else None)
        self.mapping = Mapping(z_wide, arch.w_dim)
        self.synthesis = Synthesis(arch, z_wide)
        # frozen networks are held outside the module tree (not in state_dict/parameters);
        # the VFM loads on first use, so that decoding alone needs none of its files
        self._frozen = {"vfm": vfm, "perceptual": perceptual}
        self.set_trainable(stage.trains)

    def set_trainable(self, prefixes: tuple[str, ...]) -> None:
        """Only parameters whose names start with one of ``prefixes`` train
        (:data:`SECOND_HALF`: the upper half of the synthesis blocks)."""
        if prefixes == SECOND_HALF:
            upper = range(self.arch.num_blocks // 2, self.arch.num_blocks)
            prefixes = tuple(f"synthesis.{k}.{i}." for i in upper for k in ("blocks", "z_convs"))
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(prefixes))

    @property
    def vfm(self) -> VFM:
        if self._frozen["vfm"] is None:
            vfm = load_vfm(self.cfg.vfm, weights=self.cfg.vfm_weights)
            self._frozen["vfm"] = vfm.to(next(self.parameters()).device)
        return self._frozen["vfm"]

    @property
    def perceptual(self) -> nn.Module | None:
        return self._frozen["perceptual"]

    def vfm_levels(self, images: torch.Tensor, input_scale: float = 1.0) -> list[torch.Tensor]:
        """The VFM's level grids for images in [-1, 1]: [0, 1] values, optionally shrunk by
        ``input_scale`` (antialiased), resized bilinearly by ``vfm_scale``, normalised."""
        vfm = self.vfm
        x = (images.float() + 1) / 2
        if input_scale != 1.0:
            x = F.interpolate(
                x, scale_factor=input_scale, mode="bilinear", align_corners=False, antialias=True
            )
        s = self.arch.vfm_scale
        if s != 1.0:
            x = F.interpolate(
                x, scale_factor=s, mode="bilinear", align_corners=False, antialias=s < 1
            )
        x = (x - vfm.mean) / vfm.std if vfm.normalize else x * 2 - 1
        return encode_levels(vfm, x, list(self.arch.levels))

    def moments(self, images: torch.Tensor, input_scale: float = 1.0):
        """Posterior mean and log-variance (B, z, H/f, W/f) of images in [-1, 1]."""
        return self.moments_of(self.vfm_levels(images, input_scale))

    def moments_of(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.ldm_adapter.encode(levels).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns the posterior mean (or a sample)
        (B, z, H/f, W/f)."""
        mean, logvar = self.moments(images)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    def decode_all(self, latents: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: latents (B, z, h, w). Returns the image (B, 3, h f, w f), roughly [-1, 1],
        and the smaller RGB outputs of the other blocks, largest first."""
        z = self.ldm_adapter.decode(latents.float())  # (B, z * decompress, h, w)
        w = self.mapping(F.adaptive_avg_pool2d(z, 1).flatten(1))  # (B, w_dim)
        return self.synthesis(z, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, z, h, w). Returns images (B, 3, h f, w f), roughly [-1, 1]."""
        return self.decode_all(latents)[0]

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Strict, but for the VF loss's projection, which a model built without the VF
        term does not have."""
        if self.ldm_adapter.linear_proj is None:
            state = {k: v for k, v in state.items() if not k.startswith(VF_PROJ)}
        self.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------------- training

    def draw_equivariance(self) -> tuple[float, int, bool]:
        """(scale, quarter turns, on the input?) of the equivariance regularisation: with
        probability ``equivariance_p`` z is scaled by one of {1/4, 1/2, 3/4, 1} and turned by
        k x 90 degrees; otherwise, with probability ``equivariance_p_input_scale``, the
        input image is shrunk by one of {1/4, 1/2, 3/4} before the VFM. The target follows."""
        cfg = self.cfg
        if random.random() < cfg.equivariance_p:
            return random.choice([0.25, 0.5, 0.75, 1.0]), random.choice([0, 1, 2, 3]), False
        small = random.random() < cfg.equivariance_p_input_scale
        return (random.choice([0.25, 0.5, 0.75]) if small else 1.0), 0, True

    def loss(
        self, images: torch.Tensor, nimg: int, discriminator: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """The configured stage's objective: L1 + perceptual + SSIM + multi-scale L1 (the
        reconstruction terms, on the equivariance-transformed target) + KL + adaptive VF
        (+ the GAN generator term with ``discriminator``). ``loss`` back-propagates;
        ``fake`` (in the GAN phase) is the detached reconstruction; the rest is logged."""
        cfg, stage = self.cfg, stage_of(self.cfg)
        scale, turns, on_input = 1.0, 0, False
        if stage.equivariance and self.training:
            scale, turns, on_input = self.draw_equivariance()
        levels = self.vfm_levels(images, scale if on_input else 1.0)
        mean, logvar = self.moments_of(levels)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if cfg.sample_posterior else mean
        z_dec = z if on_input else equivariant(z, scale, turns, antialias=False)
        x_hat, smaller = self.decode_all(z_dec)
        target = equivariant(images, scale, turns, antialias=True)
        out, main = self.reconstruction_terms(target, x_hat, smaller, nimg, stage)
        kl = losses.kl_loss(mean, logvar, pixels=1)  # summed per image, as released
        total = main + stage.kl * kl
        out["kl"] = kl.detach()
        if stage.vf > 0:
            vf = self.vf_term(z, levels[list(self.arch.levels).index(-1)])
            weight = stage.vf
            if cfg.vf_adaptive and self.training and torch.is_grad_enabled():
                last = self.ldm_adapter.final_quant.blocks[-1].mlp.w2.weight
                weight = weight * losses.adaptive_weight(main, vf, last)
            total = total + weight * vf
            out.update(vf=vf.detach(), vf_weight_eff=torch.as_tensor(weight).detach())
        if discriminator is not None and self.gan_active(nimg):
            fake = x_hat  # at the input's size (an equivariance step may shrink it)
            if fake.shape[-2:] != images.shape[-2:]:
                fake = F.interpolate(fake, size=images.shape[-2:], mode="bilinear")
            g, parts = pix2pixhd.generator_terms(
                discriminator,
                images,
                fake,
                cfg.disc_weight,
                cfg.patchgan_weight,
                cfg.feature_matching_weight,
            )
            total = total + g
            out.update(parts, fake=fake.detach())
        out["loss"] = total
        return out

    def reconstruction_terms(self, target, x_hat, smaller, nimg, stage: Stage):
        """The weighted reconstruction terms' sum (the adaptive VF weight's reference) and
        the detached parts."""
        out, main = {}, x_hat.new_zeros(())
        if stage.l1 > 0:
            out["l1"] = losses.reconstruction_loss(target, x_hat, "l1")
            main = main + stage.l1 * out["l1"]
        if self.perceptual is not None and stage.perceptual > 0:
            out[f"perceptual_{self.cfg.perceptual}"] = p = self.perceptual(target, x_hat)
            main = main + stage.perceptual * p
        if stage.ssim > 0:
            out["ssim"] = losses.ssim_loss(target, x_hat)
            main = main + stage.ssim * out["ssim"]
        weights = self.cfg.multiscale_weights[: len(smaller)]
        if stage.multiscale and any(weights) and nimg < self.cfg.multiscale_end_images:
            out["multiscale_l1"] = ms = losses.multiscale_l1(target, smaller, weights)
            main = main + ms
        return {k: v.detach() for k, v in out.items()}, main

    def vf_term(self, z: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """VF loss (margins 0) between the projected latent and the VFM's output features,
        average-pooled to the latent grid."""
        if feats.shape[-2:] != z.shape[-2:]:
            feats = F.adaptive_avg_pool2d(feats, z.shape[-2:])
        return losses.vf_loss(self.ldm_adapter.linear_proj(z), feats, 0.0, 0.0)

    def make_discriminator(self) -> nn.Module | None:
        """With ``disc_weight`` > 0 the projected discriminator on ``disc_vfm`` (without
        one, and without ``disc_scales``, a PatchGAN); with ``disc_scales`` the multi-scale
        PatchGAN; both together in a ModuleDict (``projected``, ``multiscale``); None when
        there is no GAN."""
        cfg, parts = self.cfg, {}
        if cfg.disc_weight > 0 and cfg.disc_vfm is not None:
            vfm = load_vfm(cfg.disc_vfm, weights=cfg.disc_vfm_weights)
            disc = losses.VFMDiscriminator(vfm, kernel_size=cfg.disc_kernel)
            augment = losses.DiffAugment(1.0, cutout=cfg.diffaug_cutout)
            parts["projected"] = losses.GANCritic(disc, augment)
        elif cfg.disc_weight > 0 and not cfg.disc_scales:
            return losses.NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
        if cfg.disc_scales:
            parts["multiscale"] = pix2pixhd.MultiscalePatchGAN(
                cfg.disc_scales, cfg.disc_channels, cfg.disc_layers
            )
        if len(parts) == 1 and "projected" in parts:
            return parts["projected"]  # its keys as before the multi-scale one existed
        return nn.ModuleDict(parts) if parts else None

    def discriminator_optimizer(self, base_lr: float) -> dict:
        return {"disc_lr": base_lr, "disc_betas": (0.0, 0.99)}  # as released

    def gan_active(self, nimg: int) -> bool:
        cfg = self.cfg
        return (cfg.disc_weight > 0 or cfg.disc_scales > 0) and nimg >= cfg.disc_start

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hinge loss of the projected (or single PatchGAN) critic plus ``patchgan_weight``
        x the multi-scale PatchGAN's least-squares loss, on real images and
        reconstructions."""
        return pix2pixhd.discriminator_terms(discriminator, images, fake, self.cfg.patchgan_weight)


def equivariant(x: torch.Tensor, scale: float, turns: int, antialias: bool) -> torch.Tensor:
    """``x`` (B, C, H, W) resized by ``scale`` (bilinear) and turned ``turns`` x 90 degrees
    (torch.rot90 over dims (-1, -2), as released)."""
    if scale != 1.0:
        x = F.interpolate(
            x,
            scale_factor=scale,
            mode="bilinear",
            align_corners=False,
            antialias=antialias and scale < 1,
        )
    return torch.rot90(x, k=turns, dims=[-1, -2]) if turns % 4 else x


VF_PROJ = "ldm_adapter.linear_proj."


# ----------------------------------------------------------------------------- registry


def resolve_arch(cfg: VFMVAEConfig) -> VFMVAEArch:
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    arch = CONFIGS[cfg.config]
    if cfg.latent_channels is not None:
        arch = replace(arch, z_channels=cfg.latent_channels)
    arch.grid_ratio()
    return arch


def check_config(cfg: VFMVAEConfig) -> None:
    """The named config exists, and the stage has a term to train."""
    resolve_arch(cfg)
    stage = stage_of(cfg)
    recon = stage.l1 + stage.ssim + (stage.perceptual if cfg.perceptual != "none" else 0)
    gan = cfg.disc_weight > 0 or cfg.disc_scales > 0
    if recon + stage.kl + stage.vf <= 0 and not gan and not stage.multiscale:
        raise ValueError(
            f"tokenizer.disc_weight: stage {cfg.stage} trains only GAN terms; set it (or tokenizer.disc_scales) above 0"
        )


def latent_shape(cfg: VFMVAEConfig, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of ``resolution`` x ``resolution`` images."""
    arch = resolve_arch(cfg)
    # the first synthesis block works at 1 / 2**num_blocks of the output
    step = max(arch.downsample, 2**arch.num_blocks)
    if resolution % step:
        raise ValueError(
            f"data.resolution {resolution} is not divisible by {step} (tokenizer {cfg.config})"
        )
    side = resolution // arch.downsample
    return (arch.z_channels, side, side)


PUBLISHED_HINT = (
    "the published VFM-VAE is in the Hugging Face repo tiancibi/VFM-VAE (a training "
    "checkpoint with G, D and G_ema; G_ema is loaded); download it and set "
    "tokenizer.weights=<path>, with tokenizer.vfm=hf:google/siglip2-large-patch16-512"
)
# what only training uses: the perceptual network and the weights training started from
TRAINING_ONLY = {
    "perceptual": "none",
    "weights": None,
    "vf_weight": 0.0,
    "disc_weight": 0.0,
    "disc_scales": 0,
}
# entries of the released checkpoint that are not ours: the frozen VFM, and (in the
# training file's other entries) the discriminator
DROPPED = ("vfm_encoder.",)


def build_vfmvae(cfg: VFMVAEConfig, resolution: int) -> VFMVAE:
    arch = resolve_arch(cfg)
    latent_shape(cfg, resolution)  # resolution fits
    model = VFMVAE(arch, cfg, perceptual=build_perceptual(cfg))
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


def build_perceptual(cfg: VFMVAEConfig) -> nn.Module | None:
    """LPIPS, a VFM feature distance (``perceptual_vfm`` or ``vfm``) or None."""
    if cfg.perceptual == "none" or stage_of(cfg).perceptual <= 0:
        return None
    if cfg.perceptual == "lpips":
        return losses.LPIPSLoss("vgg")
    vfm = load_vfm(cfg.perceptual_vfm or cfg.vfm)
    vfm.layers = sorted({round(vfm.depth * (k + 1) / 4) - 1 for k in range(4)})
    return losses.VFMFeatureDistance(vfm)


def read_published(path: str) -> dict[str, torch.Tensor]:
    """The generator weights of a released file (its ``G_ema`` entry; a plain state_dict
    or our safetensors as they are), without the frozen VFM's entries."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.weights: {file} does not exist ({PUBLISHED_HINT})")
    sd = read_state_dict(file, entries=("G_ema", "state_dict", "model"))
    return {k: v for k, v in sd.items() if not k.startswith(DROPPED)}


def load_published(model: VFMVAE, path: str) -> None:
    """Load the released ``G_ema`` (or our checkpoint) strictly: every adapter, mapping and
    synthesis key must be present with its shape; the VF projection (training only) may
    be absent, and is dropped when this model has none."""
    sd = read_published(path)
    ours = model.state_dict()
    if model.ldm_adapter.linear_proj is None:
        sd = {k: v for k, v in sd.items() if not k.startswith(VF_PROJ)}
    if differs := mismatch(ours, sd, optional=VF_PROJ):
        raise ValueError(
            f"tokenizer.weights {path}: not a VFM-VAE {model.cfg.config} checkpoint ({differs})"
        )
    model.load_state_dict(sd, strict=False)


def check_training_files(cfg: VFMVAEConfig) -> None:
    """The frozen VFM (and a VFM perceptual network) is there."""
    check_vfm_spec("tokenizer.vfm", cfg.vfm, cfg.vfm_weights)
    check_loss_vfms(cfg)


TOKENIZERS.register(
    "vfmvae",
    config=VFMVAEConfig,
    latent_shape=latent_shape,
    normalization="channel",
    check=check_config,
    check_training=check_training_files,
    inference=TRAINING_ONLY,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_vfmvae)
