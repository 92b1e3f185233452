"""The DiT / LightningDiT family in one file, with a dict of named configs.

DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023).
LightningDiT: Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models" (2025) — DiT with SwiGLU, RMSNorm, 2-D RoPE (EVA-02 style) and
optional qk-norm. Parameter names and shapes follow the official LightningDiT release
(hustvl/LightningDiT) so its checkpoints load with ``strict=True``. The backbone knows
nothing about the noise process: ``generators/transport.py`` decides what the output means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentforge.config import GeneratorConfig, TransportConfig
from latentforge.generators.base import Generator
from latentforge.generators.blocks import (
    Block,
    DiTArch,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    VisionRoPE,
    sincos_2d,
)
from latentforge.registry import GENERATORS
from latentforge.state_dicts import mismatch, read_state_dict

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
    # the demo's size for wide latents (RAE's, SVG's 128+ channels at 8x8): patch 1, so that
    # a token (its channels) is no wider than the model (RAE's width >= token dimension)
    "micro/1": DiTArch(depth=4, hidden=128, heads=2, patch=1),
    "tiny": DiTArch(depth=2, hidden=64, heads=2, patch=2),
    "tiny/1": DiTArch(depth=2, hidden=64, heads=2, patch=1),  # also for 1-D token latents
    # SVG-XL (Shi et al. 2025, shiml20/SVG): DiT-XL/1 with qk-norm (LayerNorm), learned sigma
    # and a Linear input layer ``ln1`` on 392-channel SVG latents
    "SVG-XL": DiTArch(28, 1152, 16, patch=1, use_qknorm=True, input_linear=True, **_VANILLA),
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


# ------------------------------------------------------------------------ model


def latent_grid(latent_shape: tuple[int, ...], patch: int) -> tuple[int, int, int]:
    """(C, H, W) of the token grid a latent runs as. 1-D tokenizers (MAETok, SoftVQ-VAE) give
    (C, N): N tokens of C channels, channels first like images; they run as a 1 x N grid
    with patch 1 (half of the sin-cos and RoPE dimensions then carry the token index, the
    other half are constant)."""
    if len(latent_shape) == 2:
        if patch != 1:
            raise ValueError(f"1-D latents {tuple(latent_shape)} need patch 1, not {patch}")
        c, h, w = latent_shape[0], 1, latent_shape[1]
    else:
        c, h, w = latent_shape
    if h % patch or w % patch:
        raise ValueError(f"latent {h}x{w} is not divisible by patch {patch}")
    return c, h, w


def repa_projector(hidden: int, width: int, out: int) -> nn.Sequential:
    """REPA's projector MLP (keys ``{0,2,4}``, as in sihyun-yu/REPA): hidden -> width ->
    width -> out with SiLU."""
    return nn.Sequential(
        nn.Linear(hidden, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, out),
    )


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
        c, h, w = latent_grid(latent_shape, arch.patch)
        self.tokens_1d = len(latent_shape) == 2
        self.arch = arch
        self.in_channels = c
        self.out_channels = 2 * c if arch.learn_sigma else c
        self.num_classes = num_classes
        self.grid = (h // arch.patch, w // arch.patch)
        d = arch.hidden
        if arch.input_linear:
            if arch.patch != 1:
                raise ValueError(f"input_linear embeds single tokens: patch 1, not {arch.patch}")
            self.ln1 = nn.Linear(c, d)  # (B, T, C) -> (B, T, D)
        else:
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
            self.projectors = nn.ModuleList([repa_projector(d, repa_projector_dim, repa_dim)])
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
        if not self.arch.input_linear:
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
        if self.arch.input_linear:
            x = self.ln1(rearrange(x_in, "b c h w -> b (h w) c")) + self.pos_embed  # (B, T, D)
        else:
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
    "hustvl/LightningDiT's README, DiT-XL/2 is DiT-XL-2-256x256.pt from facebookresearch/DiT, "
    "SVG-XL is in the Hugging Face repo howlin/SVG (latent statistics: dinov3_sp_stats.pt "
    "of shiml20/SVG); "
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
