"""SiT on 1-D token latents (C, N): the generator of MAETok and SoftVQ-VAE.

SiT: Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
Interpolant Transformers" (2024): DiT's backbone (adaLN-Zero blocks with LayerNorm, a GELU
MLP, no learned sigma) read as a velocity field. MAETok (Chen et al. 2025, "Masked
Autoencoders Are Effective Tokenizers for Diffusion Models", arXiv:2502.03444) and
SoftVQ-VAE (Chen et al. 2024, arXiv:2412.10958) run it on their 1-D latent tokens; official
code Hhhhhhao/continuous_tokenizer, ``modelling/sit.py`` with ``vae_1d=True``: each token's
C channels enter through a Linear layer (``x_embedder``), a fixed 1-D sin-cos table whose
sin and cos *alternate* (even dimensions sin, odd cos, as in Vaswani et al. 2017) is added,
and the final layer maps each token back to C channels; qk-norm is optional (off in the
official scripts' defaults).

Parameter names and shapes follow the official module, so the published weights
(``model.safetensors`` beside a ``config.json`` in the Hugging Face repos
MAETok/sit-xl_maetok-b-128 and SoftVQVAE/sit-xl_softvq-*) load with ``strict=True``.
The official network reads tokens (B, N, C) in REPA's convention (t = 0 data, t = 1 noise,
x_t = (1 - t) x + t noise, output noise - data); :meth:`SiT.forward` takes the platform's
channels-first latents (B, C, N) and time (t = 1 data) and converts, as DiT^DH does. The
official samplers' null class is a hard-coded 1000, which is ``num_classes`` on ImageNet.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentforge.config import GeneratorConfig, TransportConfig
from latentforge.generators.base import Generator, named_arch
from latentforge.generators.blocks import (
    Block,
    DiTArch,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
)
from latentforge.generators.ditdh import strip_wrappers
from latentforge.generators.transport import flip_time, flip_velocity
from latentforge.registry import GENERATORS
from latentforge.state_dicts import mismatch, read_state_dict


@dataclass(frozen=True)
class SiTArch:
    """Architecture of one named config (patch 1: a token is a patch)."""

    depth: int
    hidden: int
    heads: int
    mlp_ratio: float = 4.0

    def block(self, qk_norm: bool) -> DiTArch:
        """DiT's block: LayerNorm without affine, GELU(tanh) MLP, no RoPE, qkv with bias."""
        return DiTArch(
            depth=self.depth,
            hidden=self.hidden,
            heads=self.heads,
            patch=1,
            use_swiglu=False,
            use_rope=False,
            use_rmsnorm=False,
            use_qknorm=qk_norm,
            mlp_ratio=self.mlp_ratio,
        )


CONFIGS: dict[str, SiTArch] = {
    # the official SiT_models on 1-D tokens (MAETok / SoftVQ-VAE publish SiT-XL/1)
    "SiT-XL/1": SiTArch(depth=28, hidden=1152, heads=16),
    "SiT-L/1": SiTArch(depth=24, hidden=1024, heads=16),
    "SiT-B/1": SiTArch(depth=12, hidden=768, heads=12),
    # the embedded default: a few tokens (8-16 of 4-16 channels at 32 px) on a CPU laptop
    "shapes": SiTArch(depth=6, hidden=192, heads=3),
    "tiny": SiTArch(depth=2, hidden=32, heads=2),
}


@dataclass
class SiTConfig(GeneratorConfig):
    """Schema of ``generator:`` for SiT on 1-D tokens."""

    name: str = "sit"
    config: str = "shapes"  # key of CONFIGS
    class_dropout: float = 0.1
    qk_norm: bool = False  # LayerNorm on queries and keys (the official --qk-norm)
    grad_checkpointing: bool = False  # recompute block activations in backward (memory)
    transport: TransportConfig = field(default_factory=TransportConfig)
    # the published model.safetensors (its config.json beside it is checked), an official
    # training checkpoint (its "ema" entry) or our safetensors: loaded strictly; with
    # train.generator_images: 0 it is the generator
    weights: str | None = None
    # the latent normalisation the weights were trained with (the tokenizer's scalar
    # vq_mean / vq_std as a JSON {"mean": ..., "std": ...})
    latent_stats: str | None = None


# ------------------------------------------------------------------------ model


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """Fixed 1-D position table (length, dim): dimension 2k is sin(p w_k), 2k + 1 is
    cos(p w_k), w_k = 10000^(-2k / dim) (Vaswani et al. 2017, Sec. 3.5), in fp32 as the
    official table is built."""
    if dim % 2:
        raise ValueError(f"the sin-cos table needs an even width, not {dim}")
    two_k = 2 * torch.arange(dim // 2, dtype=torch.float32)
    freqs = torch.exp(two_k * -(math.log(10000.0) / dim))  # (dim / 2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs  # (length, dim / 2)
    pairs = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (length, dim / 2, 2)
    return rearrange(pairs, "n k two -> n (k two)")  # sin, cos, sin, cos, ...


class SiT(Generator):
    """SiT backbone on 1-D tokens: (x_t (B, C, N), t, y) -> velocity (B, C, N)."""

    def __init__(
        self,
        arch: SiTArch,
        latent_shape: tuple[int, ...],
        num_classes: int,
        class_dropout: float = 0.1,
        qk_norm: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if len(latent_shape) != 2:
            raise ValueError(
                f"SiT here reads 1-D token latents (C, N), not {tuple(latent_shape)}; "
                "for grids use generator lightningdit (its DiT- configs are SiT's backbone)"
            )
        c, n = latent_shape
        d = arch.hidden
        self.arch, self.qk_norm = arch, qk_norm
        self.in_channels, self.tokens = c, n
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = nn.Linear(c, d)  # per token: (B, N, C) -> (B, N, D)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d, class_dropout)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, d), requires_grad=False)
        self.blocks = nn.ModuleList(Block(arch.block(qk_norm)) for _ in range(arch.depth))
        self.final_layer = FinalLayer(d, 1, c, rms=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear layers (the token embedding included), N(0, 0.02) label
        table and t-MLP, the fixed sin-cos pos_embed, and adaLN + final layer at zero, so
        every block starts as the identity and the output at exactly 0."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        self.pos_embed.data.copy_(sincos_1d(self.arch.hidden, self.tokens).unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def sit_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The official network in its own layout and convention.

        Args: x (B, N, C) noisy tokens; t (B,) time with t = 0 data, t = 1 noise; y (B,)
        class ids (``num_classes`` = null). Shapes: returns the velocity
        d x_t / dt = noise - data, (B, N, C).
        """
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, None, use_reentrant=False)
            else:
                h = block(h, c, None)
        return self.final_layer(h, c)  # (B, N, C)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Args: x_t (B, C, N) channels-first tokens, t (B,) flow time in [0, 1] (1 = data),
        y (B,) class ids (``num_classes`` = null). Shapes: returns the velocity
        d x_t / dt (data - noise), (B, C, N): ``-sit_forward(x_t^T, 1 - t, y)^T``."""
        tokens = rearrange(x_t, "b c n -> b n c")
        v = self.sit_forward(tokens, flip_time(t), y)
        return flip_velocity(rearrange(v, "b n c -> b c n"))


def resolve_arch(cfg: SiTConfig) -> SiTArch:
    """The named config; raises for what this SiT does not do (REPA, REG)."""
    return named_arch(CONFIGS, cfg, "this SiT")


def build_sit(
    cfg: SiTConfig,
    latent_shape: tuple[int, ...],
    num_classes: int,
    repa_dim: int = 0,
    reg_dim: int = 0,
) -> SiT:
    """``repa_dim`` / ``reg_dim`` are part of the builder interface; SiT takes neither
    (:func:`resolve_arch` refuses the transport weights that would ask for them)."""
    return SiT(
        resolve_arch(cfg),
        tuple(latent_shape),
        num_classes,
        cfg.class_dropout,
        qk_norm=cfg.qk_norm,
        grad_checkpointing=cfg.grad_checkpointing,
    )


# ------------------------------------------------------------------ published weights

PUBLISHED_HINT = (
    "SiT-XL/1 on MAETok-B-128 latents is the Hugging Face repo MAETok/sit-xl_maetok-b-128, "
    "on SoftVQ-VAE latents SoftVQVAE/sit-xl_softvq-{l,bl,b}-{64,32} (config.json + "
    "model.safetensors each); download one (hf download MAETok/sit-xl_maetok-b-128 "
    "--local-dir models/sit-xl_maetok-b-128) and set generator.weights=<that folder>/"
    "model.safetensors (its config.json is checked beside it)"
)
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # PyTorchModelHubMixin's names


def published_files(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, its config.json or None): a hub folder or a file in one."""
    file = Path(path).expanduser()
    if file.is_dir():
        found = [file / name for name in HUB_WEIGHTS if (file / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"generator.weights: {file} holds none of {', '.join(HUB_WEIGHTS)} "
                f"({PUBLISHED_HINT})"
            )
        file = found[0]
    if not file.is_file():
        raise FileNotFoundError(f"generator.weights: {file} does not exist ({PUBLISHED_HINT})")
    config = file.parent / "config.json"
    return file, config if file.name in HUB_WEIGHTS and config.is_file() else None


def config_mismatch(model: SiT, config: Path) -> list[str]:
    """What the hub's config.json (the official constructor's arguments) says differently
    from ``model``; the number of heads shapes no weight, so only this file can tell."""
    values = json.loads(config.read_text())
    ours = {
        "depth": model.arch.depth,
        "hidden_size": model.arch.hidden,
        "num_heads": model.arch.heads,
        "mlp_ratio": model.arch.mlp_ratio,
        "in_channels": model.in_channels,
        "input_size": model.tokens,
        "num_classes": model.num_classes,
        "qk_norm": model.qk_norm,
        "vae_1d": True,
    }
    return [
        f"{key} {values[key]!r} (expected {want!r})"
        for key, want in ours.items()
        if key in values and values[key] != want
    ]


def load_published(model: SiT, path: str | Path) -> None:
    """Load ``generator.weights`` strictly, naming what does not match: a hub folder or its
    ``model.safetensors`` (checked against its ``config.json``), an official training
    checkpoint (its ``ema`` entry, as ``inference/generate_sit.py`` reads it; DDP /
    torch.compile prefixes dropped) or a bare state_dict."""
    file, config = published_files(path)
    # the official training checkpoint also holds its argparse Namespace: a plain record
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = strip_wrappers(read_state_dict(file, entries=("ema",)))
    if differs := mismatch(model.state_dict(), sd):
        arch = model.arch
        hint = ""
        if any(".q_norm." in k for k in sd) != model.qk_norm:
            hint = f"; generator.qk_norm is {str(model.qk_norm).lower()}, the file's is not"
        raise ValueError(
            f"generator.weights {path}: not a checkpoint of this SiT (depth {arch.depth}, "
            f"hidden {arch.hidden}, {model.in_channels} channels x {model.tokens} tokens, "
            f"{model.num_classes} classes): {differs} (other shapes as (key, file, "
            f"expected)){hint}"
        )
    if config is not None and (wrong := config_mismatch(model, config)):
        raise ValueError(f"generator.weights {path}: its config.json has {', '.join(wrong)}")
    model.load_state_dict(sd, strict=True)


GENERATORS.register(
    "sit",
    config=SiTConfig,
    check=resolve_arch,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_sit)
