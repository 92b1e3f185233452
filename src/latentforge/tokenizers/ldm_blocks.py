"""The LDM convolutional autoencoder (Rombach et al. 2022; the taming VQGAN-KL layout):
architecture record, ResNet / attention / resampling blocks, encoder and decoder.

Parameter names follow the official checkpoints (``encoder.down.{i}.block.{j}.conv1``,
``mid.attn_1``, ...), so that published VA-VAE / LDM weights load strictly into the
families built from these blocks (:mod:`latentforge.tokenizers.vavae`). Attention sits at
level indices (not pixel sizes), so one config works at any resolution divisible by the
downsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c, eps=1e-6)


def norm_silu(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm then SiLU; without autograd the SiLU runs in place (one activation-sized
    buffer instead of two: on CPU, fresh large buffers cost page faults)."""
    return F.silu(gn(x), inplace=not torch.is_grad_enabled())


def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """On CPU, channels_last (NHWC) activations: oneDNN convolutions then work without
    reordering every input and output, and every layer here keeps that layout (about a
    fifth faster encode/decode at 256 px, 2 threads). Elsewhere ``x`` as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


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
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return h + skip if torch.is_grad_enabled() else h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v, proj_out."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)  # (B, 1, hw, C)
        # the 1x1 convolutions as linear layers on tokens (a view of channels_last input)
        q, k, v = (F.linear(y, m.weight.view(c, c), m.bias) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


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


class ConvEncoder(nn.Module):
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
        return self.conv_out(norm_silu(self.norm_out, self.mid(h)))


class ConvDecoder(nn.Module):
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
        return self.conv_out(norm_silu(self.norm_out, h))
