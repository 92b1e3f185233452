"""The transformer layers of the DiT family: embeddings (sin-cos, 2-D RoPE, timestep,
label), attention, the SwiGLU / GELU MLPs, the adaLN block and the final layer.

DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023); LightningDiT:
Yao et al. (2025), with SwiGLU, RMSNorm, 2-D RoPE (EVA-02 style) and optional qk-norm.
Parameter names and shapes follow the official LightningDiT release (hustvl/LightningDiT),
so that its checkpoints load with ``strict=True`` into :mod:`latentforge.generators.lightningdit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class DiTArch:
    """Architecture of one named config."""

    depth: int
    hidden: int
    heads: int
    patch: int
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    use_qknorm: bool = False
    wo_shift: bool = False
    learn_sigma: bool = False
    mlp_ratio: float = 4.0
    # SVG's input layer: a Linear on the latent's tokens stored as ``ln1`` (patch 1) in place
    # of the conv patch embedding ``x_embedder``
    input_linear: bool = False


# ------------------------------------------------------------------------ embeddings


def sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE / DiT), (h*w, dim): half rows, half cols."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    # DiT's grid puts the w coordinate first
    return np.concatenate([one_axis(dim // 2, gx), one_axis(dim // 2, gy)], axis=1)


def rope_tables(
    head_dim: int, h: int, w: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables (EVA-02 / LightningDiT): first half of head_dim rotates with the row,
    second half with the column; frequencies repeated for interleaved pairs. (h*w, head_dim)."""
    d = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d)
    fr = torch.outer(torch.arange(h, dtype=torch.float64), freqs).repeat_interleave(
        2, dim=-1
    )  # (h, d)
    fc = torch.outer(torch.arange(w, dtype=torch.float64), freqs).repeat_interleave(
        2, dim=-1
    )  # (w, d)
    grid = torch.cat([fr[:, None, :].expand(h, w, d), fc[None, :, :].expand(h, w, d)], dim=-1)
    grid = grid.reshape(h * w, head_dim)
    return grid.cos().float(), grid.sin().float()


class VisionRoPE(nn.Module):
    """Applies 2-D rotary embeddings; tables are persistent buffers (they are in the
    official state_dict) and follow the latent grid size."""

    def __init__(self, head_dim: int, h: int, w: int):
        super().__init__()
        cos, sin = rope_tables(head_dim, h, w)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, nh, T, hd)
        prefix = x.shape[-2] - self.freqs_cos.shape[0]
        if prefix:  # tokens before the grid (REG's class token) are not rotated
            return torch.cat([x[..., :prefix, :], self(x[..., prefix:, :])], dim=-2)
        pairs = rearrange(x, "... (d two) -> ... d two", two=2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of flow time t in [0, 1] (no x1000 scaling), then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (id = num_classes) for the null class of CFG."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# ------------------------------------------------------------------------ blocks


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def make_norm(dim: int, rms: bool, affine: bool, eps: float = 1e-6) -> nn.Module:
    if rms:
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=eps)


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-norm and RoPE."""

    def __init__(self, dim: int, heads: int, qknorm: bool, rms: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        # qk-norm as LayerNorm: torch's default eps, as LightningDiT and SVG build it
        eps = 1e-5
        self.q_norm = make_norm(head_dim, rms, True, eps) if qknorm else nn.Identity()
        self.k_norm = make_norm(head_dim, rms, True, eps) if qknorm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(x), "b t (three nh hd) -> three b nh t hd", three=3, nh=self.heads
        )
        q, k = self.q_norm(q), self.k_norm(k)  # (B, nh, T, hd)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b nh t hd -> b t (nh hd)"))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020) with hidden int(2/3 * ratio * D), as in LightningDiT."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(2 * int(dim * ratio) / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMLP(nn.Module):
    """DiT's MLP: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm adaLN-Zero transformer block."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        d = arch.hidden
        self.wo_shift = arch.wo_shift
        self.norm1 = make_norm(d, arch.use_rmsnorm, False)
        self.attn = Attention(d, arch.heads, arch.use_qknorm, arch.use_rmsnorm)
        self.norm2 = make_norm(d, arch.use_rmsnorm, False)
        self.mlp = SwiGLU(d, arch.mlp_ratio) if arch.use_swiglu else GeluMLP(d, arch.mlp_ratio)
        chunks = 4 if arch.wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, chunks * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=-1)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), rope
        )
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """norm -> adaLN modulate -> Linear to p*p*C_out per token."""

    def __init__(self, hidden: int, patch: int, out_channels: int, rms: bool):
        super().__init__()
        self.norm_final = make_norm(hidden, rms, False)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x, c))


class PatchEmbed(nn.Module):
    """Conv patchify: (B, C, H, W) -> (B, T, D). Key ``x_embedder.proj`` as in timm/DiT."""

    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")
