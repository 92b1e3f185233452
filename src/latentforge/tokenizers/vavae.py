"""VA-VAE: the LDM convolutional KL autoencoder with VF alignment to a frozen VFM.

Architecture: Rombach et al. 2022 (LDM / taming VQGAN-KL autoencoder). Alignment: Yao et
al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models" (hustvl/LightningDiT, VA-VAE). Parameter names follow the official checkpoints
(``encoder.down.{i}.block.{j}.conv1``, ``quant_conv``, ``post_quant_conv``, ...), so that
``vavae-imagenet256-f16d32-dinov2.pt`` can load strictly. Attention sits at level indices
(not pixel sizes), so one config works at any resolution divisible by the downsampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.registry import TOKENIZERS
from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class AEArch:
    """Architecture of one named autoencoder config."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # levels (0 = full resolution) with attention blocks
    z_channels: int
    groups: int = 32  # GroupNorm groups
    mid_attn: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


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
class VAVAEConfig:
    """Schema of ``tokenizer:`` for VA-VAE."""

    name: str = "vavae"
    config: str = "shapes-f4d4"  # key of CONFIGS
    latent_channels: int | None = None  # override the named config's z channels
    vfm: str | None = "local:shapes-vit"  # None: no VF alignment (a plain LDM KL-VAE)
    vfm_weights: str | None = None  # explicit weights file for timm: VFMs
    vfm_normalize: bool = True  # False reproduces VA-VAE's un-normalised DINOv2 input
    vf_weight: float = 0.1
    vf_margin_cos: float = 0.5
    vf_margin_dist: float = 0.25
    vf_adaptive: bool = True
    kl_weight: float = 1e-6
    recon: Literal["l1", "l2"] = "l1"
    sample_posterior: bool = True  # training decodes z ~ q(z|x); encode() returns the mean
    # published weights to start from (or, with train.tokenizer_images=0, to use as they
    # are): an official VA-VAE / LDM checkpoint (.pt/.ckpt with a state_dict) or safetensors
    weights: str | None = None


def norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v, proj_out."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (
            m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v)
        )  # (B, 1, hw, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks (+ attention), then an optional resampler."""

    def __init__(
        self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, name, resample)
        self._resample = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self._resample)(x) if self._resample else x


class Mid(nn.Module):
    def __init__(self, c: int, arch: AEArch):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, arch.groups)
        self.attn_1 = AttnBlock(c, arch.groups) if arch.mid_attn else nn.Identity()
        self.block_2 = ResnetBlock(c, c, arch.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2z, H/f, W/f)."""

    def __init__(self, arch: AEArch):
        super().__init__()
        g = arch.groups
        self.conv_in = nn.Conv2d(3, arch.ch, 3, padding=1)
        widths = [arch.ch * m for m in (1, *arch.ch_mult)]
        levels = []
        for i in range(len(arch.ch_mult)):
            cin, cout = widths[i], widths[i + 1]
            blocks = [
                ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(arch.num_res_blocks)
            ]
            attns = [AttnBlock(cout, g) for _ in blocks] if i in arch.attn_levels else []
            down = Downsample(cout) if i < len(arch.ch_mult) - 1 else None
            levels.append(Level(blocks, attns, down, "downsample"))
        self.down = nn.ModuleList(levels)
        c = widths[-1]
        self.mid = Mid(c, arch)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, 2 * arch.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f); ``up[i]`` is level i, run from the last."""

    def __init__(self, arch: AEArch):
        super().__init__()
        g = arch.groups
        widths = [arch.ch * m for m in arch.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(arch.z_channels, c, 3, padding=1)
        self.mid = Mid(c, arch)
        levels: list[nn.Module] = []
        for i in reversed(range(len(arch.ch_mult))):
            cout = widths[i]
            blocks = [
                ResnetBlock(c if j == 0 else cout, cout, g) for j in range(arch.num_res_blocks + 1)
            ]
            attns = [AttnBlock(cout, g) for _ in blocks] if i in arch.attn_levels else []
            up = Upsample(cout) if i > 0 else None
            levels.insert(0, Level(blocks, attns, up, "upsample"))
            c = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAVAE(Tokenizer):
    """LDM KL autoencoder; with a VFM, trained with the VF alignment loss."""

    def __init__(self, arch: AEArch, cfg: VAVAEConfig, vfm: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.downsample = arch.downsample
        self.latent_channels = arch.z_channels
        z = arch.z_channels
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        # the frozen VFM is held outside the module tree: not in state_dict / parameters
        self._vfm = [vfm] if vfm is not None else []
        self.linear_proj = nn.Conv2d(z, vfm.embed_dim, 1, bias=False) if vfm is not None else None

    @property
    def vfm(self) -> nn.Module | None:
        return self._vfm[0] if self._vfm else None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._vfm:
            self._vfm[0]._apply(fn, recurse)  # .to(device) moves the VFM along
        return self

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1] (B, 3, H, W). Returns the posterior mean (or a sample)
        (B, z, H/f, W/f)."""
        mean, logvar = self.moments(images)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: latents (B, z, h, w). Returns images (B, 3, h*f, w*f), roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def loss(self, images: torch.Tensor, nimg: int) -> dict[str, torch.Tensor]:
        """Reconstruction + KL (+ adaptive VF). ``loss`` back-propagates; the rest is logged."""
        cfg = self.cfg
        mean, logvar = self.moments(images)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if cfg.sample_posterior else mean
        recon = losses.reconstruction_loss(images, self.decode(z), cfg.recon)
        kl = losses.kl_loss(mean, logvar, images[0].numel())
        total = recon + cfg.kl_weight * kl
        out = {"recon": recon.detach(), "kl": kl.detach()}
        if self.vfm is not None and cfg.vf_weight > 0:
            feats = self.vfm(images).patch[-1]
            vf = losses.vf_loss(self.linear_proj(z), feats, cfg.vf_margin_cos, cfg.vf_margin_dist)
            weight = cfg.vf_weight
            if cfg.vf_adaptive and self.training and torch.is_grad_enabled():
                weight = weight * losses.adaptive_weight(recon, vf, self.encoder.conv_out.weight)
            total = total + weight * vf
            out.update(vf=vf.detach(), vf_weight_eff=torch.as_tensor(weight).detach())
        out["loss"] = total
        return out


def resolve_arch(cfg: VAVAEConfig) -> AEArch:
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    arch = CONFIGS[cfg.config]
    if cfg.latent_channels is not None:
        from dataclasses import replace

        arch = replace(arch, z_channels=cfg.latent_channels)
    return arch


@TOKENIZERS.register("vavae", config=VAVAEConfig)
def build_vavae(cfg: VAVAEConfig, resolution: int) -> VAVAE:
    arch = resolve_arch(cfg)
    if resolution % arch.downsample:
        raise ValueError(
            f"resolution {resolution} is not divisible by the tokenizer's factor {arch.downsample}"
        )
    vfm = None
    if cfg.vfm and cfg.vf_weight > 0:
        from latentforge.tokenizers.vfm import load_vfm

        vfm = load_vfm(cfg.vfm, normalize=cfg.vfm_normalize, weights=cfg.vfm_weights)
    model = VAVAE(arch, cfg, vfm)
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


PUBLISHED_HINT = (
    "the published VA-VAE is vavae-imagenet256-f16d32-dinov2.pt in the Hugging Face repo "
    "hustvl/vavae-imagenet256-f16d32-dinov2; download it and set tokenizer.weights=<path>"
)


def load_published(model: VAVAE, path: str) -> None:
    """Load an official checkpoint strictly: every autoencoder key must be present and
    match. Training-only entries of the official files (``loss.*``: LPIPS and the
    discriminator; ``foundation_model.*``: the frozen VFM) are dropped; ``linear_proj``
    (the VF projection) may be absent, as it is only used in training."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.weights: {file} does not exist ({PUBLISHED_HINT})")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(file))
    else:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd))
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "foundation_model."))}
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd and not k.startswith("linear_proj.")]
    unexpected = [k for k in sd if k not in ours]
    shapes = [k for k in sd if k in ours and sd[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"tokenizer.weights {file}: not a VA-VAE {model.cfg.config} checkpoint "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]})"
        )
    model.load_state_dict(sd, strict=False)
