"""The networks of the 1-D token tokenizers (MAETok, SoftVQ-VAE): a ViT encoder that reads a
set of learnable latent tokens appended after the image tokens, a ViT decoder that rebuilds
the image tokens from mask tokens and the latent tokens, and SoftVQ's soft quantiser.

Written from the papers (SoftVQ-VAE, Chen et al. 2024, arXiv 2412.10958; MAETok, Chen et al.
2025, arXiv 2502.03444) and checked against the official ``Hhhhhhao/continuous_tokenizer``
(``modelling/modules/timm_vit/``, ``modelling/quantizers/softvq.py``) through the parity
fixtures. Parameter names follow the official checkpoints (timm ViT names with DINOv2's
layer scale: ``model.blocks.{i}.attn.qkv``, ``ls1.gamma``, ...), so the published weights load
strictly. Details kept from the official code:

- the encoder always adds its absolute position embedding, RoPE or not; RoPE (the "mixed",
  learnable-frequency variant of Heo et al. 2024, "Rotary Position Embedding for Vision
  Transformer") rotates the image tokens only, never the class or latent tokens;
- the decoder adds its absolute position embedding only without RoPE; its ``patch_embed``
  is never used but is part of the checkpoints;
- MoVQ decoder blocks (Zheng et al. 2022, "MoVQ") have LayerNorms without affine, and a
  per-token ``adaLN_modulation`` of the raw latent z modulates only the latent tokens, as
  ``x * scale + shift`` (no ``1 + scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import LayerScale, Mlp, PatchEmbed, trunc_normal_
from torch import nn


@dataclass(frozen=True)
class TokenArch:
    """A 1-D token tokenizer: ViT encoder, L latent tokens of D channels, ViT decoder."""

    kind: str  # "softvq" (soft quantiser) or "maetok" (plain AE, mask modelling)
    width: int  # encoder
    depth: int
    heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    tokens: int  # L
    channels: int  # D
    patch: int = 16  # encoder patch; the decoder's is the same unless dec_patch is set
    dec_patch: int = 0
    image_size: int = 256  # the resolution the published weights are for
    mlp_ratio: float = 4.0
    init_values: float = 1e-5  # DINOv2's layer scale (encoder; plain decoder blocks)
    rope: bool = False  # mixed RoPE on the image tokens (MAETok), else absolute only
    rope_theta: float = 10.0
    movq: bool = False  # MoVQ decoder blocks modulated by z (MAETok)
    dec_cls_token: bool = True
    codebooks: int = 0  # SoftVQ: one codebook per contiguous segment of tokens; 0: none
    codebook_size: int = 0
    tau: float = 0.07  # SoftVQ's softmax temperature
    mask_token: bool = False  # the encoder has a mask token (MAETok's mask modelling)
    published: str = ""  # Hugging Face repo of the published weights

    @property
    def decoder_patch(self) -> int:
        return self.dec_patch or self.patch


# ----------------------------------------------------------------------------- RoPE


def mixed_rope_init(depth: int, heads: int, head_dim: int, theta: float) -> torch.Tensor:
    """Learnable frequencies (2, depth, heads * head_dim / 2): per block and head, the axial
    magnitudes theta^(-4k/head_dim) rotated by a random angle (x: cos, y: sin)."""
    mag = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    out = torch.empty(2, depth, heads, head_dim // 2)
    for d in range(depth):
        for h in range(heads):
            a = torch.rand(1) * 2 * math.pi
            out[0, d, h] = torch.cat([mag * torch.cos(a), mag * torch.cos(a + math.pi / 2)])
            out[1, d, h] = torch.cat([mag * torch.sin(a), mag * torch.sin(a + math.pi / 2)])
    return out.view(2, depth, -1)


def grid_positions(cols: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of each token of a row-major grid, as floats (N,)."""
    t = torch.arange(cols * rows, dtype=torch.float32)
    return t % cols, torch.div(t, cols, rounding_mode="floor")


def rope_angles(
    freqs: torch.Tensor, t_x: torch.Tensor, t_y: torch.Tensor, heads: int
) -> torch.Tensor:
    """Rotation angles (depth, heads, N, head_dim / 2) = t_x f_x + t_y f_y."""
    depth = freqs.shape[1]
    ax = (t_x[:, None] @ freqs[0][:, None, :]).view(depth, -1, heads, freqs.shape[-1] // heads)
    ay = (t_y[:, None] @ freqs[1][:, None, :]).view(depth, -1, heads, freqs.shape[-1] // heads)
    return (ax + ay).permute(0, 2, 1, 3)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, nh, T, hs) by angles (nh, T, hs/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
    re, im = pairs.unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def add_mixed_rope(module: nn.Module, arch: TokenArch, dims: tuple[int, int, int], patch: int):
    """Register mixed RoPE's state on ``module`` under the official names: ``freqs``
    (learnable) and the positions ``freqs_t_x`` / ``freqs_t_y`` of the published grid."""
    width, depth, heads = dims
    module.freqs = nn.Parameter(mixed_rope_init(depth, heads, width // heads, arch.rope_theta))
    t_x, t_y = grid_positions(arch.image_size // patch, arch.image_size // patch)
    module.register_buffer("freqs_t_x", t_x)
    module.register_buffer("freqs_t_y", t_y)


def mixed_rope_angles(module: nn.Module, heads: int, side: int) -> torch.Tensor | None:
    """Angles (depth, nh, side^2, hs/2) of ``module``'s mixed RoPE (None without RoPE); the
    positions are recomputed for another grid than the published one."""
    if getattr(module, "freqs", None) is None:
        return None
    t_x, t_y = module.freqs_t_x, module.freqs_t_y
    if t_x.numel() != side * side:
        t_x, t_y = (t.to(module.freqs.device) for t in grid_positions(side, side))
    return rope_angles(module.freqs.float(), t_x, t_y, heads)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention; RoPE on the tokens [start, end) when angles are given."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, angles=None, span=(0, 0)) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        if angles is not None:  # (nh, N_img, hs/2) on the image tokens only
            a, e = span
            q = torch.cat([q[:, :, :a], rotate(q[:, :, a:e], angles), q[:, :, e:]], dim=2)
            k = torch.cat([k[:, :, :a], rotate(k[:, :, a:e], angles), k[:, :, e:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm ViT block with layer scale (timm / DINOv2 names)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, init_values: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, z=None, angles=None, span=(0, 0), latents: int = 0) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), angles, span))
        return x + self.ls2(self.mlp(self.norm2(x)))


def modulate_latents(x: torch.Tensor, shift, scale, latents: int) -> torch.Tensor:
    """x * scale + shift on the last ``latents`` tokens only (MoVQ, as the official code)."""
    return torch.cat([x[:, :-latents], x[:, -latents:] * scale + shift], dim=1)


class MoVQBlock(nn.Module):
    """Decoder block whose norms (no affine) are modulated per latent token by z."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, latent_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 4 * dim))

    def forward(self, x, z=None, angles=None, span=(0, 0), latents: int = 0) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.adaLN_modulation(z).chunk(4, dim=-1)  # (B, L, W)
        h = modulate_latents(self.norm1(x), shift1, scale1, latents)
        x = x + self.attn(h, angles, span)
        return x + self.mlp(modulate_latents(self.norm2(x), shift2, scale2, latents))


class MoVQNorm(nn.Module):
    """Final LayerNorm (no affine) modulated per latent token by z."""

    def __init__(self, latent_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor, latents: int) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(z).chunk(2, dim=-1)
        return modulate_latents(self.norm(x), shift, scale, latents)


class ViT(nn.Module):
    """The timm ViT parts the tokenizers use, under timm's names: ``patch_embed``,
    ``cls_token``, ``pos_embed`` (with the class position), ``blocks``, ``norm``."""

    def __init__(self, dim, depth, heads, patch, size, arch: TokenArch, movq: bool, cls: bool):
        super().__init__()
        self.patch_embed = PatchEmbed(size, patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        if movq:
            blocks = (MoVQBlock(dim, heads, arch.mlp_ratio, arch.channels) for _ in range(depth))
            self.norm = MoVQNorm(arch.channels, dim)
        else:
            blocks = (Block(dim, heads, arch.mlp_ratio, arch.init_values) for _ in range(depth))
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(blocks)

    def init_weights(self) -> None:
        """timm's ViT init: linears truncated-normal 0.02 with zero bias, position embedding
        truncated-normal 0.02, class token N(0, 1e-6); MoVQ modulations zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, MoVQBlock | MoVQNorm):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)

    def run(self, x, z, angles, prefix: int, latents: int) -> torch.Tensor:
        """Blocks then the final norm on x (B, prefix + N + latents, W); RoPE ``angles``
        (depth, nh, N, hs/2) or None."""
        span = (prefix, x.shape[1] - latents)
        for i, block in enumerate(self.blocks):
            x = block(x, z, None if angles is None else angles[i], span, latents)
        return self.norm(x, z, latents) if isinstance(self.norm, MoVQNorm) else self.norm(x)


# ----------------------------------------------------------------------------- encoder


class TokenEncoder(nn.Module):
    """Image tokens, then L learnable latent tokens (+ their position embedding), through a
    ViT; the last L outputs are the latent tokens' features (B, L, W)."""

    def __init__(self, arch: TokenArch, image_size: int):
        super().__init__()
        w, p = arch.width, arch.patch
        self.side = image_size // p
        self.model = ViT(w, arch.depth, arch.heads, p, image_size, arch, False, True)
        self.latent_tokens = nn.Parameter(torch.zeros(1, arch.tokens, w))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, arch.tokens, w))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w)) if arch.mask_token else None
        self.heads = arch.heads
        if arch.rope:
            add_mixed_rope(self, arch, (w, arch.depth, arch.heads), p)

    def init_weights(self) -> None:
        """timm's ViT init; latent and mask tokens N(0, 0.02), latent positions truncated."""
        self.model.init_weights()
        nn.init.normal_(self.latent_tokens, std=0.02)
        trunc_normal_(self.latent_pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: images (B, 3, H, W) in [-1, 1]; mask (B, N) bool, True where the image token
        is replaced by the mask token. Returns the latent tokens' features (B, L, W)."""
        x = self.model.patch_embed(images)  # (B, N, W)
        if x.shape[1] != self.side * self.side:
            raise ValueError(
                f"{images.shape[-1]} px images; the encoder was built for "
                f"{self.side * self.model.patch_embed.patch_size[0]} px"
            )
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        cls = self.model.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.model.pos_embed  # always (the official quirk)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        x = torch.cat([x, latents], dim=1)  # (B, 1 + N + L, W)
        L = latents.shape[1]
        x = self.model.run(x, None, mixed_rope_angles(self, self.heads, self.side), 1, L)
        return x[:, -L:]


# ----------------------------------------------------------------------------- decoder


class ToPixel(nn.Module):
    """Per-token linear prediction (``to_pixel.model``) of patch pixels, then unpatchify."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.model = nn.Linear(dim, 3 * patch * patch)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """(B, side^2, W) -> (B, 3, side*p, side*p); each patch's values in (p, q, c) order."""
        return rearrange(
            self.model(x), "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=self.patch, q=self.patch
        )


class TokenDecoder(nn.Module):
    """Mask tokens at the image positions, then the projected latent tokens (+ their
    position embedding), through a ViT (MoVQ blocks modulated by the raw z when ``movq``);
    the image tokens' outputs -> pixels (or, for an auxiliary decoder, features (B, N, W))."""

    def __init__(self, arch: TokenArch, image_size: int, dims=None, to_pixel: bool = True):
        super().__init__()
        w, depth, heads = dims or (arch.dec_width, arch.dec_depth, arch.dec_heads)
        p = arch.decoder_patch
        self.side, self.heads = image_size // p, heads
        self.model = ViT(w, depth, heads, p, image_size, arch, arch.movq, arch.dec_cls_token)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, arch.tokens, w))
        self.to_pixel = ToPixel(w, p) if to_pixel else None
        if arch.rope:
            add_mixed_rope(self, arch, (w, depth, heads), p)
        # in the checkpoints but never used: the patch embedding (and, with RoPE, the
        # absolute positions); frozen, so that no optimizer or DDP waits for their gradients
        self.model.patch_embed.requires_grad_(False)
        self.model.pos_embed.requires_grad_(not arch.rope)

    @property
    def width(self) -> int:
        return self.mask_token.shape[-1]

    def init_weights(self) -> None:
        """timm's ViT init; mask token N(0, 0.02), latent positions truncated-normal 0.02."""
        self.model.init_weights()
        nn.init.normal_(self.mask_token, std=0.02)
        trunc_normal_(self.latent_pos_embed, std=0.02)
        if self.to_pixel is not None:
            trunc_normal_(self.to_pixel.model.weight, std=0.02)
            nn.init.zeros_(self.to_pixel.model.bias)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Args: h (B, L, W) the projected latent tokens; z (B, L, D) the raw latent (MoVQ's
        modulation). Returns images (B, 3, H, W) (features (B, N, W) without ``to_pixel``)."""
        b, n = h.shape[0], self.side * self.side
        x = self.mask_token.expand(b, n, -1)
        prefix = 0
        if self.model.cls_token is not None:
            x = torch.cat([self.model.cls_token.expand(b, -1, -1), x], dim=1)
            prefix = 1
        angles = mixed_rope_angles(self, self.heads, self.side)
        if angles is None:  # absolute positions only without RoPE
            x = x + self.model.pos_embed[:, 1 - prefix :]
        x = torch.cat([x, h + self.latent_pos_embed], dim=1)  # (B, prefix + N + L, W)
        x = self.model.run(x, z, angles, prefix, h.shape[1])
        x = x[:, prefix : prefix + n]  # (B, N, W)
        return x if self.to_pixel is None else self.to_pixel(x, self.side)


# ----------------------------------------------------------------------------- SoftVQ


class SoftVQuantizer(nn.Module):
    """SoftVQ (Chen et al. 2024, Sec. 3.1): each token is replaced by the softmax-weighted
    mean of its codebook's l2-normalised codewords, p = softmax(<z/|z|, e/|e|> / tau),
    z_q = sum_k p_k e_k / |e_k|; the L tokens are split into ``codebooks`` contiguous
    segments, one codebook each. The logits see the codebook detached (as the official
    code): the codewords learn through z_q only."""

    def __init__(self, codebooks: int, size: int, dim: int, tau: float):
        super().__init__()
        self.tau = tau
        self.embedding = nn.Parameter(torch.empty(codebooks, size, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Uniform(-1/K, 1/K), then unit norm (the official init)."""
        nn.init.uniform_(
            self.embedding, -1.0 / self.embedding.shape[1], 1.0 / self.embedding.shape[1]
        )
        self.embedding.data = F.normalize(self.embedding.data, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: z (B, L, D). Returns z_q (B, L, D) and the logits (n_cb, B * L / n_cb, K)."""
        n, b = self.embedding.shape[0], z.shape[0]
        if z.shape[1] % n:
            raise ValueError(f"{z.shape[1]} tokens do not split into {n} codebooks")
        zs = F.normalize(rearrange(z, "b (n s) d -> n (b s) d", n=n), dim=-1)
        codes = F.normalize(self.embedding, dim=-1)  # (n_cb, K, D)
        logits = torch.einsum("nbd,nkd->nbk", zs, codes.detach())
        probs = F.softmax(logits / self.tau, dim=-1)
        z_q = torch.einsum("nbk,nkd->nbd", probs, codes)
        return rearrange(z_q, "n (b s) d -> b (n s) d", b=b), logits
