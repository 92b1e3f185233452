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

Parameter names follow the released ``G_ema`` (``ldm_adapter.*``, ``mapping.*``,
``synthesis.*``) so that the published checkpoint loads strictly once the frozen VFM
(``vfm_encoder.*``) is dropped. Modules and training losses are written from the paper
and from reading the official code; no code is copied from it.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers import losses
from latentforge.tokenizers.base import Tokenizer
from latentforge.tokenizers.vfm import VFM, check_vfm_spec, encode_levels, load_vfm

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VFMVAEArch:
    """Sizes of one VFM-VAE (adapter + decoder); independent of the image resolution."""

    vfm_dim: int  # width of the VFM's tokens (every level)
    vfm_patch: int  # the VFM's patch size
    vfm_scale: float = 2.0  # VFM input size / image size
    levels: tuple[int, ...] = (0, 12, -1)  # VFM depths read (0: patch embedding, -1: output)
    level_dims: tuple[int, ...] = (64, 64, 64)  # width of each level after its projection
    z_channels: int = 32
    downsample: int = 16  # image size / latent size
    decompress: int = 16  # post_quant widens the latent to z_channels * decompress
    w_dim: int = 512  # style width (the mapping MLP's output)
    num_blocks: int = 6  # synthesis blocks, each doubling the resolution
    channel_base: int = 32768
    channel_max: int = 512
    num_res_blocks: int = 2
    concat_blocks: tuple[int, ...] = (0, 1, 2, 3)  # blocks the latent is re-injected into
    concat_dims: tuple[int, ...] = (512, 256, 128, 128)  # its width at each of them
    concat_act: str = "lrelu"  # "lrelu", "silu" or "gelu"
    attn_blocks: tuple[int, ...] = (0, 1, 2)  # blocks with self-attention
    attn_depths: tuple[int, ...] = (2, 2, 2)
    attn_heads: int = 8
    # as released: every ConvNeXt layer also adds a learned-strength constant noise map
    # (kept for the published 256 px weights; the authors advise False for new training)
    legacy: bool = True

    def grid_ratio(self) -> int:
        """VFM patch grid / latent grid (the PixelUnshuffle factor of each level)."""
        ratio = self.vfm_scale * self.downsample / self.vfm_patch
        if ratio != int(ratio) or ratio < 1:
            raise ValueError(
                f"the VFM grid (scale {self.vfm_scale}, patch {self.vfm_patch}) is not a "
                f"whole multiple of the latent grid (factor {self.downsample})"
            )
        return int(ratio)

    def block_channels(self, i: int) -> int:
        """Channels of synthesis block ``i`` (StyleGAN-T's channel_base / resolution rule,
        with resolutions counted as at 256 px output)."""
        res256 = 256 * 2**i // 2 ** (self.num_blocks - 1)
        return min(self.channel_base // max(res256, 1), self.channel_max)


# ----------------------------------------------------------------------------- adapter


class ProjAttention(nn.Module):
    """Attention whose output width differs from its input's: narrowing averages the heads
    (and pools them to the output width); widening concatenates them."""

    def __init__(self, in_dim: int, out_dim: int, heads: int):
        super().__init__()
        inner = max(in_dim, out_dim)
        self.heads, self.in_dim, self.out_dim = heads, in_dim, out_dim
        self.head_dim = inner // heads
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))  # keys have no bias
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        if self.in_dim > self.out_dim:
            out = out.mean(dim=1)  # (B, N, hd)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, nh * hd)
        return self.proj(out)


class GeGLU(nn.Module):
    """Pre-norm gated GELU (tanh) MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.act = nn.GELU(approximate="tanh")
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(self.act(self.w0(x)) * self.w1(x))


class ProjBlock(nn.Module):
    """One attention-projection block: in_dim tokens -> out_dim tokens."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = ProjAttention(in_dim, out_dim, heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGLU(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttnProjection(nn.Module):
    """A stack of projection blocks changing the width in the last block (narrowing) or
    the first (widening)."""

    def __init__(self, in_dim: int, out_dim: int, layers: int = 1):
        super().__init__()
        heads = max(1, max(in_dim, out_dim) // min(in_dim, out_dim))
        if in_dim >= out_dim:
            dims = [(in_dim, in_dim)] * (layers - 1) + [(in_dim, out_dim)]
        else:
            dims = [(in_dim, out_dim)] + [(out_dim, out_dim)] * (layers - 1)
        self.blocks = nn.ModuleList(ProjBlock(i, o, heads) for i, o in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Adapter(nn.Module):
    """VFM levels -> posterior moments; latent -> the decoder's wide latent."""

    def __init__(self, arch: VFMVAEArch, vf_dim: int | None = None):
        super().__init__()
        self.ratio = arch.grid_ratio()
        self.patch_quants = nn.ModuleList(
            nn.Sequential(AttnProjection(arch.vfm_dim, d)) for d in arch.level_dims
        )
        final_in = sum(d * self.ratio**2 for d in arch.level_dims)
        self.final_quant = AttnProjection(final_in, 2 * arch.z_channels)
        self.post_quant = AttnProjection(arch.z_channels, arch.z_channels * arch.decompress)
        # the VF loss's projection of z to the VFM width (training only)
        self.linear_proj = nn.Conv2d(arch.z_channels, vf_dim, 1, bias=False) if vf_dim else None
        self.init_weights()

    def init_weights(self) -> None:
        """As released: linear layers truncated N(0, 0.02), convolutions Xavier-normal with
        gain 0.5, zero biases, unit norms; attention biases start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=0.5)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Args: levels, one (B, C_vfm, gh, gw) grid per VFM level. Returns the posterior
        moments (B, 2 z, gh / r, gw / r), mean first."""
        parts = []
        gh, gw = levels[0].shape[-2:]
        r = self.ratio
        for grid, quant in zip(levels, self.patch_quants, strict=True):
            t = quant(rearrange(grid, "b c h w -> b (h w) c"))  # (B, gh*gw, d)
            parts.append(  # PixelUnshuffle order: channel, then row/column offset
                rearrange(t, "b (h p w q) d -> b (h w) (d p q)", h=gh // r, p=r, w=gw // r, q=r)
            )
        x = self.final_quant(torch.cat(parts, dim=-1))  # (B, h*w, 2z)
        return rearrange(x, "b (h w) c -> b c h w", h=gh // r)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (B, z, h, w). Returns (B, z * decompress, h, w)."""
        h = z.shape[-2]
        x = self.post_quant(rearrange(z, "b c h w -> b (h w) c"))  # (B, h*w, C)
        return rearrange(x, "b (h w) c -> b c h w", h=h)


# ----------------------------------------------------------------------------- mapping


class FullyConnected(nn.Module):
    """Linear layer with equalised learning rate (StyleGAN): weights stored at 1/lr_mult."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        activation: str = "linear",
        lr_mult: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_dim,), bias_init / lr_mult))
        self.weight_gain = lr_mult / math.sqrt(in_dim)
        self.bias_gain = lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) if self.activation == "lrelu" else x


class StyleSplit(nn.Module):
    """Style affine of StyleGAN-T: three projections s1, s2, s3 combined as s1 * s2 + s3."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.proj = FullyConnected(w_dim, 3 * channels, bias_init=1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a, b, c = self.proj(w).chunk(3, dim=1)
        return a * b + c


class MLP(nn.Module):
    """Mapping MLP: leaky-ReLU layers, the last linear."""

    def __init__(self, dims: list[int], lr_mult: float):
        super().__init__()
        self.num_layers = len(dims) - 1
        for i in range(self.num_layers):
            act = "linear" if i == self.num_layers - 1 else "lrelu"
            self.add_module(f"fc{i}", FullyConnected(dims[i], dims[i + 1], act, lr_mult))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


class Mapping(nn.Module):
    """Pooled latent -> style w (second-moment normalised input, 2 layers, lr x 0.01)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int = 2, ema_beta: float = 0.995):
        super().__init__()
        self.mlp = MLP([z_dim] * layers + [w_dim], lr_mult=0.01)
        self.ema_beta = ema_beta
        self.register_buffer("x_avg", torch.zeros(w_dim))  # running mean of w (truncation)

    def forward(self, z_pooled: torch.Tensor) -> torch.Tensor:
        """Args: z_pooled (B, z_dim). Returns w (B, w_dim)."""
        z = z_pooled * (z_pooled.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        w = self.mlp(z)
        if self.training:
            self.x_avg.copy_(w.detach().mean(0).lerp(self.x_avg, self.ema_beta))
        return w


# ----------------------------------------------------------------------------- synthesis


def modulated_pointwise(
    x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, demodulate: bool = True
) -> torch.Tensor:
    """1x1 convolution with per-sample input scales ``style`` (StyleGAN2's modulation,
    Karras et al. 2020, Eq. 1) and, with ``demodulate``, unit-norm output weights (Eq. 3).

    Shapes: x (B, I, H, W), weight (O, I, 1, 1), style (B, I) -> (B, O, H, W)."""
    w = weight[:, :, 0, 0].unsqueeze(0) * style.unsqueeze(1)  # (B, O, I)
    if demodulate:
        w = w * (w.square().sum(dim=2, keepdim=True) + 1e-8).rsqrt()
    return torch.einsum("boi,bihw->bohw", w, x)


class ModulatedPointwise(nn.Module):
    """Modulated, demodulated 1x1 convolution with a bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return modulated_pointwise(x, self.weight, style) + self.bias


class GroupNormF32(nn.GroupNorm):
    """GroupNorm computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ConvNeXtLayer(nn.Module):
    """Residual ConvNeXt layer whose expanding 1x1 convolution is style-modulated."""

    def __init__(self, channels: int, w_dim: int, kernel: int, noise_res: int | None = None):
        super().__init__()
        self.affine_pw1 = StyleSplit(w_dim, channels)
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        if noise_res is not None:  # legacy: a constant noise map of learned strength
            self.register_buffer("noise_const", torch.randn(noise_res, noise_res))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.pwconv1 = ModulatedPointwise(channels, 4 * channels)
        self.pwconv2 = nn.Conv2d(4 * channels, channels, 1)
        self.norm = GroupNormF32(min(32, channels // 4), channels)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(1e-5 * torch.ones(1, channels, 1, 1))  # layer scale
        nn.init.trunc_normal_(self.dwconv.weight, std=0.02)
        nn.init.zeros_(self.dwconv.bias)
        nn.init.trunc_normal_(self.pwconv2.weight, std=0.02)
        nn.init.zeros_(self.pwconv2.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x)
        if hasattr(self, "noise_const"):  # resized to the feature map (any resolution)
            noise = (self.noise_const * self.noise_strength)[None, None]
            h = h + F.interpolate(noise, size=h.shape[-2:], mode="bilinear", align_corners=False)
        h = self.act(self.pwconv1(self.norm(h), self.affine_pw1(w)))
        return x + self.gamma * self.pwconv2(h)


class ToRGB(nn.Module):
    """Modulated (not demodulated) 1x1 convolution to RGB."""

    def __init__(self, in_channels: int, w_dim: int, out_channels: int = 3):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.affine = StyleSplit(w_dim, in_channels)
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w) * self.weight_gain
        return modulated_pointwise(x, self.weight, style, demodulate=False) + self.bias


BLUR_KERNELS = {"3x3": (1, 2, 1), "5x5": (1, 4, 6, 4, 1)}


class BlurUpsample(nn.Module):
    """x2 upsampling: (norm,) depthwise 3x3, pointwise, PixelShuffle (, norm), then a fixed
    normalised binomial blur with replicate padding."""

    def __init__(self, in_channels: int, out_channels: int, blur: str, pre_norm: bool = True):
        super().__init__()
        self.pre_norm = pre_norm
        c = in_channels if pre_norm else out_channels
        self.norm = nn.GroupNorm(min(32, c // 4), c)
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, 4 * out_channels, 1, bias=False)
        k = torch.tensor(BLUR_KERNELS[blur], dtype=torch.float32)
        k2 = k[:, None] * k[None, :]
        self.register_buffer("blur_weight", (k2 / k2.sum()).expand(out_channels, 1, -1, -1).clone())
        self.pad = len(k) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm(x)
        x = F.pixel_shuffle(self.pointwise(self.depthwise(x)), 2)  # (B, out, 2H, 2W)
        if not self.pre_norm:
            x = self.norm(x)
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return F.conv2d(x, self.blur_weight, groups=x.shape[1])


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels of a (B, C, H, W) map, learned per-channel gain."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class SelfAttention(nn.Module):
    """Self-attention over the pixels of a feature map with a learned null key/value."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.norm = ChannelRMSNorm(dim)
        self.to_q = nn.Conv2d(dim, head_dim * heads, 1, bias=False)
        self.to_k = nn.Conv2d(dim, head_dim * heads, 1, bias=False)
        self.to_v = nn.Conv2d(dim, head_dim * heads, 1, bias=False)
        self.null_kv = nn.Parameter(0.02 * torch.randn(2, heads, head_dim))
        self.to_out = nn.Conv2d(head_dim * heads, dim, 1, bias=False)
        nn.init.zeros_(self.to_out.weight)  # the residual branch starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.norm(x)
        q, k, v = (
            rearrange(f(x), "b (n d) x y -> b n (x y) d", n=self.heads)  # (B, nh, HW, hd)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        nk, nv = (t.unsqueeze(0).unsqueeze(2).expand(b, -1, -1, -1) for t in self.null_kv)
        k = torch.cat([nk, k], dim=2)  # (B, nh, 1 + HW, hd)
        v = torch.cat([nv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hd)
        return self.to_out(rearrange(out, "b n (x y) d -> b (n d) x y", x=h, y=w))


class AttentionBlock(nn.Module):
    """Self-attention + 1x1 feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ff = nn.Sequential(
            ChannelRMSNorm(dim),
            nn.Conv2d(dim, dim * ff_mult, 1),
            nn.GELU(),
            nn.Conv2d(dim * ff_mult, dim, 1),
        )
        nn.init.zeros_(self.ff[3].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


def _zconv(cin: int, cout: int, act: str | None, depthwise: bool) -> nn.Sequential:
    """(depthwise 3x3,) 1x1, GroupNorm (, activation): the latent's path into a block."""
    layers: list[nn.Module] = []
    if depthwise:
        layers.append(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False))
    layers += [nn.Conv2d(cin, cout, 1, bias=False), GroupNormF32(min(32, cout), cout)]
    if act is not None:
        layers.append({"lrelu": nn.LeakyReLU(0.2), "silu": nn.SiLU(), "gelu": nn.GELU()}[act])
    return nn.Sequential(*layers)


def latent_injection(arch: VFMVAEArch, i: int, z_dim: int, out: int) -> nn.Sequential:
    """The latent resampled to block ``i``'s input grid (half the block's resolution):
    PixelUnshuffle when the latent is finer, PixelShuffle after the conv when coarser."""
    # twice the latent's resolution over the block's (both relative to the output size)
    ratio = 2 * 2 ** (arch.num_blocks - 1 - i) / arch.downsample
    if ratio > 1:
        f = int(ratio)
        return nn.Sequential(
            nn.PixelUnshuffle(f),
            _zconv(z_dim * f * f, out, arch.concat_act, True),
            _zconv(out, out, None, False),
        )
    if ratio == 1:
        return nn.Sequential(
            _zconv(z_dim, out, arch.concat_act, True), _zconv(out, out, None, False)
        )
    f = int(1 / ratio)
    return nn.Sequential(
        _zconv(z_dim, out * f * f, arch.concat_act, True),
        nn.PixelShuffle(f),
        _zconv(out, out, None, False),
    )


class SynthesisBlock(nn.Module):
    """One x2 block: upsample, ConvNeXt layers, self-attention, RGB skip output."""

    def __init__(self, arch: VFMVAEArch, i: int, in_channels: int):
        super().__init__()
        out = arch.block_channels(i)
        kernel, blur = (5 if i <= 1 else 7), ("3x3" if i <= 2 else "5x5")
        noise = 8 * 2**i if arch.legacy else None  # the released 256 px sizes
        self.seperate_upsample_conv = BlurUpsample(in_channels, out, blur, pre_norm=i > 0)
        self.conv0 = ConvNeXtLayer(out, arch.w_dim, kernel, noise)
        n = arch.num_res_blocks * (3 if i <= 3 else 2)
        self.convs1 = nn.ModuleList(ConvNeXtLayer(out, arch.w_dim, kernel, noise) for _ in range(n))
        self.torgb = ToRGB(out, arch.w_dim)
        if i > 0:
            prev = arch.block_channels(i - 1)
            self.last_upsample_conv = BlurUpsample(prev, out, blur)
        depth = arch.attn_depths[arch.attn_blocks.index(i)] if i in arch.attn_blocks else 0
        if depth:
            self.self_attns = nn.ModuleList(
                AttentionBlock(out, arch.attn_heads) for _ in range(depth)
            )

    def forward(self, x: torch.Tensor, x_sum: torch.Tensor | None, w: torch.Tensor):
        """Args: x (B, C_in, H, W), x_sum the running skip features (B, C_prev, H, W) or
        None, w (B, w_dim). Returns x and x_sum (B, C, 2H, 2W) and the RGB (B, 3, 2H, 2W)."""
        x = self.conv0(self.seperate_upsample_conv(x), w)
        for conv in self.convs1:
            x = conv(x, w)
        for attn in getattr(self, "self_attns", ()):
            x = attn(x)
        x_sum = x if x_sum is None else self.last_upsample_conv(x_sum) + x
        return x, x_sum, self.torgb(x_sum, w)


class Synthesis(nn.Module):
    """StyleGAN-T-style decoder: wide latent + style -> image and smaller images."""

    def __init__(self, arch: VFMVAEArch, z_dim: int):
        super().__init__()
        if 0 not in arch.concat_blocks:
            raise ValueError("the first synthesis block must receive the latent (concat_blocks)")
        self.concat_blocks = tuple(arch.concat_blocks)
        self.z_convs = nn.ModuleDict(
            {
                str(i): latent_injection(arch, i, z_dim, d)
                for i, d in zip(arch.concat_blocks, arch.concat_dims, strict=True)
            }
        )
        blocks = {}
        for i in range(arch.num_blocks):
            cin = arch.block_channels(i - 1) if i > 0 else 0
            if i in arch.concat_blocks:
                cin += arch.concat_dims[arch.concat_blocks.index(i)]
            blocks[str(i)] = SynthesisBlock(arch, i, cin)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: z (B, C_z, h, w) the wide latent, w (B, w_dim). Returns the image
        (B, 3, h f, w f) and the other blocks' RGB outputs, largest first."""
        x = x_sum = None
        images = []
        for i, block in enumerate(self.blocks.values()):
            if i in self.concat_blocks:
                zi = self.z_convs[str(i)](z)
                x = zi if x is None else torch.cat([x, zi], dim=1)
            x, x_sum, img = block(x, x_sum, w)
            images.append(img)
        return images[-1], images[-2::-1]


# ----------------------------------------------------------------------------- configs


_VFM_SIGLIP2_L16 = dict(vfm_dim=1024, vfm_patch=16)
CONFIGS: dict[str, VFMVAEArch] = {
    # the published model: SigLIP2-L/16 at 512 px (2x the 256 px image), 32x16x16 latents
    "f16d32-siglip2": VFMVAEArch(**_VFM_SIGLIP2_L16),
    # the embedded default: 32x32 shapes, the shapes ViT at 64 px (16x16 patches of 4 px)
    # read at its embedding, block 2 and output -> 8x8x4 latents (as VA-VAE's shapes-f4d4)
    "shapes": VFMVAEArch(
        vfm_dim=128,
        vfm_patch=4,
        levels=(0, 2, -1),
        level_dims=(16, 16, 16),
        z_channels=4,
        downsample=4,
        decompress=16,
        w_dim=64,
        num_blocks=3,
        channel_base=4096,
        channel_max=64,
        num_res_blocks=1,
        concat_blocks=(0, 1),
        concat_dims=(64, 32),
        attn_blocks=(0,),
        attn_depths=(1,),
        attn_heads=4,
        legacy=False,
    ),
    # tests (and the parity fixture): a 16-wide, patch-4 VFM at 64 px for 32 px images;
    # the three ways the latent enters a block (PixelUnshuffle, as it is, PixelShuffle)
    "tiny": VFMVAEArch(
        vfm_dim=16,
        vfm_patch=4,
        levels=(0, 1, -1),
        level_dims=(4, 4, 4),
        z_channels=4,
        downsample=4,
        decompress=4,
        w_dim=16,
        num_blocks=3,
        channel_base=4096,
        channel_max=16,
        num_res_blocks=1,
        concat_blocks=(0, 1, 2),
        concat_dims=(8, 8, 4),
        attn_blocks=(0, 1),
        attn_depths=(1, 1),
        attn_heads=8,
        legacy=True,
    ),
}


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
    # a hinge PatchGAN (losses.NLayerDiscriminator); 0 = off. It stands in for the released
    # discriminators (StyleGAN-T's projected one on DINO-S/16; pix2pixHD's multi-scale
    # PatchGAN with feature matching in stage 3), which are not reproduced here
    disc_weight: float = 0.0
    disc_start: float = 0.0
    disc_layers: int = 3
    disc_channels: int = 64
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

    def __deepcopy__(self, memo: dict) -> VFMVAE:
        """A copy with its own weights that shares the frozen networks (an EMA copy), also
        the VFM that either loads later."""
        memo[id(self._frozen)] = self._frozen
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for m in self._frozen.values():
            if m is not None:
                m._apply(fn, recurse)  # .to(device) moves the frozen networks along
        return self

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
            g = losses.hinge_g_loss(discriminator(fake))
            total = total + cfg.disc_weight * g
            out.update(g_loss=g.detach(), fake=fake.detach())
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
        """A hinge PatchGAN when ``disc_weight`` > 0, else None."""
        cfg = self.cfg
        if cfg.disc_weight <= 0:
            return None
        return losses.NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers)

    def discriminator_optimizer(self, base_lr: float) -> dict:
        return {"disc_lr": base_lr, "disc_betas": (0.0, 0.99)}  # as released

    def gan_active(self, nimg: int) -> bool:
        return self.cfg.disc_weight > 0 and nimg >= self.cfg.disc_start

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hinge loss on real images and reconstructions."""
        real_logits = discriminator(images.detach())
        fake_logits = discriminator(fake.detach())
        d = losses.hinge_d_loss(real_logits, fake_logits)
        return {"loss": d, "d_loss": d.detach()}


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
    arch.grid_ratio()
    return arch


def check_config(cfg: VFMVAEConfig) -> None:
    """The named config exists, and the stage has a term to train."""
    resolve_arch(cfg)
    stage = stage_of(cfg)
    recon = stage.l1 + stage.ssim + (stage.perceptual if cfg.perceptual != "none" else 0)
    if recon + stage.kl + stage.vf <= 0 and cfg.disc_weight <= 0 and not stage.multiscale:
        raise ValueError(
            f"tokenizer.disc_weight: stage {cfg.stage} trains only GAN terms; set it above 0"
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
TRAINING_ONLY = {"perceptual": "none", "weights": None, "vf_weight": 0.0, "disc_weight": 0.0}
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
    if cfg.perceptual == "vfm" and cfg.perceptual_vfm:
        check_vfm_spec("tokenizer.perceptual_vfm", cfg.perceptual_vfm, None)


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
