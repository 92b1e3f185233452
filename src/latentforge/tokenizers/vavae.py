"""VA-VAE: the LDM convolutional KL autoencoder with VF alignment to a frozen VFM.

Architecture: Rombach et al. 2022 (LDM / taming VQGAN-KL autoencoder). Alignment: Yao et
al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models" (hustvl/LightningDiT, VA-VAE). Parameter names follow the official checkpoints
(``encoder.down.{i}.block.{j}.conv1``, ``quant_conv``, ``post_quant_conv``, ...), so that
``vavae-imagenet256-f16d32-dinov2.pt`` can load strictly. Attention sits at level indices
(not pixel sizes), so one config works at any resolution divisible by the downsampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.ldm_blocks import AEArch, ConvDecoder, ConvEncoder, cpu_channels_last
from latentforge.tokenizers.vfm import check_loss_vfms, check_vfm_spec, load_vfm

# VA-VAE's clamp of the adaptive VF weight, in LDM's per-image-sum units (see disc_max_weight)
VF_MAX_WEIGHT = 1.0e8


_F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,))
CONFIGS: dict[str, AEArch] = {
    "f16d32": AEArch(**_F16, z_channels=32),  # the published VA-VAE
    "f16d16": AEArch(**_F16, z_channels=16),
    "f16d64": AEArch(**_F16, z_channels=64),
    "f8d4": AEArch(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_levels=(), z_channels=4),
    # the embedded default: 32x32 shapes -> 8x8x4 latents (the shapes ViT's 8x8 grid),
    # sized for minutes of CPU training; and an f8 variant for 64x64 shapes
    "shapes-f4d4": AEArch(
        ch=16,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attn_levels=(),
        z_channels=4,
        groups=8,
        mid_attn=False,
    ),
    "shapes-f8d8": AEArch(
        ch=16,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        attn_levels=(),
        z_channels=8,
        groups=8,
        mid_attn=False,
    ),
    "tiny": AEArch(
        ch=8,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_levels=(),
        z_channels=4,
        groups=4,
        mid_attn=False,
    ),
}


@dataclass
class VAVAEConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for VA-VAE."""

    name: str = "vavae"
    config: str = "shapes-f4d4"  # key of CONFIGS
    latent_channels: int | None = None  # override the named config's z channels
    vfm: str | None = "local:shapes-vit"  # None: no VF alignment (a plain LDM KL-VAE)
    vfm_weights: str | None = None  # explicit weights file for timm: VFMs
    vfm_normalize: bool = True  # False reproduces VA-VAE's un-normalised DINOv2 input
    vfm_resize: int | None = None  # VFM input size (None: its own; VA-VAE fed DINOv2 224)
    vf_weight: float = 0.1
    vf_margin_cos: float = 0.5
    vf_margin_dist: float = 0.25
    vf_adaptive: bool = True
    kl_weight: float = 1e-6
    recon: Literal["l1", "l2"] = "l1"
    # perceptual term added to the reconstruction loss: LPIPS (lpips package, torchvision
    # backbone weights from the torch hub cache) or, offline, a feature-matching distance on
    # a frozen VFM's patch features (logged as perceptual_vfm; not LPIPS)
    perceptual: Literal["none", "vfm", "lpips"] = "none"
    perceptual_weight: float = 1.0
    perceptual_net: Literal["vgg", "alex"] = "vgg"  # lpips backbone
    perceptual_vfm: str | None = None  # perceptual=vfm: VFM spec (None: tokenizer.vfm)
    # PatchGAN with hinge loss; disc_weight 0 = no discriminator (GAN off)
    disc_weight: float = 0.0  # x the adaptive weight (disc_adaptive) on the generator term
    disc_start: float = 0.0  # images seen before the GAN terms and discriminator steps start
    disc_adaptive: bool = True
    # clamp of the adaptive generator weight, in LDM's units (its reconstruction loss summed
    # per image; ours is a per-pixel mean, so the clamp applied is this / (3 H W))
    disc_max_weight: float = 1.0e4
    disc_layers: int = 3  # stride-2 convolutions (3: 70x70 patches)
    disc_channels: int = 64
    disc_lr: float | None = None  # None: train.tokenizer_lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # its Adam betas
    # discriminator to start from: our checkpoint's discriminator.safetensors, or an official
    # LDM / VA-VAE training checkpoint (.pt/.ckpt; its loss.discriminator.* entries)
    disc_weights: str | None = None
    sample_posterior: bool = True  # training decodes z ~ q(z|x); encode() returns the mean
    # noise-augmented decoding (RAE, Zheng et al. 2025): in training the decoder sees
    # z + sigma * eps, sigma ~ |N(0, decoder_noise^2)| per image, in units of the batch's
    # per-channel latent std; it then maps a neighbourhood of each latent to the clean
    # image and tolerates a generator's small latent errors. 0 disables
    decoder_noise: float = 0.0
    # published weights to start from (or, with train.tokenizer_images=0, to use as they
    # are): an official VA-VAE / LDM checkpoint (.pt/.ckpt with a state_dict) or safetensors
    weights: str | None = None


class VAVAE(Tokenizer):
    """LDM KL autoencoder; with a VFM, trained with the VF alignment loss."""

    def __init__(
        self,
        arch: AEArch,
        cfg: VAVAEConfig,
        vfm: nn.Module | None = None,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.downsample = arch.downsample
        self.latent_channels = arch.z_channels
        z = arch.z_channels
        self.encoder = ConvEncoder(arch)
        self.decoder = ConvDecoder(arch)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        # frozen loss networks (the VFM, the perceptual network) are held outside the module
        # tree: not in state_dict / parameters, so the weights keep the official keys
        self._frozen = {"vfm": vfm, "perceptual": perceptual}
        self.linear_proj = nn.Conv2d(z, vfm.embed_dim, 1, bias=False) if vfm is not None else None

    @property
    def vfm(self) -> nn.Module | None:
        return self._frozen["vfm"]

    @property
    def perceptual(self) -> nn.Module | None:
        return self._frozen["perceptual"]

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(cpu_channels_last(images))).contiguous()
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns the posterior mean (or a sample)
        (B, z, H/f, W/f)."""
        mean, logvar = self.moments(images)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, z, h, w). Returns images (B, 3, h*f, w*f), roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(cpu_channels_last(latents))).contiguous()

    def loss(
        self,
        images: torch.Tensor,
        nimg: int,
        discriminator: nn.Module | None = None,
        **conditioning,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction (+ perceptual) + KL (+ adaptive VF) (+ a subclass's
        :meth:`extra_terms`, given ``conditioning``) (+ adaptive GAN generator term, with
        ``discriminator`` from ``disc_start`` images on). ``loss`` back-propagates; ``fake``
        (in the GAN phase) is the detached reconstruction for the discriminator's step; the
        rest is logged."""
        cfg = self.cfg
        mean, logvar = self.moments(images)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if cfg.sample_posterior else mean
        feats = self.alignment_features(images)
        x_hat = self.decode(self.decoder_latent(z, feats))
        recon = losses.reconstruction_loss(images, x_hat, cfg.recon)
        out = {"recon": recon.detach()}
        nll = recon  # LDM's reconstruction term (the adaptive weights' reference)
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(images, x_hat)
            nll = nll + cfg.perceptual_weight * p
            out[f"perceptual_{cfg.perceptual}"] = p.detach()
        pixels = images[0].numel()  # LDM sums nll per image; ours is its per-pixel mean
        kl = losses.kl_loss(mean, logvar, pixels)
        total = nll + cfg.kl_weight * kl
        out["kl"] = kl.detach()
        adaptive = self.training and torch.is_grad_enabled()
        if feats is not None and cfg.vf_weight > 0:
            vf = losses.vf_loss(self.linear_proj(z), feats, cfg.vf_margin_cos, cfg.vf_margin_dist)
            weight = cfg.vf_weight
            if cfg.vf_adaptive and adaptive:
                last = self.encoder.conv_out.weight
                weight = weight * losses.adaptive_weight(nll, vf, last, VF_MAX_WEIGHT / pixels)
            total = total + weight * vf
            out.update(vf=vf.detach(), vf_weight_eff=torch.as_tensor(weight).detach())
        total = total + self.extra_terms(images, z, nll, out, **conditioning)
        if discriminator is not None and self.gan_active(nimg):
            g = losses.hinge_g_loss(discriminator(x_hat))
            weight = cfg.disc_weight
            if cfg.disc_adaptive and adaptive:  # Esser et al. 2021, Eq. 7
                last = self.decoder.conv_out.weight
                cap = cfg.disc_max_weight / pixels
                weight = weight * losses.adaptive_weight(nll, g, last, cap)
            total = total + weight * g
            out.update(g_loss=g.detach(), g_weight_eff=torch.as_tensor(weight).detach())
            out["fake"] = x_hat.detach()
        out["loss"] = total
        return out

    def alignment_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """The frozen VFM's last patch grid (B, C, h, w) that the VF loss aligns to, or None
        when the VF loss is off."""
        if self.vfm is None or self.cfg.vf_weight <= 0:
            return None
        return self.vfm(images).patch[-1]

    def decoder_latent(self, z: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """What the decoder reconstructs from in training: ``z`` (noise-augmented with
        ``decoder_noise``); ``feats`` are :meth:`alignment_features`' (unused here)."""
        return self.noise_augment(z) if self.cfg.decoder_noise > 0 else z

    def extra_terms(
        self, images: torch.Tensor, z: torch.Tensor, nll: torch.Tensor, out: dict
    ) -> torch.Tensor | float:
        """A subclass's further weighted loss terms (logging its parts in ``out``), given the
        posterior sample ``z`` and the reconstruction term ``nll`` (the adaptive weights'
        reference); VA-VAE has none."""
        return 0.0

    def noise_augment(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` plus Gaussian noise of a per-image scale ~ |N(0, decoder_noise^2)| times the
        batch's per-channel std (relative, so that the encoder cannot outgrow it)."""
        dims = (0,) + tuple(range(2, z.dim()))
        std = z.detach().std(dim=dims, keepdim=True)
        sigma = torch.randn((z.shape[0],) + (1,) * (z.dim() - 1), device=z.device).abs()
        return z + self.cfg.decoder_noise * sigma * std * torch.randn_like(z)

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Strict, but for the VF loss's projection (``linear_proj``), which a model built
        for inference (no VFM) does not have."""
        if self.linear_proj is None:
            state = {k: v for k, v in state.items() if not k.startswith("linear_proj.")}
        self.load_state_dict(state, strict=True)

    def discriminator_optimizer(self, base_lr: float) -> dict:
        return {"disc_lr": self.cfg.disc_lr or base_lr, "disc_betas": tuple(self.cfg.disc_betas)}

    def make_discriminator(self) -> nn.Module | None:
        """The PatchGAN of this config (``disc_weights`` loaded), or None when the GAN is off."""
        cfg = self.cfg
        if cfg.disc_weight <= 0:
            return None
        disc = losses.NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
        if cfg.disc_weights:
            load_discriminator(disc, cfg.disc_weights)
        return disc

    def gan_active(self, nimg: int) -> bool:
        return self.cfg.disc_weight > 0 and nimg >= self.cfg.disc_start

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hinge loss of ``discriminator`` on real ``images`` and reconstructions ``fake``."""
        real_logits = discriminator(images.detach())
        fake_logits = discriminator(fake.detach())
        d = losses.hinge_d_loss(real_logits, fake_logits)
        return {
            "loss": d,
            "d_loss": d.detach(),
            "logits_real": real_logits.detach().mean(),
            "logits_fake": fake_logits.detach().mean(),
        }


def resolve_arch(cfg: VAVAEConfig, configs: dict[str, AEArch] = CONFIGS) -> AEArch:
    """The named config of ``configs`` (a VA-VAE variant passes its own), with
    ``latent_channels`` when given."""
    if cfg.config not in configs:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(configs)}")
    arch = configs[cfg.config]
    if cfg.latent_channels is not None:
        arch = replace(arch, z_channels=cfg.latent_channels)
    return arch


def latent_shape(
    cfg: VAVAEConfig, resolution: int, configs: dict[str, AEArch] = CONFIGS
) -> tuple[int, int, int]:
    """(C, H, W) of the latents of ``resolution`` x ``resolution`` images."""
    arch = resolve_arch(cfg, configs)
    if resolution % arch.downsample:
        raise ValueError(
            f"data.resolution {resolution} is not divisible by the tokenizer's factor "
            f"{arch.downsample}"
        )
    side = resolution // arch.downsample
    return (arch.z_channels, side, side)


PUBLISHED_HINT = (
    "the published VA-VAE is vavae-imagenet256-f16d32-dinov2.pt in the Hugging Face repo "
    "hustvl/vavae-imagenet256-f16d32-dinov2; download it and set tokenizer.weights=<path>"
)
# what only training uses: the frozen loss networks and the weights training started from
TRAINING_ONLY = {"vfm": None, "perceptual": "none", "weights": None, "disc_weights": None}


def build_vavae(cfg: VAVAEConfig, resolution: int) -> VAVAE:
    arch = resolve_arch(cfg)
    latent_shape(cfg, resolution)  # resolution fits the downsampling
    vfm = None
    if cfg.vfm and cfg.vf_weight > 0:
        vfm = load_vfm(
            cfg.vfm, resize=cfg.vfm_resize, normalize=cfg.vfm_normalize, weights=cfg.vfm_weights
        )
    model = VAVAE(arch, cfg, vfm, build_perceptual(cfg))
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


def build_perceptual(cfg: VAVAEConfig) -> nn.Module | None:
    """The configured perceptual loss network: LPIPS, the VFM feature distance (on
    ``perceptual_vfm`` or ``vfm``, ImageNet-normalised, four layers spread over its depth)
    or None."""
    if cfg.perceptual == "none" or cfg.perceptual_weight <= 0:
        return None
    if cfg.perceptual == "lpips":
        return losses.LPIPSLoss(cfg.perceptual_net)
    spec = cfg.perceptual_vfm or cfg.vfm
    if not spec:
        raise ValueError("tokenizer.perceptual=vfm needs tokenizer.perceptual_vfm or .vfm")
    same = spec == cfg.vfm
    vfm = load_vfm(
        spec, resize=cfg.vfm_resize if same else None, weights=cfg.vfm_weights if same else None
    )
    vfm.layers = sorted({round(vfm.depth * (k + 1) / 4) - 1 for k in range(4)})
    return losses.VFMFeatureDistance(vfm)


def load_discriminator(disc: nn.Module, path: str) -> None:
    """Load discriminator weights strictly: a ``discriminator.safetensors`` of our checkpoints,
    or the ``loss.discriminator.*`` entries of an official LDM / VA-VAE training checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.disc_weights: {file} does not exist")
    sd = read_state_dict(file)
    if file.suffix != ".safetensors":
        prefix = "loss.discriminator."
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    disc.load_state_dict(sd, strict=True)


def load_published(model: VAVAE, path: str) -> None:
    """Load an official checkpoint strictly: every autoencoder key must be present and
    match. Training-only entries of the official files (``loss.*``: LPIPS and the
    discriminator; ``foundation_model.*``: the frozen VFM) are dropped; ``linear_proj``
    (the VF projection, only used in training) may be absent, and is dropped when this
    model has none (``tokenizer.vfm: null``: using the published tokenizer as it is)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.weights: {file} does not exist ({PUBLISHED_HINT})")
    sd = read_state_dict(file)
    ours = model.state_dict()
    drop = ("loss.", "foundation_model.")
    drop += () if any(k.startswith("linear_proj.") for k in ours) else ("linear_proj.",)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if differs := mismatch(ours, sd, optional="linear_proj."):
        raise ValueError(
            f"tokenizer.weights {file}: not a VA-VAE {model.cfg.config} checkpoint ({differs})"
        )
    model.load_state_dict(sd, strict=False)


def check_training_files(cfg: VAVAEConfig) -> None:
    """The VFM that VF alignment (and a VFM perceptual loss) trains against is there."""
    check_vfm_spec("tokenizer.vfm", cfg.vfm, cfg.vfm_weights)
    check_loss_vfms(cfg)


TOKENIZERS.register(
    "vavae",
    config=VAVAEConfig,
    latent_shape=latent_shape,
    normalization="channel",
    check=resolve_arch,
    check_training=check_training_files,
    inference=TRAINING_ONLY,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_vavae)
