"""RAE's ViT decoder (``GeneralDecoder`` of Zheng et al. 2025, bytetriper/RAE): ViT-MAE layers
(pre-norm, exact GELU) on the linearly embedded latent tokens, a trainable class token, a fixed
sin-cos position embedding, a final LayerNorm and a per-patch linear prediction. Parameter
names follow the official decoder files (``decoder_embed``,
``decoder_layers.{i}.attention.attention.query``, ...), so the published ``model.pt`` loads
strictly; transformers' own ViT-MAE classes now name them differently."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentforge.generators.blocks import sincos_2d

if TYPE_CHECKING:
    from latentforge.tokenizers.rae import RAEArch


class _Dense(nn.Module):
    """A linear layer named ``dense`` (the official checkpoints' nesting)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)


class _QKV(nn.Module):
    """Query, key and value projections."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class _Attention(nn.Module):
    """Multi-head self-attention (ViT-MAE names: ``attention`` = q/k/v, ``output.dense``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _QKV(dim)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.attention
        q, k, v = (
            rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)  # (B, nh, T, hs)
            for p in (qkv.query, qkv.key, qkv.value)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.output.dense(rearrange(out, "b h n d -> b n (h d)"))


class ViTMAELayer(nn.Module):
    """Pre-norm transformer block of ViT-MAE (exact GELU)."""

    def __init__(self, dim: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = _Attention(dim, heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Dense(dim, mlp)
        self.output = _Dense(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class GeneralDecoder(nn.Module):
    """RAE's ViT decoder: encoder tokens -> per-patch pixels (normalised by the encoder's
    mean/std)."""

    def __init__(self, arch: RAEArch, grid: int, in_dim: int):
        super().__init__()
        self.grid = grid
        self.patch = arch.patch
        d = arch.hidden
        self.decoder_embed = nn.Linear(in_dim, d)
        # fixed sin-cos embedding of the class token (zeros) and the grid, (1, 1 + g*g, d)
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + grid * grid, d), requires_grad=False
        )
        self.decoder_layers = nn.ModuleList(
            ViTMAELayer(d, arch.heads, arch.mlp, arch.layer_norm_eps) for _ in range(arch.depth)
        )
        self.decoder_norm = nn.LayerNorm(d, eps=arch.layer_norm_eps)
        self.decoder_pred = nn.Linear(d, arch.patch**2 * 3)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.init_weights()

    def init_weights(self) -> None:
        """Fixed 2-D sin-cos position embedding (MAE; zeros for the class token); linears
        Xavier-uniform with zero bias (MAE's decoder init; the official decoder keeps
        PyTorch's defaults); LayerNorms unit scale, zero shift; class token zero."""
        pos = torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid, self.grid))
        self.decoder_pos_embed.data[0, 1:] = pos.float()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens (B, g*g, C). Returns per-patch pixels (B, g*g, patch*patch*3)."""
        x = self.decoder_embed(tokens)  # (B, N, D)
        cls = self.trainable_cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.decoder_pos_embed  # (B, 1 + N, D)
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # class token dropped

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, g*g, p*p*3) -> (B, 3, g*p, g*p); each patch's values in (p, q, c) order."""
        g, p = self.grid, self.patch
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)
