"""The DiT / LightningDiT family in one file, with a dict of named configs.

DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023).
LightningDiT: Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models" (2025) — DiT with SwiGLU, RMSNorm, 2-D RoPE (EVA-02 style) and
optional qk-norm. Parameter names and shapes follow the official LightningDiT release
(hustvl/LightningDiT) so its checkpoints load with ``strict=True``. The backbone knows
nothing about the noise process: ``generators/transport.py`` decides what the output means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentforge.config import GeneratorConfig, TransportConfig
from latentforge.generators.base import Generator
from latentforge.registry import GENERATORS
from latentforge.state_dicts import mismatch, read_state_dict


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


_LIGHTNING = {
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}
_DIT = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_VANILLA = dict(use_swiglu=False, use_rope=False, use_rmsnorm=False, learn_sigma=True)

CONFIGS: dict[str, DiTArch] = {
    **{
        f"LightningDiT-{size}/{p}": DiTArch(*_LIGHTNING[size], patch=p)
        for size, ps in {
            "B": (1, 2),
            "L": (2,),
            "XL": (1, 2),
            "1p0B": (1, 2),
            "1p6B": (1, 2),
        }.items()
        for p in ps
    },
    **{
        f"DiT-{size}/{p}": DiTArch(*dims, patch=p, **_VANILLA)
        for size, dims in _DIT.items()
        for p in (2, 4, 8)
    },
    # the embedded default (8x8 latents, CPU laptop) and tests
    "small": DiTArch(depth=6, hidden=192, heads=3, patch=2),
    "micro": DiTArch(depth=4, hidden=128, heads=2, patch=2),  # the 2-core demo
    "tiny": DiTArch(depth=2, hidden=64, heads=2, patch=2),
    "tiny/1": DiTArch(depth=2, hidden=64, heads=2, patch=1),  # also for 1-D token latents
}


@dataclass
class LightningDiTConfig(GeneratorConfig):
    """Schema of ``generator:`` for the DiT / LightningDiT family."""

    name: str = "lightningdit"
    config: str = "small"  # key of CONFIGS
    class_dropout: float = 0.1
    use_qknorm: bool | None = None  # None = the named config's flag
    use_swiglu: bool | None = None
    use_rope: bool | None = None
    use_rmsnorm: bool | None = None
    wo_shift: bool | None = None
    # REPA (Yu et al. 2025): block whose output a projector MLP maps to the VFM's patch
    # features; active when transport.repa_weight > 0 (SiT-XL: 8, SiT-B: 4)
    repa_depth: int = 4
    repa_projector_dim: int = 2048  # hidden width of the projector (REPA: 2048)
    grad_checkpointing: bool = False  # recompute block activations in backward (memory)
    transport: TransportConfig = field(default_factory=TransportConfig)
    # a published checkpoint (official LightningDiT .pt: its "ema" entry; DiT .pt; our
    # safetensors): loaded strictly; with train.generator_images: 0 it is the generator
    weights: str | None = None
    # the latent normalisation the weights were trained with, replacing the extracted
    # mean/std: LightningDiT's latents_stats.pt ({mean, std} of shape (1, C, 1, 1)) or a
    # JSON {"mean": [...], "std": [...]} (DiT on SD-VAE: mean 0, std 1 / 0.18215)
    latent_stats: str | None = None


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


def make_norm(dim: int, rms: bool, affine: bool) -> nn.Module:
    if rms:
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-norm and RoPE."""

    def __init__(self, dim: int, heads: int, qknorm: bool, rms: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = make_norm(head_dim, rms, True) if qknorm else nn.Identity()
        self.k_norm = make_norm(head_dim, rms, True) if qknorm else nn.Identity()

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


# ------------------------------------------------------------------------ model


class LightningDiT(Generator):
    """DiT / LightningDiT backbone: (x_t, t, y) -> prediction of the same shape as x_t."""

    def __init__(
        self,
        arch: DiTArch,
        latent_shape: tuple[int, int, int],
        num_classes: int,
        class_dropout: float = 0.1,
        repa_dim: int = 0,
        repa_depth: int = 4,
        repa_projector_dim: int = 2048,
        grad_checkpointing: bool = False,
        reg_dim: int = 0,
    ):
        """``repa_dim > 0`` adds REPA's projector (keys ``projectors.0.{0,2,4}``, as in
        sihyun-yu/REPA): an MLP hidden -> projector -> projector -> ``repa_dim`` with SiLU,
        reading the output of block ``repa_depth`` (1-based).

        ``reg_dim > 0`` adds REG (Wu et al. 2025, "Representation Entanglement for
        Generation"): the VFM's class token (``reg_dim`` wide), noised with the latent's t,
        enters as one extra token before the grid (``cls_embedder``: Linear + LayerNorm; no
        position embedding, no RoPE rotation) and its velocity is read from that token after
        the final adaLN norm (``cls_head``, zero-initialised)."""
        super().__init__()
        # 1-D tokenizers (MAETok, SoftVQ-VAE) give (C, N): N tokens of C channels, channels
        # first like images; they run as a 1 x N grid with patch 1 (half of the sin-cos and
        # RoPE dimensions then carry the token index, the other half are constant)
        self.tokens_1d = len(latent_shape) == 2
        if self.tokens_1d:
            if arch.patch != 1:
                raise ValueError(
                    f"1-D latents {tuple(latent_shape)} need patch 1, not {arch.patch}"
                )
            c, h, w = latent_shape[0], 1, latent_shape[1]
        else:
            c, h, w = latent_shape
        if h % arch.patch or w % arch.patch:
            raise ValueError(f"latent {h}x{w} is not divisible by patch {arch.patch}")
        self.arch = arch
        self.in_channels = c
        self.out_channels = 2 * c if arch.learn_sigma else c
        self.num_classes = num_classes
        self.grid = (h // arch.patch, w // arch.patch)
        d = arch.hidden
        self.x_embedder = PatchEmbed(arch.patch, c, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d, class_dropout)
        tokens = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d), requires_grad=False)
        self.feat_rope = VisionRoPE(d // arch.heads, *self.grid) if arch.use_rope else None
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.final_layer = FinalLayer(d, arch.patch, self.out_channels, arch.use_rmsnorm)
        self.grad_checkpointing = grad_checkpointing
        self.repa_depth = repa_depth if repa_dim else 0
        if repa_dim:
            if not 1 <= repa_depth <= arch.depth:
                raise ValueError(f"repa_depth {repa_depth} outside the {arch.depth} blocks")
            pd = repa_projector_dim
            mlp = [
                nn.Linear(d, pd),
                nn.SiLU(),
                nn.Linear(pd, pd),
                nn.SiLU(),
                nn.Linear(pd, repa_dim),
            ]
            self.projectors = nn.ModuleList([nn.Sequential(*mlp)])
        self.reg_dim = reg_dim
        if reg_dim:
            self.cls_embedder = nn.Sequential(nn.Linear(reg_dim, d), nn.LayerNorm(d, eps=1e-6))
            self.cls_head = nn.Linear(d, reg_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear layers, patch-embed like a Linear, N(0, 0.02) label
        table and t-MLP, fixed sin-cos pos_embed, and adaLN + final layer at zero so that
        every block starts as the identity and the output starts at exactly 0."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        pos = sincos_2d(self.arch.hidden, *self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero + ([self.cls_head] if self.reg_dim else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p = self.arch.patch
        return rearrange(
            x, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid[0], w=self.grid[1], p=p, q=p
        )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_repa: bool = False,
        cls: torch.Tensor | None = None,
    ):
        """Args: x_t (B, C, H, W), t (B,) flow time in [0, 1] (1 = data), y (B,) class ids
        (``num_classes`` = null); ``cls`` (B, reg_dim) the noised class token (REG models
        only, required there). Shapes: returns (B, C, H, W) (the first C channels when
        ``learn_sigma``); with REG, the tuple (that, (B, reg_dim) class-token prediction);
        with ``return_repa``, the projected grid tokens of block ``repa_depth``,
        (B, T, repa_dim) in row-major token order, appended."""
        if (cls is None) != (not self.reg_dim):
            raise ValueError(
                "REG models take the noised class token (cls=...)"
                if self.reg_dim
                else "cls= needs a model built with reg_dim > 0"
            )
        x_in = x_t.unsqueeze(2) if self.tokens_1d else x_t  # (B, C, N) -> (B, C, 1, N)
        x = self.x_embedder(x_in) + self.pos_embed  # (B, T, D)
        prefix = 0
        if cls is not None:
            x = torch.cat([self.cls_embedder(cls.to(x.dtype)).unsqueeze(1), x], dim=1)
            prefix = 1
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        projected = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
            if return_repa and i == self.repa_depth:
                projected = self.projectors[0](x[:, prefix:])
        h = self.final_layer.features(x, c)
        out = self.unpatchify(self.final_layer.linear(h[:, prefix:]))
        out = out[:, : self.in_channels] if self.arch.learn_sigma else out
        out = out.squeeze(2) if self.tokens_1d else out
        outs = (out, self.cls_head(h[:, 0])) if prefix else (out,)
        if return_repa:
            if projected is None:
                raise ValueError("return_repa needs a model built with repa_dim > 0")
            outs = (*outs, projected)
        return outs[0] if len(outs) == 1 else outs


def resolve_arch(cfg: LightningDiTConfig) -> DiTArch:
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown generator config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    flags = {
        k: getattr(cfg, k)
        for k in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
    }
    return replace(CONFIGS[cfg.config], **{k: v for k, v in flags.items() if v is not None})


def build_lightningdit(
    cfg: LightningDiTConfig,
    latent_shape: tuple[int, ...],
    num_classes: int,
    repa_dim: int = 0,
    reg_dim: int = 0,
) -> LightningDiT:
    """``repa_dim``: width of the VFM features REPA aligns to (0: no projector);
    ``reg_dim``: width of the VFM class token REG generates (used when
    ``transport.reg_weight > 0``)."""
    return LightningDiT(
        resolve_arch(cfg),
        tuple(latent_shape),
        num_classes,
        cfg.class_dropout,
        repa_dim=repa_dim if cfg.transport.repa_weight > 0 else 0,
        repa_depth=cfg.repa_depth,
        repa_projector_dim=cfg.repa_projector_dim,
        grad_checkpointing=cfg.grad_checkpointing,
        reg_dim=reg_dim if cfg.transport.reg_weight > 0 else 0,
    )


# ------------------------------------------------------------------ published weights

PUBLISHED_GENERATOR_HINT = (
    "the released LightningDiT-XL/1 checkpoints and their latents_stats.pt are linked from "
    "hustvl/LightningDiT's README, DiT-XL/2 is DiT-XL-2-256x256.pt from facebookresearch/DiT; "
    "download one and set generator.weights=<path> (and generator.latent_stats=<path>)"
)


def load_published(model: LightningDiT, path: str | Path) -> None:
    """Load ``generator.weights`` strictly, naming what does not match."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"generator.weights: {file} does not exist ({PUBLISHED_GENERATOR_HINT})"
        )
    # an official LightningDiT file: its "ema" entry, what the official inference loads
    sd = read_state_dict(file, entries=("ema", "model", "state_dict"))
    if differs := mismatch(model.state_dict(), sd):
        raise ValueError(
            f"generator.weights {path}: not a checkpoint of this generator config ({differs})"
        )
    model.load_state_dict(sd, strict=True)


GENERATORS.register(
    "lightningdit",
    config=LightningDiTConfig,
    check=resolve_arch,
    load_published=load_published,
    weights_hint=PUBLISHED_GENERATOR_HINT,
)(build_lightningdit)
