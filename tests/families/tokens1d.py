"""A family pair defined only in the tests, loaded as an experiment's ``plugins:`` file:
``toytokens``, a tokenizer from images to 1-D tokens (C, N) with per-element latent
statistics (``toytokens-scalar``: the same with one scalar), and ``toydit``, a small
transformer over those tokens. They prove that nothing under ``latentforge.platform``
assumes a grid latent or names a family.

Import it through :func:`latentforge.registry.load_plugins` (as the experiment does), not
as a module of the ``tests`` package: a second import would register the families twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import GeneratorConfig, TokenizerConfig
from latentforge.generators.base import Generator
from latentforge.generators.blocks import LabelEmbedder, TimestepEmbedder
from latentforge.registry import GENERATORS, TOKENIZERS
from latentforge.tokenizers.base import Tokenizer

# ----------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokensArch:
    """Architecture of one named tokenizer config."""

    channels: int  # C: width of a token
    tokens: int  # N: tokens per image, whatever the resolution
    patch: int  # side of the pixel patches the encoder reads
    width: int  # hidden width


TOKENIZER_CONFIGS = {"tiny": TokensArch(channels=4, tokens=16, patch=8, width=32)}


@dataclass
class ToyTokensConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for the toy 1-D token tokenizer."""

    name: str = "toytokens"
    config: str = "tiny"  # key of TOKENIZER_CONFIGS
    latent_channels: int | None = None  # override the named config's token width
    loss: Literal["l1", "l2"] = "l2"


def tokens_arch(cfg: ToyTokensConfig) -> TokensArch:
    """The named config with the overrides; raises naming the key (the family's check)."""
    if cfg.config not in TOKENIZER_CONFIGS:
        known = ", ".join(TOKENIZER_CONFIGS)
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {known}")
    arch = TOKENIZER_CONFIGS[cfg.config]
    if cfg.latent_channels is not None:
        if cfg.latent_channels < 1:
            raise ValueError(
                f"tokenizer.latent_channels: must be positive, got {cfg.latent_channels}"
            )
        arch = TokensArch(cfg.latent_channels, arch.tokens, arch.patch, arch.width)
    return arch


def tokens_latent_shape(cfg: ToyTokensConfig, resolution: int) -> tuple[int, int]:
    """(C, N) of the tokens of ``resolution`` x ``resolution`` images, without building."""
    arch = tokens_arch(cfg)
    if resolution % arch.patch:
        raise ValueError(
            f"data.resolution {resolution} is not divisible by the tokenizer's patch {arch.patch}"
        )
    return (arch.channels, arch.tokens)


class ToyTokens(Tokenizer):
    """Patch embedding, then a learned mix of the patches into N tokens (and back)."""

    def __init__(self, arch: TokensArch, resolution: int, loss: str = "l2"):
        super().__init__()
        self.arch, self.loss_kind = arch, loss
        self.side = resolution // arch.patch  # patches per side
        patches, w = self.side**2, arch.width
        self.embed = nn.Conv2d(3, w, arch.patch, stride=arch.patch)
        self.to_tokens = nn.Linear(patches, arch.tokens)  # mixes positions
        self.to_latent = nn.Linear(w, arch.channels)
        self.from_latent = nn.Linear(arch.channels, w)
        self.to_patches = nn.Linear(arch.tokens, patches)
        self.unembed = nn.ConvTranspose2d(w, 3, arch.patch, stride=arch.patch)

    def latent_shape(self, resolution: int) -> tuple[int, int]:
        return (self.arch.channels, self.arch.tokens)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Args: images float [-1, 1], (B, 3, H, W). Returns tokens (B, C, N)."""
        h = self.embed(images).flatten(2)  # (B, D, P) with P = side * side patches
        h = F.gelu(self.to_tokens(h))  # (B, D, N)
        return self.to_latent(h.transpose(1, 2)).transpose(1, 2)  # (B, C, N)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Args: tokens (B, C, N). Returns images (B, 3, H, W), roughly [-1, 1]."""
        h = F.gelu(self.from_latent(latents.transpose(1, 2)))  # (B, N, D)
        h = self.to_patches(h.transpose(1, 2))  # (B, D, P)
        h = h.unflatten(2, (self.side, self.side))  # (B, D, side, side)
        return self.unembed(h)

    def loss(self, images: torch.Tensor, nimg: int) -> dict[str, torch.Tensor]:
        recon = self.decode(self.encode(images))
        err = (recon - images).abs() if self.loss_kind == "l1" else (recon - images).pow(2)
        loss = err.mean()
        return {"loss": loss, "recon": loss.detach()}


def build_toytokens(cfg: ToyTokensConfig, resolution: int) -> ToyTokens:
    tokens_latent_shape(cfg, resolution)  # the resolution fits the patches
    return ToyTokens(tokens_arch(cfg), resolution, cfg.loss)


TOKENIZERS.register(
    "toytokens",
    config=ToyTokensConfig,
    latent_shape=tokens_latent_shape,
    normalization="element",
    check=tokens_arch,
)(build_toytokens)


@dataclass
class ToyTokensScalarConfig(ToyTokensConfig):
    """``toytokens`` whose latents are normalised by one scalar mean / std."""

    name: str = "toytokens-scalar"


TOKENIZERS.register(
    "toytokens-scalar",
    config=ToyTokensScalarConfig,
    latent_shape=tokens_latent_shape,
    normalization="scalar",
    check=tokens_arch,
)(build_toytokens)


# ----------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class TokenDiTArch:
    """Architecture of one named generator config."""

    depth: int
    width: int
    heads: int


GENERATOR_CONFIGS = {"tiny": TokenDiTArch(depth=2, width=64, heads=4)}


@dataclass
class ToyDiTConfig(GeneratorConfig):
    """Schema of ``generator:`` for the toy transformer over 1-D tokens."""

    name: str = "toydit"
    config: str = "tiny"  # key of GENERATOR_CONFIGS
    class_dropout: float = 0.1


def dit_arch(cfg: ToyDiTConfig) -> TokenDiTArch:
    if cfg.config not in GENERATOR_CONFIGS:
        known = ", ".join(GENERATOR_CONFIGS)
        raise KeyError(f"unknown generator config {cfg.config!r}; known: {known}")
    if not 0 <= cfg.class_dropout < 1:
        raise ValueError(f"generator.class_dropout: must be in [0, 1), got {cfg.class_dropout}")
    return GENERATOR_CONFIGS[cfg.config]


class Block(nn.Module):
    """Pre-norm self-attention and MLP with adaLN-Zero conditioning (DiT)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, T, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        qkv = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, T, hs)
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ToyDiT(Generator):
    """A class-conditional transformer over the N tokens of (C, N) latents."""

    def __init__(self, arch: TokenDiTArch, latent_shape, num_classes: int, class_dropout: float):
        super().__init__()
        channels, tokens = latent_shape
        self.num_classes = num_classes
        self.embed = nn.Linear(channels, arch.width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, arch.width))
        self.t_embedder = TimestepEmbedder(arch.width)
        self.y_embedder = LabelEmbedder(num_classes, arch.width, class_dropout)
        self.blocks = nn.ModuleList(Block(arch.width, arch.heads) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(arch.width, channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's: small random positions; adaLN-Zero (gates and the output layer start at
        zero, so every block starts as the identity and the output at 0)."""
        nn.init.normal_(self.pos, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Args: x_t (B, C, N) noisy tokens, t (B,) flow time, y (B,) labels (num_classes:
        the null class). Returns the prediction (B, C, N)."""
        x = self.embed(x_t.transpose(1, 2)) + self.pos  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        return self.out(self.norm(x)).transpose(1, 2)  # (B, C, N)


def build_toydit(
    cfg: ToyDiTConfig,
    latent_shape: tuple[int, ...],
    num_classes: int,
    repa_dim: int = 0,
    reg_dim: int = 0,
) -> ToyDiT:
    if len(latent_shape) != 2:
        raise ValueError(f"toydit generates (C, N) tokens, not latents of shape {latent_shape}")
    if repa_dim or reg_dim:
        raise ValueError("toydit has neither a REPA projector nor REG's class token")
    return ToyDiT(dit_arch(cfg), tuple(latent_shape), num_classes, cfg.class_dropout)


GENERATORS.register("toydit", config=ToyDiTConfig, check=dit_arch)(build_toydit)
