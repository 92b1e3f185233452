"""Layers of VFM-VAE (tokenizers/vfmvae.py): UniTok's attention projection (Ma et al.
2025) for the adapter; StyleGAN-T's equalised-lr linear layers and style affines (Sauer et
al. 2023), modulated ConvNeXt layers, blurred x2 upsampling and GigaGAN's self-attention
with a null key/value (Kang et al. 2023) for the decoder. Attribute names follow the
released VFM-VAE checkpoint (tianciB/VFM-VAE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

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
