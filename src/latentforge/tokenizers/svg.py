"""SVG: latent diffusion without a VAE, on frozen VFM features plus a small learned residual.

Shi et al. 2025, "Latent Diffusion Model without Variational Autoencoder" (shiml20/SVG). The
latent of an image is the frozen DINOv3 ViT-S/16+ patch features (``x_norm_patchtokens``,
384 x 16 x 16 at 256 px) concatenated with the output of a small residual ViT (8 channels)
that adds the detail DINO drops: 392 x 16 x 16, not variational. The LDM convolutional
decoder (:mod:`latentforge.tokenizers.ldm_blocks`, keys ``decoder.*`` as VA-VAE's) maps it
back to pixels. In training, each image's residual is replaced by a learnable
``mask_token`` with probability ``mask_prob`` (0.1), so that the decoder also works from the
DINO features alone.

The residual is rescaled to the DINO features' scalar statistics ("match distribution"):
``(r - mean_r) / std_r * std_d + mean_d``, where mean / std are the averages over channels of
per-channel statistics. The published code takes them from the current batch, in training
and at inference, so an image's latent depends on the other images of its batch
(``match: batch``, kept for parity with the published weights). The default,
``match: running``, does as BatchNorm: training uses the batch's statistics and keeps a
moving average of them, and evaluation uses that average, so that a latent depends on its
image alone; published weights carry no average: calibrate one with
:meth:`SVG.calibrate_match` (and give it as ``match_stats``) or use ``match: batch``.

Parameter names follow the official checkpoints (``extra_vit.*``: torchvision's
VisionTransformer, whose modules are used; ``mask_token``; ``decoder.*``), so that the
released Lightning ``.ckpt`` (HF ``howlin/SVG``) loads strictly once its training-only
entries are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.ldm_blocks import AEArch, ConvDecoder, cpu_channels_last
from latentforge.tokenizers.vavae import VAVAE
from latentforge.tokenizers.vfm import check_loss_vfms, check_vfm_spec, load_vfm


@dataclass(frozen=True)
class SVGArch:
    """Architecture of one named SVG config."""

    vfm: str  # the frozen VFM's spec (tokenizer.vfm overrides it)
    vfm_dim: int  # its feature width
    patch: int  # its patch size = the latent's stride
    image_size: int  # input side of the VFM and of the residual ViT
    residual_dim: int  # residual channels (0: the VFM features alone)
    vit_layers: int
    vit_heads: int
    vit_width: int
    vit_mlp: int
    vit_dropout: float
    decoder: AEArch  # z_channels = vfm_dim + residual_dim

    @property
    def latent_channels(self) -> int:
        return self.vfm_dim + self.residual_dim


_SMALL = dict(num_res_blocks=1, attn_levels=(), mid_attn=False)
CONFIGS: dict[str, SVGArch] = {
    # the published autoencoder: DINOv3 ViT-S/16+ at 256 px, 6-layer residual ViT, f16 decoder
    "dinov3-s16p": SVGArch(
        vfm="timm:vit_small_plus_patch16_dinov3",
        vfm_dim=384,
        patch=16,
        image_size=256,
        residual_dim=8,
        vit_layers=6,
        vit_heads=8,
        vit_width=384,
        vit_mlp=1536,
        vit_dropout=0.1,
        decoder=AEArch(
            ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=392
        ),
    ),
    # the embedded default: 32x32 shapes, the shapes ViT (128 x 8x8) + an 8-channel residual
    "shapes": SVGArch(
        vfm="local:shapes-vit",
        vfm_dim=128,
        patch=4,
        image_size=32,
        residual_dim=8,
        vit_layers=2,
        vit_heads=4,
        vit_width=64,
        vit_mlp=256,
        vit_dropout=0.0,
        decoder=AEArch(ch=16, ch_mult=(1, 2, 4), groups=8, z_channels=136, **_SMALL),
    ),
    "tiny": SVGArch(
        vfm="local:shapes-vit",
        vfm_dim=128,
        patch=4,
        image_size=32,
        residual_dim=4,
        vit_layers=1,
        vit_heads=2,
        vit_width=32,
        vit_mlp=64,
        vit_dropout=0.0,
        decoder=AEArch(ch=8, ch_mult=(1, 2, 2), groups=4, z_channels=132, **_SMALL),
    ),
}


@dataclass
class SVGConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for SVG."""

    name: str = "svg"
    config: str = "shapes"  # key of CONFIGS
    vfm: str | None = None  # the frozen encoder (None: the named config's)
    vfm_weights: str | None = None  # explicit weights file for timm: / hub: VFMs
    residual_channels: int | None = None  # override the named config's (0: VFM features only)
    mask_prob: float = 0.1  # per image, training replaces the residual by mask_token
    # residual rescaling to the VFM features' statistics: "running" (batch-independent at
    # inference), "batch" (the published behaviour: the current batch's, always), "none"
    match: Literal["running", "batch", "none"] = "running"
    match_momentum: float = 0.01  # running: weight of each training batch in the average
    # running: [VFM mean, VFM std, residual mean, residual std] for weights that carry none
    # (published ones), e.g. SVG.calibrate_match over some training images, then match_stats
    match_stats: list[float] | None = None
    recon: Literal["l1", "l2"] = "l1"
    perceptual: Literal["none", "vfm", "lpips"] = "none"  # published: lpips, weight 1
    perceptual_weight: float = 1.0
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    perceptual_vfm: str | None = None  # perceptual=vfm: its VFM (None: the encoder's)
    # PatchGAN with hinge loss (published: weight 0.5 x the adaptive weight, from step 5001)
    disc_weight: float = 0.0  # 0: no discriminator
    disc_start: float = 0.0  # images seen before the GAN terms start
    disc_adaptive: bool = True
    disc_max_weight: float = 1.0e4  # in LDM's per-image-sum units, as VA-VAE's
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # None: train.tokenizer_lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    disc_weights: str | None = None  # discriminator to start from (see VA-VAE's)
    # published weights: the official Lightning .ckpt (its state_dict) or safetensors
    weights: str | None = None


def residual_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """torchvision ViT on normalised images (B, 3, S, S) -> head outputs of the patch tokens
    (B, N, r), the class token dropped."""
    t = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
    cls = vit.class_token.expand(t.shape[0], -1, -1)  # (B, 1, D)
    t = vit.encoder(torch.cat([cls, t], dim=1))[:, 1:]  # (B, N, D)
    return vit.heads(t)  # (B, N, r)


def scalar_stats(x: torch.Tensor) -> torch.Tensor:
    """[mean, std] of ``x`` (B, C, h, w): the channel averages of per-channel statistics over
    the batch and positions (unbiased std), detached (2,)."""
    x = x.detach()
    mean = x.mean(dim=(0, 2, 3)).mean()
    std = x.std(dim=(0, 2, 3)).mean()
    return torch.stack([mean, std])


class SVG(Tokenizer):
    """Frozen VFM features + a learned residual -> LDM decoder."""

    def __init__(
        self,
        arch: SVGArch,
        cfg: SVGConfig,
        vfm: nn.Module,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.arch = arch
        self.downsample = arch.patch
        self.latent_channels = arch.latent_channels
        r = arch.residual_dim
        if r:
            self.extra_vit = VisionTransformer(
                image_size=arch.image_size,
                patch_size=arch.patch,
                num_layers=arch.vit_layers,
                num_heads=arch.vit_heads,
                hidden_dim=arch.vit_width,
                mlp_dim=arch.vit_mlp,
                dropout=arch.vit_dropout,
                attention_dropout=arch.vit_dropout,
            )
            # initialisation: torchvision's for the ViT, torch's defaults for the head, as
            # published; the mask token N(0, 0.02), stored (1, r, 1) as in the official files
            w = arch.vit_width
            self.extra_vit.heads = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, r))
            self.mask_token = nn.Parameter(torch.randn(1, r, 1) * 0.02)
        if r and cfg.match == "running":
            # running [mean, std] of the VFM features and of the residual; updates so far
            self.register_buffer("match_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
            self.register_buffer("match_count", torch.zeros((), dtype=torch.long))
        self.decoder = ConvDecoder(arch.decoder)
        # frozen networks are held outside the module tree (no state_dict entries), as in VA-VAE
        self._frozen = {"vfm": vfm, "perceptual": perceptual}

    @property
    def vfm(self) -> nn.Module:
        return self._frozen["vfm"]

    @property
    def perceptual(self) -> nn.Module | None:
        return self._frozen["perceptual"]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The VFM features (B, Cv, h, w) and the raw residual (B, r, h, w) (None without one)
        of images in [-1, 1]; the residual ViT sees the VFM's normalised input."""
        x = self.vfm.prepare(images)  # resized to the VFM's size, its mean / std
        with torch.no_grad():
            h = self.vfm.encode(x).patch[-1].float()  # (B, Cv, h, w)
        if not self.arch.residual_dim:
            return h, None
        b, _, gh, gw = h.shape
        r = residual_tokens(self.extra_vit, x).transpose(1, 2)  # (B, r, h*w)
        if self.training and self.cfg.mask_prob > 0:
            drop = (torch.rand(b, device=x.device) < self.cfg.mask_prob).float().view(b, 1, 1)
            r = r * (1 - drop) + self.mask_token.expand_as(r) * drop
        return h, r.reshape(b, -1, gh, gw)  # (B, r, h, w)

    def match(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The residual ``r`` rescaled to the scalar mean / std of the VFM features ``h``, from
        the batch (``batch``; ``running`` in training) or the running average (``running``
        in evaluation)."""
        mode = self.cfg.match
        if mode == "none":
            return r
        if mode == "batch" or self.training:
            stats = torch.cat([scalar_stats(h), scalar_stats(r)])
            if mode == "running" and self.training and torch.is_grad_enabled():
                self._update_match(stats, self.cfg.match_momentum)
        else:
            if int(self.match_count) == 0:
                raise RuntimeError(
                    "tokenizer.match=running: these weights carry no running statistics "
                    "(published weights were trained with batch statistics); calibrate them "
                    "with SVG.calibrate_match(images) and set tokenizer.match_stats, or set "
                    "tokenizer.match=batch"
                )
            stats = self.match_stats
        mean_h, std_h, mean_r, std_r = stats.unbind()
        return (r - mean_r) / (std_r + 1e-6) * std_h + mean_h

    def _update_match(self, stats: torch.Tensor, momentum: float) -> None:
        w = 1.0 if int(self.match_count) == 0 else momentum
        self.match_stats.lerp_(stats.to(self.match_stats), w)
        self.match_count += 1

    @torch.no_grad()
    def calibrate_match(self, images: torch.Tensor) -> None:
        """Fold the statistics of a batch of ``images`` (B, 3, H, W) in [-1, 1] into the
        running ones as a cumulative average: call it on a few batches of the data to give
        published weights batch-independent encoding (``match: running``)."""
        if not hasattr(self, "match_stats"):
            raise ValueError("calibrate_match: needs tokenizer.match=running and a residual")
        was = self.training
        self.eval()
        h, r = self.features(images)
        self.train(was)
        if r is not None:
            stats = torch.cat([scalar_stats(h), scalar_stats(r)])
            self._update_match(stats, 1.0 / (int(self.match_count) + 1))

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, S, S). Returns latents (B, Cv + r, S/p, S/p):
        the VFM features then the matched residual (deterministic; ``sample`` is ignored)."""
        h, r = self.features(images)
        return h if r is None else torch.cat([h, self.match(h, r)], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, Cv + r, h, w). Returns images (B, 3, h*p, w*p), roughly [-1, 1]."""
        return self.decoder(cpu_channels_last(latents)).contiguous()

    def loss(
        self, images: torch.Tensor, nimg: int, discriminator: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Reconstruction (+ perceptual) (+ adaptive hinge-GAN generator term with
        ``discriminator`` from ``disc_start`` images on); as :meth:`VAVAE.loss` without KL
        and VF terms (the published loss's log-variance is fixed at 0)."""
        cfg = self.cfg
        x_hat = self.decode(self.encode(images))
        recon = losses.reconstruction_loss(images, x_hat, cfg.recon)
        out = {"recon": recon.detach()}
        nll = recon
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(images, x_hat)
            nll = nll + cfg.perceptual_weight * p
            out[f"perceptual_{cfg.perceptual}"] = p.detach()
        total = nll
        if discriminator is not None and self.gan_active(nimg):
            g = losses.hinge_g_loss(discriminator(x_hat))
            weight = cfg.disc_weight
            if cfg.disc_adaptive and self.training and torch.is_grad_enabled():
                cap = cfg.disc_max_weight / images[0].numel()  # LDM sums nll per image
                last = self.decoder.conv_out.weight  # Esser et al. 2021, Eq. 7
                weight = weight * losses.adaptive_weight(nll, g, last, cap)
            total = total + weight * g
            out.update(g_loss=g.detach(), g_weight_eff=torch.as_tensor(weight).detach())
            out["fake"] = x_hat.detach()
        out["loss"] = total
        return out

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Strict, but running match statistics are dropped when this model keeps none
        (``match`` other than ``running``)."""
        if not hasattr(self, "match_stats"):
            state = {k: v for k, v in state.items() if not k.startswith("match_")}
        self.load_state_dict(state, strict=True)

    # the PatchGAN hooks are VA-VAE's (the same config fields)
    discriminator_optimizer = VAVAE.discriminator_optimizer
    make_discriminator = VAVAE.make_discriminator
    gan_active = VAVAE.gan_active
    discriminator_loss = VAVAE.discriminator_loss


def resolve_arch(cfg: SVGConfig) -> SVGArch:
    if cfg.match_stats is not None and len(cfg.match_stats) != 4:
        raise ValueError(f"tokenizer.match_stats: 4 values, not {len(cfg.match_stats)}")
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    arch = CONFIGS[cfg.config]
    if cfg.vfm is not None:
        arch = replace(arch, vfm=cfg.vfm)
    if cfg.residual_channels is not None:
        r = cfg.residual_channels
        if r < 0:
            raise ValueError(f"tokenizer.residual_channels: {r} < 0")
        arch = replace(arch, residual_dim=r)
        arch = replace(arch, decoder=replace(arch.decoder, z_channels=arch.latent_channels))
    if arch.decoder.downsample != arch.patch:
        raise ValueError(
            f"tokenizer.config {cfg.config}: decoder factor {arch.decoder.downsample} != "
            f"VFM patch {arch.patch}"
        )
    return arch


def latent_shape(cfg: SVGConfig, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of ``resolution`` x ``resolution`` images."""
    arch = resolve_arch(cfg)
    if resolution != arch.image_size:
        raise ValueError(
            f"data.resolution {resolution}: tokenizer config {cfg.config} encodes "
            f"{arch.image_size}x{arch.image_size} images (its residual ViT's size)"
        )
    side = resolution // arch.patch
    return (arch.latent_channels, side, side)


PUBLISHED_HINT = (
    "the published SVG autoencoder is the Lightning checkpoint (.ckpt) in the Hugging Face "
    "repo howlin/SVG, with the per-channel latent statistics dinov3_sp_stats.pt of "
    "shiml20/SVG; download them and set tokenizer.weights=<path.ckpt>"
)
# what only training uses: the loss networks and the weights training started from (the
# frozen VFM is part of the encoder and stays)
TRAINING_ONLY = {"perceptual": "none", "weights": None, "disc_weights": None}
# entries of the official checkpoint that are not ours: the loss (LPIPS, discriminator), the
# frozen DINOv3 (encoder.*; ours is loaded as a VFM) and an unused LayerNorm (norm_vit.*)
DROPPED = ("loss.", "encoder.", "norm_vit.")


def build_svg(cfg: SVGConfig, resolution: int) -> SVG:
    arch = resolve_arch(cfg)
    latent_shape(cfg, resolution)  # the resolution fits
    vfm = load_vfm(arch.vfm, resize=arch.image_size, weights=cfg.vfm_weights)
    if vfm.embed_dim != arch.vfm_dim or vfm.patch_size != arch.patch:
        raise ValueError(
            f"tokenizer.vfm {arch.vfm}: width {vfm.embed_dim}, patch {vfm.patch_size}; "
            f"config {cfg.config} expects width {arch.vfm_dim}, patch {arch.patch}"
        )
    model = SVG(arch, cfg, vfm, build_perceptual(cfg, arch))
    if cfg.weights:
        load_published(model, cfg.weights)
    # given running statistics, unless the weights carry their own
    if cfg.match_stats is not None and int(getattr(model, "match_count", 1)) == 0:
        model.match_stats.copy_(torch.tensor(cfg.match_stats, dtype=torch.float32))
        model.match_count.fill_(1)
    return model


def build_perceptual(cfg: SVGConfig, arch: SVGArch) -> nn.Module | None:
    """LPIPS, or the feature distance on a VFM (four layers spread over its depth; its own
    instance, not the encoder's), or None."""
    if cfg.perceptual == "none" or cfg.perceptual_weight <= 0:
        return None
    if cfg.perceptual == "lpips":
        return losses.LPIPSLoss(cfg.perceptual_net)
    vfm = load_vfm(cfg.perceptual_vfm or arch.vfm)
    vfm.layers = sorted({round(vfm.depth * (k + 1) / 4) - 1 for k in range(4)})
    return losses.VFMFeatureDistance(vfm)


def load_published(model: SVG, path: str) -> None:
    """Load an official checkpoint strictly: its ``state_dict`` minus the training-only and
    frozen-encoder entries (``DROPPED``) must have exactly this model's keys and shapes; the
    running match statistics, which published files lack, may be absent."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.weights: {file} does not exist ({PUBLISHED_HINT})")
    sd = {k: v for k, v in read_state_dict(file).items() if not k.startswith(DROPPED)}
    if differs := mismatch(model.state_dict(), sd, optional="match_"):
        raise ValueError(
            f"tokenizer.weights {file}: not an SVG {model.cfg.config} checkpoint ({differs})"
        )
    model.load_state_dict(sd, strict=False)


def read_published_stats(path: str, channels: int) -> dict[str, list[float]]:
    """Per-channel ``mean`` / ``std`` of the published latent statistics file
    (``dinov3_sp_stats.pt``: ``dinov3_sp_mean`` / ``dinov3_sp_std`` of shape (1, 1, 392)),
    sliced to the first ``channels`` (384: the VFM features alone), as the official
    generator training does."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist ({PUBLISHED_HINT})")
    raw = torch.load(str(file), map_location="cpu", weights_only=True)
    out = {}
    for key in ("mean", "std"):
        name = next((k for k in raw if k == key or k.endswith(f"_{key}")), None)
        if name is None:
            raise KeyError(f"{file}: no {key} entry (keys: {sorted(raw)})")
        values = torch.as_tensor(raw[name], dtype=torch.float64).flatten()
        if values.numel() < channels:
            raise ValueError(f"{file}: {name} has {values.numel()} values for {channels} channels")
        out[key] = values[:channels].tolist()
    return out


def check_training_files(cfg: SVGConfig) -> None:
    """The frozen VFM (and a VFM perceptual loss's) files are there."""
    check_vfm_spec("tokenizer.vfm", resolve_arch(cfg).vfm, cfg.vfm_weights)
    check_loss_vfms(cfg)


TOKENIZERS.register(
    "svg",
    config=SVGConfig,
    latent_shape=latent_shape,
    normalization="channel",
    check=resolve_arch,
    check_training=check_training_files,
    inference=TRAINING_ONLY,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_svg)
