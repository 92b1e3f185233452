"""RAE: a representation autoencoder, a frozen foundation encoder with a trained ViT decoder.

Zheng et al. 2025, "Diffusion Transformers with Representation Autoencoders"
(bytetriper/RAE). The encoder is a frozen VFM (DINOv2-B with registers, SigLIP2-B or MAE-B):
[0, 1] images, bicubic resize without antialias to the encoder's input size, its mean/std,
the last hidden state after the final LayerNorm with its affine removed, class and register
tokens dropped -> a (C, h, w) grid. The decoder is RAE's ``GeneralDecoder``: ViT-MAE layers
(pre-norm, exact GELU) on the linearly embedded tokens, a trainable class token, a fixed
sin-cos position embedding, a final LayerNorm and a per-patch linear prediction; unpatchified
and un-normalised with the encoder's mean/std. Parameter names follow the official decoder
files (``decoder_embed``, ``decoder_layers.{i}.attention.attention.query``, ...), so the
published ``model.pt`` loads strictly.

Training (the paper and ``train_stage1.py``): the decoder sees z + sigma * eps, sigma ~ U(0, tau)
per image (absolute, on the standardised features; none at inference), with L1 + LPIPS and a
hinge GAN on a frozen-ViT-feature discriminator (DiffAugment, optional LeCAM), its generator
term weighted adaptively at ``decoder_pred`` and clamped. The discriminator's steps and the
generator's GAN term start at separate image counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.feature_gan import FeatureGAN
from latentforge.tokenizers.rae_decoder import GeneralDecoder
from latentforge.tokenizers.vfm import (
    VFM,
    check_loss_vfms,
    check_vfm_spec,
    drop_final_norm_affine,
    load_vfm,
    prepare_exact,
)

HUB_REPO = "nyu-visionx/RAE-collections"


@dataclass(frozen=True)
class RAEArch:
    """A frozen encoder and the decoder trained on its features."""

    encoder: str  # VFM spec (tokenizers/vfm.py)
    encoder_dim: int  # its width = latent channels
    encoder_patch: int  # its patch size; input size = latent side * encoder_patch
    hidden: int  # decoder width
    depth: int
    heads: int
    mlp: int
    patch: int  # decoder patch size = the tokenizer's downsampling factor
    layer_norm_eps: float = 1e-12
    published: str = ""  # the decoder's file in HUB_REPO
    stats: str = ""  # the latent statistics' file in HUB_REPO


_XL = dict(hidden=1152, depth=28, heads=16, mlp=4096, patch=16)  # ViT-XL decoder
_DINO = dict(encoder="hf:facebook/dinov2-with-registers-base", encoder_dim=768, encoder_patch=14)
CONFIGS: dict[str, RAEArch] = {
    # 256 px: 224 px encoder input -> 768 x 16 x 16
    "dinov2-b": RAEArch(
        **_DINO,
        **_XL,
        published="decoders/dinov2/wReg_base/ViTXL_n08/model.pt",
        stats="stats/dinov2/wReg_base/imagenet1k/stat.pt",
    ),
    # 512 px: 448 px encoder input -> 768 x 32 x 32
    "dinov2-b-512": RAEArch(
        **_DINO,
        **_XL,
        published="decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt",
        stats="stats/dinov2/wReg_base/imagenet1k_512/stat.pt",
    ),
    "siglip2-b": RAEArch(
        encoder="hf:google/siglip2-base-patch16-256",
        encoder_dim=768,
        encoder_patch=16,
        **_XL,
        published="decoders/siglip2/base_p16_i256/ViTXL_n08/model.pt",
        stats="stats/siglip2/base_p16_i256/ImageNet1k/stat.pt",
    ),
    "mae-b": RAEArch(
        encoder="hf:facebook/vit-mae-base",
        encoder_dim=768,
        encoder_patch=16,
        **_XL,
        published="decoders/mae/base_p16/ViTXL_n08/model.pt",
        stats="stats/mae/base_p16/ImageNet1k/stat.pt",
    ),
    # the embedded default: 32x32 shapes -> the shapes ViT's 128 x 8 x 8 features
    "shapes": RAEArch(
        encoder="local:shapes-vit",
        encoder_dim=128,
        encoder_patch=4,
        hidden=128,
        depth=4,
        heads=4,
        mlp=512,
        patch=4,
    ),
    "tiny": RAEArch(
        encoder="local:shapes-vit",
        encoder_dim=128,
        encoder_patch=4,
        hidden=32,
        depth=2,
        heads=2,
        mlp=64,
        patch=4,
    ),
}


@dataclass
class RAEConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for RAE."""

    name: str = "rae"
    config: str = "shapes"  # key of CONFIGS
    encoder: str | None = None  # override the named config's encoder (VFM spec)
    latent_channels: int | None = None  # the overriding encoder's width
    noise_tau: float = 0.8  # training noise sigma ~ U(0, noise_tau) per image; 0 disables
    # perceptual term: LPIPS (lpips package, torchvision backbone from the hub cache) or,
    # offline, a feature distance on a frozen VFM (logged as perceptual_vfm; not LPIPS)
    perceptual: Literal["lpips", "vfm", "none"] = "lpips"
    perceptual_weight: float = 1.0
    perceptual_net: Literal["vgg", "alex"] = "vgg"  # lpips backbone
    perceptual_vfm: str = "local:shapes-vit"
    # GAN: hinge loss on a frozen-ViT-feature discriminator; disc_weight 0 = no GAN
    disc_weight: float = 0.75  # x the adaptive weight on the generator term
    disc_start: float = 0.0  # images seen before the discriminator's steps start
    gan_start: float = 0.0  # images seen before the generator's GAN term starts
    disc_max_weight: float = 1.0e4  # clamp of the adaptive weight
    disc_vfm: str = "local:shapes-vit"  # its frozen ViT (RAE: DINO ViT-S/8)
    disc_vfm_weights: str | None = None  # explicit weights file for a timm: disc_vfm
    disc_kernel: int = 9  # kernel of the heads' token convolution
    disc_lr: float | None = None  # None: train.tokenizer_lr
    disc_betas: list[float] | None = None  # None: (0.9, 0.95) as RAE
    diffaug_prob: float = 1.0  # DiffAugment: probability of each transform
    diffaug_cutout: float = 0.0  # cutout side as a fraction of the image; 0 disables
    lecam_weight: float = 0.0  # LeCAM regulariser (Tseng et al. 2021); RAE uses none
    lecam_decay: float = 0.999


# ----------------------------------------------------------------------------- tokenizer


class RAE(FeatureGAN, Tokenizer):
    """Frozen VFM encoder + trained ViT decoder; latents are the VFM's patch features."""

    def __init__(
        self,
        arch: RAEArch,
        cfg: RAEConfig,
        resolution: int,
        encoder: VFM,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.downsample = arch.patch
        self.latent_channels = encoder.embed_dim
        self.grid = resolution // arch.patch
        self.input_size = self.grid * arch.encoder_patch
        self.decoder = GeneralDecoder(arch, self.grid, encoder.embed_dim)
        # frozen networks live outside the module tree: the weights are the decoder's only
        self._frozen = {"encoder": drop_final_norm_affine(encoder), "perceptual": perceptual}

    @property
    def encoder(self) -> VFM:
        return self._frozen["encoder"]

    @property
    def perceptual(self) -> nn.Module | None:
        return self._frozen["perceptual"]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns the encoder's standardised
        last-layer features (B, C, H/f, W/f) (``sample`` is ignored: RAE is deterministic)."""
        x = prepare_exact(self.encoder, images, self.input_size, "bicubic", antialias=False)
        return self.encoder.encode(x).patch[-1].float()  # (B, C, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, C, h, w). Returns images (B, 3, h*f, w*f), roughly [-1, 1]."""
        if latents.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"latent grid {tuple(latents.shape[-2:])}, expected {self.grid}")
        tokens = rearrange(latents, "b c h w -> b (h w) c")  # (B, N, C)
        x = self.decoder.unpatchify(self.decoder(tokens))  # (B, 3, H, W), encoder-normalised
        x = x * self.encoder.std + self.encoder.mean  # [0, 1]
        return x * 2 - 1

    def noise_augment(self, z: torch.Tensor) -> torch.Tensor:
        """z + sigma * eps with sigma ~ U(0, noise_tau) per image (RAE's noise augmentation;
        absolute, on the standardised features)."""
        sigma = self.cfg.noise_tau * torch.rand(
            (z.shape[0],) + (1,) * (z.dim() - 1), device=z.device
        )
        return z + sigma * torch.randn_like(z)

    def loss(
        self, images: torch.Tensor, nimg: int, discriminator: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """L1 (+ perceptual) (+ adaptive GAN generator term from ``gan_start`` images).
        ``fake`` (from ``disc_start`` images on) is the detached reconstruction for the
        discriminator's step; the rest is logged."""
        cfg = self.cfg
        z = self.encode(images)
        x_hat = self.decode(self.noise_augment(z) if self.training and cfg.noise_tau > 0 else z)
        # RAE's L1 is on [0, 1] images: half of ours on [-1, 1]
        recon = 0.5 * losses.reconstruction_loss(images, x_hat, "l1")
        out = {"recon": recon.detach()}
        nll = recon
        if self.perceptual is not None:
            p = self.perceptual(images, x_hat)
            nll = nll + cfg.perceptual_weight * p
            out[f"perceptual_{cfg.perceptual}"] = p.detach()
        total = nll
        if discriminator is not None and nimg >= cfg.gan_start:
            g = losses.hinge_g_loss(discriminator(x_hat))
            weight = torch.as_tensor(cfg.disc_weight)
            if self.training and torch.is_grad_enabled():  # Esser et al. 2021, Eq. 7
                last = self.decoder.decoder_pred.weight
                weight = weight * losses.adaptive_weight(nll, g, last, cfg.disc_max_weight)
            total = total + weight * g
            out.update(g_loss=g.detach(), g_weight_eff=weight.detach())
        if discriminator is not None and self.gan_active(nimg):
            out["fake"] = x_hat.detach()
        out["loss"] = total
        return out

    def gan_active(self, nimg: int) -> bool:
        """Whether the discriminator trains after ``nimg`` images (its generator term starts
        at ``gan_start``)."""
        return self.cfg.disc_weight > 0 and nimg >= self.cfg.disc_start

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hinge loss (+ LeCAM) on augmented real ``images`` and reconstructions ``fake``,
        clamped and rounded to 8 bits as RAE feeds them."""
        fake = torch.round((fake.detach().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
        real_logits = discriminator(images.detach())
        fake_logits = discriminator(fake)
        d = losses.hinge_d_loss(real_logits, fake_logits)
        out = {"d_loss": d.detach()}
        total = d
        if self.cfg.lecam_weight > 0:
            reg = discriminator.lecam(real_logits, fake_logits)
            total = total + self.cfg.lecam_weight * reg
            out["lecam"] = reg.detach()
        out.update(
            loss=total,
            logits_real=real_logits.detach().mean(),
            logits_fake=fake_logits.detach().mean(),
        )
        return out


# ----------------------------------------------------------------------------- registry


def resolve_arch(cfg: RAEConfig) -> RAEArch:
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    arch = CONFIGS[cfg.config]
    if cfg.encoder:
        arch = replace(arch, encoder=cfg.encoder)
    if cfg.latent_channels is not None:
        arch = replace(arch, encoder_dim=cfg.latent_channels)
    return arch


def latent_shape(cfg: RAEConfig, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of ``resolution`` x ``resolution`` images: the encoder's width
    on a grid of resolution / decoder patch."""
    arch = resolve_arch(cfg)
    if resolution % arch.patch:
        raise ValueError(
            f"data.resolution {resolution} is not divisible by the decoder's patch {arch.patch}"
        )
    side = resolution // arch.patch
    return (arch.encoder_dim, side, side)


def build_perceptual(cfg: RAEConfig) -> nn.Module | None:
    """LPIPS, the VFM feature distance (four layers spread over the VFM's depth) or None."""
    if cfg.perceptual == "none" or cfg.perceptual_weight <= 0:
        return None
    if cfg.perceptual == "lpips":
        return losses.LPIPSLoss(cfg.perceptual_net)
    vfm = load_vfm(cfg.perceptual_vfm)
    vfm.layers = sorted({round(vfm.depth * (k + 1) / 4) - 1 for k in range(4)})
    return losses.VFMFeatureDistance(vfm)


def build_rae(cfg: RAEConfig, resolution: int, encoder: VFM | None = None) -> RAE:
    """The configured RAE; ``encoder`` replaces loading the named config's VFM (tests)."""
    arch = resolve_arch(cfg)
    shape = latent_shape(cfg, resolution)
    encoder = encoder or load_vfm(arch.encoder, resize=shape[1] * arch.encoder_patch)
    if encoder.embed_dim != shape[0]:
        raise ValueError(
            f"tokenizer.encoder {arch.encoder!r} is {encoder.embed_dim} wide; the config "
            f"expects {shape[0]} (set tokenizer.latent_channels)"
        )
    model = RAE(arch, cfg, resolution, encoder, build_perceptual(cfg))
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


def published_hint(name: str) -> str:
    arch = CONFIGS.get(name)
    where = f"{HUB_REPO}/{arch.published}" if arch and arch.published else f"{HUB_REPO}/decoders/"
    stats = f" and the latent statistics {HUB_REPO}/{arch.stats}" if arch and arch.stats else ""
    return (
        f"the published RAE decoder is {where}{stats}; download them and set "
        "tokenizer.weights=<model.pt> (and generator.latent_stats=<stat.pt>)"
    )


def load_published(model: RAE, path: str) -> None:
    """Load a published decoder (a bare state_dict ``model.pt``, or our safetensors) strictly:
    every key and shape must match; else the error names the first mismatched keys."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer.weights: {file} does not exist ({published_hint(model.cfg.config)})"
        )
    sd = read_state_dict(file)
    if any(k.startswith("decoder.") for k in sd):  # our checkpoints' prefix
        sd = {k.removeprefix("decoder."): v for k, v in sd.items()}
    if differs := mismatch(model.decoder.state_dict(), sd):
        raise ValueError(
            f"tokenizer.weights {file}: not an RAE {model.cfg.config} decoder at "
            f"{model.grid * model.downsample} px ({differs})"
        )
    model.decoder.load_state_dict(sd, strict=True)


def check_training_files(cfg: RAEConfig) -> None:
    """The frozen networks that training needs are there."""
    check_vfm_spec("tokenizer.encoder", resolve_arch(cfg).encoder, None)
    check_loss_vfms(cfg)


# what only training uses: the loss networks and the weights training started from
TRAINING_ONLY = {"perceptual": "none", "disc_weight": 0.0, "weights": None}


TOKENIZERS.register(
    "rae",
    config=RAEConfig,
    latent_shape=latent_shape,
    normalization="element",
    check=resolve_arch,
    check_training=check_training_files,
    inference=TRAINING_ONLY,
    load_published=load_published,
    weights_hint=published_hint("dinov2-b"),
)(build_rae)
