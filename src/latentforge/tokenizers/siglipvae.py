"""Siglip-VAE: VA-VAE whose latent adds a projection of frozen SigLIP2 features.

sigma-alpha-beta/Siglip-VAE (``vavae/ldm/models/autoencoder.py`` ``AutoencoderKL`` with
``use_vf: siglip, reverse_proj: true``; extraction in ``tokenizer/siglipvae.py``), a
variant of VA-VAE (Yao et al. 2025, "Reconstruction vs. Generation"; :mod:`.vavae`):

- the latent is ``z + linear_proj_cat(f)``: the posterior sample (here: its mean unless
  ``encode(sample=True)``; the official extraction samples) plus a 1x1 convolution of the
  frozen VFM's last-layer patch grid ``f`` (SigLIP2-so400m/16 at 256 px, 1152x16x16, fed
  the [-1, 1] image, which is SigLIP's own normalisation) to the latent channels. The
  decoder reconstructs from it and the generator models it, so encoding needs the VFM: it
  is kept by the inference build (the registry entry's ``inference`` resets do not drop it);
- the VF loss of VA-VAE between ``linear_proj(z)`` (latent -> VFM width, no bias) and ``f``
  (the unfused sample ``z``);
- a CLIP-style contrastive loss between the spatial mean of ``z`` and
  ``linear_proj_text(t)``, ``t`` the text embedding of the image's caption, with a learned
  temperature ``logit_scale`` (init log(1/0.07)), weighted adaptively at the encoder's last
  layer like the VF loss with the VF weight. It is on only when :meth:`SiglipVAE.loss` gets
  ``captions`` (and ``tokenizer.text_encoder`` is set): in the platform's training loop,
  with ``tokenizer.text_encoder`` set, each image's caption is its class's entry of
  ``tokenizer.class_captions`` (or ``class <label>``), the embedded data's class names by
  default.

The official optimiser trains the encoder, decoder, quant convolutions and ``linear_proj``
only: the fusion projection ``linear_proj_cat`` stays at its random initialisation, and so
do ``linear_proj_text`` and ``logit_scale``. ``train_fusion_proj`` / ``train_text_proj``
(default False, as published) train them. Parameter names follow the official module, so a
training checkpoint of the official code loads strictly once its ``loss.*`` (LPIPS,
discriminator) and ``foundation_model.*`` (the frozen SigLIP) entries are dropped; no
weights are published.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentforge.registry import TOKENIZERS
from latentforge.shapes import CLASS_NAMES
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses, vavae
from latentforge.tokenizers.ldm_blocks import AEArch
from latentforge.tokenizers.text import check_text_spec, load_text_encoder
from latentforge.tokenizers.vfm import check_loss_vfms, check_vfm_spec, load_vfm

CONFIGS: dict[str, AEArch] = {
    # the published model: VA-VAE f16d32 (16x16x32 latents at 256 px) with SigLIP2-so400m/16
    "f16d32-siglip2": vavae.CONFIGS["f16d32"],
    # the embedded default: 32x32 shapes -> 8x8x4 latents, the shapes ViT's 8x8 grid
    "shapes": vavae.CONFIGS["shapes-f4d4"],
    "tiny": vavae.CONFIGS["tiny"],
}
PUBLISHED_VFM = "hf:google/siglip2-so400m-patch16-256"


@dataclass
class SiglipVAEConfig(vavae.VAVAEConfig):
    """Schema of ``tokenizer:`` for Siglip-VAE (VA-VAE's fields, and the fusion and
    contrastive ones below)."""

    name: str = "siglipvae"
    config: str = "shapes"  # key of CONFIGS
    # the frozen VFM fused into the latent and aligned to (required; it also encodes, so
    # extraction needs it); published: hf:google/siglip2-so400m-patch16-256
    vfm: str | None = "local:shapes-vit"
    # As published (False), the official optimiser leaves the fusion projection
    # linear_proj_cat at its random initialisation; True trains it
    train_fusion_proj: bool = False
    # As published (False), linear_proj_text and logit_scale stay at their initialisation
    # too (the contrastive term then trains the encoder only); True trains them
    train_text_proj: bool = False
    # caption encoder of the contrastive term: hf:<repo or dir> (a SigLIP / SigLIP2 text
    # tower; published: the VFM's own, hf:google/siglip2-so400m-patch16-256, on captions of
    # every ImageNet image) or hash (offline stand-in: a fixed random vector per distinct
    # caption, e.g. the class name on shapes data). None: no contrastive term
    text_encoder: str | None = None
    # the caption of each class index in training (with text_encoder): None = the embedded
    # shapes data's class names, "class <label>" beyond them
    class_captions: list[str] | None = None
    text_dim: int | None = None  # text embedding width (None: the VFM's, as in SigLIP)
    text_max_length: int = 64  # tokens per caption (padded / truncated), as published
    contrastive_weight: float | None = None  # None: vf_weight (the official ct_weight)
    contrastive_adaptive: bool = True  # x ||grad L_rec|| / ||grad L_ct|| at the encoder


class SiglipVAE(vavae.VAVAE):
    """VA-VAE whose latent is z + a 1x1 projection of frozen VFM features."""

    def __init__(
        self,
        arch: AEArch,
        cfg: SiglipVAEConfig,
        vfm: nn.Module | None,
        perceptual: nn.Module | None = None,
        text: nn.Module | None = None,
        vfm_dim: int | None = None,
    ):
        super().__init__(arch, cfg, vfm, perceptual)
        width = vfm.embed_dim if vfm is not None else vfm_dim
        if width is None:
            raise ValueError("Siglip-VAE needs its VFM (or vfm_dim, for its shapes only)")
        z = arch.z_channels
        self._frozen["text"] = text
        self.init_heads(z, width, cfg.text_dim or width)

    def init_heads(self, z: int, width: int, text_dim: int) -> None:
        """The official heads with PyTorch's default initialisation: the VF projection
        (latent -> VFM, no bias; VA-VAE's, made here when built without the VFM), the fusion
        projection (VFM -> latent), the text projection and the temperature log(1 / 0.07)
        (CLIP's). What the official optimiser leaves out is frozen here unless
        ``train_fusion_proj`` / ``train_text_proj``."""
        if self.linear_proj is None:
            self.linear_proj = nn.Conv2d(z, width, 1, bias=False)
        self.linear_proj_cat = nn.Conv2d(width, z, 1)
        self.linear_proj_text = nn.Linear(text_dim, z)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.linear_proj_cat.requires_grad_(self.cfg.train_fusion_proj)
        self.linear_proj_text.requires_grad_(self.cfg.train_text_proj)
        self.logit_scale.requires_grad_(self.cfg.train_text_proj)

    @property
    def text(self) -> nn.Module | None:
        return self._frozen["text"]

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict:
        """With a text encoder, ``captions``: each image's class caption."""
        if self.cfg.text_encoder is None or "label" not in batch:
            return {}
        names = self.cfg.class_captions or CLASS_NAMES
        labels = batch["label"].tolist()
        return {"captions": [names[i] if i < len(names) else f"class {i}" for i in labels]}

    def vfm_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen VFM's last-layer patch grid (B, Cv, h, w) of images in [-1, 1]."""
        if self.vfm is None:
            raise RuntimeError(f"Siglip-VAE {self.cfg.config}: built without its VFM")
        return self.vfm(images).patch[-1]

    def fuse(self, z: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``z`` (B, C, h, w) + ``linear_proj_cat(feats)`` (the official ``z_add_aux``)."""
        if feats.shape[-2:] != z.shape[-2:]:
            raise ValueError(
                f"the VFM's patch grid {tuple(feats.shape[-2:])} differs from the latent grid "
                f"{tuple(z.shape[-2:])}: encode images of the configured data.resolution (or "
                "set tokenizer.vfm_resize so that the grids match)"
            )
        return z + self.linear_proj_cat(feats.to(z.dtype))

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns the fused latent (B, z, H/f, W/f):
        the posterior mean (or a sample) plus the projected VFM features."""
        return self.fuse(super().encode(images, sample), self.vfm_features(images))

    # decode (post_quant_conv + decoder) is VA-VAE's: it takes the fused latent

    def alignment_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vfm_features(images)  # fused in training whether or not VF is on

    def decoder_latent(self, z: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        return super().decoder_latent(self.fuse(z, feats), feats)

    def extra_terms(
        self,
        images: torch.Tensor,
        z: torch.Tensor,
        nll: torch.Tensor,
        out: dict,
        captions: Sequence[str] | None = None,
    ) -> torch.Tensor | float:
        """The contrastive term between the spatial mean of ``z`` and the projected text
        embeddings of ``captions`` (one per image), or 0 without captions."""
        cfg = self.cfg
        weight = cfg.vf_weight if cfg.contrastive_weight is None else cfg.contrastive_weight
        if captions is None or weight <= 0:
            return 0.0
        if self.text is None:
            raise ValueError("captions were given, but tokenizer.text_encoder is unset")
        if len(captions) != len(z):
            raise ValueError(f"{len(captions)} captions for {len(z)} images")
        text = self.linear_proj_text(self.text(captions).to(z.dtype))  # (B, C)
        ct = losses.contrastive_loss(
            z.mean(dim=(2, 3)), text, self.logit_scale.exp(), caption_groups(captions, z.device)
        )
        if cfg.contrastive_adaptive and self.training and torch.is_grad_enabled():
            last = self.encoder.conv_out.weight
            cap = vavae.VF_MAX_WEIGHT / images[0].numel()
            weight = weight * losses.adaptive_weight(nll, ct, last, cap)
        out.update(contrastive=ct.detach(), contrastive_weight_eff=torch.as_tensor(weight).detach())
        return weight * ct


def caption_groups(captions: Sequence[str], device) -> torch.Tensor:
    """Ids (B,) of the distinct captions, in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], device=device)


def resolve_arch(cfg: SiglipVAEConfig) -> AEArch:
    return vavae.resolve_arch(cfg, CONFIGS)


def latent_shape(cfg: SiglipVAEConfig, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of ``resolution`` x ``resolution`` images."""
    return vavae.latent_shape(cfg, resolution, CONFIGS)


def check_config(cfg: SiglipVAEConfig) -> None:
    """The named config exists, a VFM is set (the latent needs it) and the caption encoder's
    spec is valid."""
    resolve_arch(cfg)
    if not cfg.vfm:
        raise ValueError(
            f"tokenizer.vfm: Siglip-VAE fuses a frozen VFM into its latent; set it "
            f"(published: {PUBLISHED_VFM})"
        )
    check_text_spec("tokenizer.text_encoder", cfg.text_encoder)


def check_training_files(cfg: SiglipVAEConfig) -> None:
    """The files of the VFM (and of the VFM perceptual loss, if any) are there."""
    check_vfm_spec("tokenizer.vfm", cfg.vfm, cfg.vfm_weights)
    check_loss_vfms(cfg)


PUBLISHED_HINT = (
    "Siglip-VAE weights are not published (sigma-alpha-beta/Siglip-VAE releases code only): "
    "train one (experiments/imagenet256/siglipvae_f16d32.yaml) or pass a checkpoint of the "
    "official training code (a .ckpt with its state_dict)"
)
# what only training uses; the VFM stays (it encodes)
TRAINING_ONLY = {"perceptual": "none", "weights": None, "disc_weights": None, "text_encoder": None}


def build_siglipvae(cfg: SiglipVAEConfig, resolution: int) -> SiglipVAE:
    check_config(cfg)
    arch = resolve_arch(cfg)
    side = latent_shape(cfg, resolution)[-1]
    vfm = load_vfm(
        cfg.vfm, resize=cfg.vfm_resize, normalize=cfg.vfm_normalize, weights=cfg.vfm_weights
    )
    if vfm.grid() != (side, side):
        raise ValueError(
            f"tokenizer.vfm {cfg.vfm}: its {vfm.grid()} patch grid differs from the {side}x{side}"
            " latent grid it is fused into; set tokenizer.vfm_resize to "
            f"{side * vfm.patch_size}"
        )
    text = None
    if cfg.text_encoder:
        text = load_text_encoder(
            cfg.text_encoder, cfg.text_dim or vfm.embed_dim, cfg.text_max_length
        )
    model = SiglipVAE(arch, cfg, vfm, vavae.build_perceptual(cfg), text)
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


def load_published(model: SiglipVAE, path: str) -> None:
    """Load a checkpoint of the official training code strictly: its ``loss.*`` (LPIPS,
    discriminator, log-variance) and ``foundation_model.*`` (the frozen SigLIP, text tower
    included) entries are dropped, and every other key must be this model's, in shape."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.weights: {file} does not exist ({PUBLISHED_HINT})")
    sd = read_state_dict(file)
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "foundation_model."))}
    if differs := mismatch(model.state_dict(), sd):
        proj = model.linear_proj_cat.weight.shape  # (latent channels, VFM width, 1, 1)
        raise ValueError(
            f"tokenizer.weights {file}: not a Siglip-VAE {model.cfg.config} checkpoint "
            f"(expected latent channels {proj[0]}, VFM width {proj[1]}, the keys of "
            f"VA-VAE and linear_proj_cat, linear_proj_text, logit_scale): {differs}"
        )
    model.load_state_dict(sd, strict=True)


TOKENIZERS.register(
    "siglipvae",
    config=SiglipVAEConfig,
    latent_shape=latent_shape,
    normalization="channel",
    check=check_config,
    check_training=check_training_files,
    inference=TRAINING_ONLY,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_siglipvae)
