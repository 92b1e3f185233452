"""DiT^DH: a diffusion transformer with a wide, shallow head, the generator of RAE.

Zheng, Ma, Tong & Xie, "Diffusion Transformers with Representation Autoencoders" (2025),
Sec. 4 and official code bytetriper/RAE (``src/stage2/models/DDT.py``, ``DiTwDDTHead``),
after DDT (Wang et al. 2025, "Decoupled Diffusion Transformer"). A trunk of LightningDiT
blocks (RMSNorm, SwiGLU, 2-D RoPE, a fixed sin-cos position embedding) reads the noisy
latent and the condition ``c = silu(t_emb + y_emb)``; its output becomes a per-token
condition ``s = s_projector(silu(t_emb + trunk(x)))``; a few wide head blocks (no position
embedding, RoPE of their own width) read the latent again, embedded anew, and are
modulated **per token** by ``s``, as is the final layer. The condition passes SiLU twice
(once here, once inside every adaLN layer), as in the official code. The time embedding is
Gaussian Fourier features of raw t with a frozen random frequency vector ``W``.

Parameter names and shapes follow the official ``stage2_model.pt``, so published weights
load with ``strict=True``. The official network lives in the rectified-flow convention
(t = 0 data, t = 1 noise, output d x_t / dt = noise - data); :meth:`DiTDH.forward`
converts it to ours (t = 1 data, velocity data - noise, see ``generators/transport.py``),
so the platform's transport, samplers and guidance use it unchanged. The null class of
guidance is id ``num_classes`` in both.
"""

from __future__ import annotations

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
    PatchEmbed,
    VisionRoPE,
    sincos_2d,
)
from latentforge.generators.lightningdit import latent_grid
from latentforge.generators.transport import flip_time, flip_velocity
from latentforge.registry import GENERATORS
from latentforge.state_dicts import mismatch, read_state_dict


@dataclass(frozen=True)
class DiTDHArch:
    """Architecture of one named config: (trunk, head) pairs."""

    depth: tuple[int, int]
    hidden: tuple[int, int]
    heads: tuple[int, int]
    patch: int = 1
    mlp_ratio: float = 4.0

    def part(self, i: int) -> DiTArch:
        """The block architecture of the trunk (0) or the head (1)."""
        return DiTArch(
            depth=self.depth[i],
            hidden=self.hidden[i],
            heads=self.heads[i],
            patch=self.patch,
            mlp_ratio=self.mlp_ratio,
        )


CONFIGS: dict[str, DiTDHArch] = {
    # RAE's ImageNet models (configs/stage2/training/ImageNet256/*.yaml)
    "DiTDH-XL": DiTDHArch(depth=(28, 2), hidden=(1152, 2048), heads=(16, 16)),
    "DiTDH-S": DiTDHArch(depth=(12, 2), hidden=(384, 2048), heads=(6, 16)),
    # the embedded default: shapes-vit features (128 x 8 x 8) on a CPU laptop
    "shapes": DiTDHArch(depth=(4, 2), hidden=(192, 256), heads=(3, 4)),
    "tiny": DiTDHArch(depth=(2, 1), hidden=(32, 48), heads=(2, 2)),
}


@dataclass
class DiTDHConfig(GeneratorConfig):
    """Schema of ``generator:`` for DiT^DH."""

    name: str = "ditdh"
    config: str = "shapes"  # key of CONFIGS
    class_dropout: float = 0.1
    grad_checkpointing: bool = False  # recompute block activations in backward (memory)
    transport: TransportConfig = field(default_factory=TransportConfig)
    # RAE's stage2_model.pt (its "ema" entry when it has one) or our safetensors: loaded
    # strictly; with train.generator_images: 0 it is the generator
    weights: str | None = None
    # the latent normalisation the weights were trained with, replacing the extracted
    # statistics (:func:`latentforge.models.read_latent_stats`)
    latent_stats: str | None = None


# ------------------------------------------------------------------------ layers


class GaussianFourierEmbedder(nn.Module):
    """Time embedding [sin, cos](2 pi t W) with a frozen random W, then an MLP."""

    def __init__(self, hidden: int, size: int = 256):
        super().__init__()
        # frozen: a persistent buffer (key ``W`` as in the official state_dict)
        self.register_buffer("W", torch.randn(size))
        self.mlp = nn.Sequential(nn.Linear(2 * size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.W[None] * (2 * math.pi)  # (B, size)
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2 size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TokenBlock(Block):
    """Adaptive-norm block modulated per token: the condition is (B, T, D)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=-1)  # (B, T, D)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods
            shift_msa = shift_mlp = 0.0
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn(h, rope)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class TokenFinalLayer(FinalLayer):
    """Final layer modulated per token (no gate)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, T, D) each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# ------------------------------------------------------------------------ model


class DiTDH(Generator):
    """DiT^DH backbone: (x_t, t, y) -> velocity of the same shape as x_t (our convention)."""

    def __init__(
        self,
        arch: DiTDHArch,
        latent_shape: tuple[int, ...],
        num_classes: int,
        class_dropout: float = 0.1,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        c, h, w = latent_grid(latent_shape, arch.patch)
        self.tokens_1d = len(latent_shape) == 2
        self.arch = arch
        self.in_channels = c
        self.num_classes = num_classes
        self.grid = (h // arch.patch, w // arch.patch)
        self.grad_checkpointing = grad_checkpointing
        trunk, head = arch.part(0), arch.part(1)
        d_s, d_x = arch.hidden
        self.s_embedder = PatchEmbed(arch.patch, c, d_s)  # the trunk's input
        self.x_embedder = PatchEmbed(arch.patch, c, d_x)  # the head's input
        self.t_embedder = GaussianFourierEmbedder(d_s)
        self.y_embedder = LabelEmbedder(num_classes, d_s, class_dropout)
        tokens = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d_s), requires_grad=False)
        self.enc_feat_rope = VisionRoPE(d_s // trunk.heads, *self.grid)
        self.dec_feat_rope = VisionRoPE(d_x // head.heads, *self.grid)
        self.s_projector = nn.Linear(d_s, d_x) if d_s != d_x else nn.Identity()
        # one list, trunk then head, as the official keys blocks.{0..depth-1}
        self.blocks = nn.ModuleList(
            [Block(trunk) for _ in range(trunk.depth)]
            + [TokenBlock(head) for _ in range(head.depth)]
        )
        self.final_layer = TokenFinalLayer(d_x, arch.patch, c, rms=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: PyTorch's default for Linear layers, xavier patch embeddings,
        N(0, 0.02) label table and t-MLP, fixed sin-cos pos_embed, and adaLN + final layer
        at zero (every block starts as the identity, the output at exactly 0)."""
        for embedder in (self.s_embedder, self.x_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        pos = sincos_2d(self.arch.hidden[0], *self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p = self.arch.patch
        return rearrange(
            x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid[0], w=self.grid[1], p=p, q=p
        )

    def _run(self, block: nn.Module, x, c, rope) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, use_reentrant=False)
        return block(x, c, rope)

    def rae_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The official network in RAE's convention.

        Args: x (B, C, H, W) or (B, C, N) noisy latent; t (B,) time with t = 0 data,
        t = 1 noise; y (B,) class ids (``num_classes`` = null). Shapes: returns the
        rectified-flow velocity d x_t / dt = noise - data, of x's shape.
        """
        x_in = x.unsqueeze(2) if self.tokens_1d else x  # (B, C, N) -> (B, C, 1, N)
        t_emb = self.t_embedder(t)  # (B, D_s)
        c = nn.functional.silu(t_emb + self.y_embedder(y))  # (B, D_s)
        s = self.s_embedder(x_in) + self.pos_embed  # (B, T, D_s)
        trunk = self.arch.depth[0]
        for block in self.blocks[:trunk]:
            s = self._run(block, s, c, self.enc_feat_rope)
        s = self.s_projector(nn.functional.silu(t_emb[:, None] + s))  # (B, T, D_x)
        h = self.x_embedder(x_in)  # (B, T, D_x), no position embedding in the head
        for block in self.blocks[trunk:]:
            h = self._run(block, h, s, self.dec_feat_rope)
        out = self.unpatchify(self.final_layer(h, s))  # (B, C, H, W)
        return out.squeeze(2) if self.tokens_1d else out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Args: x_t (B, C, H, W) or (B, C, N), t (B,) flow time in [0, 1] (1 = data),
        y (B,) class ids (``num_classes`` = null). Shapes: returns the velocity
        d x_t / dt (data - noise) of x_t's shape: ``-rae_forward(x_t, 1 - t, y)``."""
        return flip_velocity(self.rae_forward(x_t, flip_time(t), y))


def resolve_arch(cfg: DiTDHConfig) -> DiTDHArch:
    """The named config; raises for what DiT^DH does not do (REPA, REG)."""
    return named_arch(CONFIGS, cfg, "DiT^DH")


def build_ditdh(
    cfg: DiTDHConfig,
    latent_shape: tuple[int, ...],
    num_classes: int,
    repa_dim: int = 0,
    reg_dim: int = 0,
) -> DiTDH:
    """``repa_dim`` / ``reg_dim`` are part of the builder interface; DiT^DH takes neither
    (:func:`resolve_arch` refuses the transport weights that would ask for them)."""
    return DiTDH(
        resolve_arch(cfg),
        tuple(latent_shape),
        num_classes,
        cfg.class_dropout,
        grad_checkpointing=cfg.grad_checkpointing,
    )


# ------------------------------------------------------------------ published weights

PUBLISHED_HINT = (
    "RAE's DiT^DH-XL for DINOv2-B latents is in the Hugging Face repo "
    "nyu-visionx/RAE-collections, file DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/"
    "stage2_model.pt (latent statistics: stats/dinov2/wReg_base/imagenet1k/stat.pt); "
    "download it (hf download nyu-visionx/RAE-collections <file> --local-dir models) and set "
    "generator.weights=<path> (and generator.latent_stats=<stat.pt>)"
)

# wrappers of the trained module, never part of it: DDP and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the DDP / torch.compile prefixes, in any order or repetition."""
    out = {}
    for key, value in sd.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_published(model: DiTDH, path: str | Path) -> None:
    """Load ``generator.weights`` strictly: the ``ema`` entry of a training checkpoint, as
    RAE's sampler does, else the file as a bare state_dict; naming what does not match."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"generator.weights: {file} does not exist ({PUBLISHED_HINT})")
    sd = read_state_dict(file, entries=("ema",))
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        entries = ", ".join(sorted(map(str, sd)))
        raise ValueError(
            f"generator.weights {path}: a training checkpoint without 'ema' weights "
            f"(entries: {entries}); RAE samples from the EMA"
        )
    sd = strip_wrappers(sd)
    if differs := mismatch(model.state_dict(), sd):
        arch = model.arch
        raise ValueError(
            f"generator.weights {path}: not a checkpoint of this DiT^DH (hidden "
            f"{list(arch.hidden)}, depth {list(arch.depth)}, {model.in_channels} latent "
            f"channels): {differs} (other shapes as (key, file, expected))"
        )
    model.load_state_dict(sd, strict=True)


GENERATORS.register(
    "ditdh",
    config=DiTDHConfig,
    check=resolve_arch,
    load_published=load_published,
    weights_hint=PUBLISHED_HINT,
)(build_ditdh)
