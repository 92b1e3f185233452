"""1-D token tokenizers: SoftVQ-VAE and MAETok (registry names ``softvq`` and ``maetok``).

SoftVQ-VAE (Chen et al. 2024, "SoftVQ-VAE: Efficient 1-Dimensional Continuous Tokenizer",
arXiv 2412.10958) and MAETok (Chen et al. 2025, "Masked Autoencoders Are Effective Tokenizers
for Diffusion Models", arXiv 2502.03444), from ``Hhhhhhao/continuous_tokenizer`` (7cc3e96;
MAETok's training code as of f4d60a0). An image is encoded by a ViT into L latent tokens of
D channels, stored channels first as (D, L) like every latent of the platform; a ViT decoder
rebuilds the image from them (networks: :mod:`latentforge.tokenizers.token1d_nets`).

- **SoftVQ**: the latent tokens are soft-quantised (softmax over l2-normalised codewords,
  temperature 0.07, one codebook per token segment). Training: L2 + perceptual, the codebook
  entropy loss (0.01), a REPA-style alignment (an MLP maps each token to the VFM's width, the
  token is repeated over its share of the VFM's patch positions, -cos, weight 0.1), and a
  hinge GAN on a frozen-ViT-feature discriminator (DiffAugment, LeCAM, consistency
  regularisation).
- **MAETok**: a plain autoencoder whose encoder sees 40-60% of its image tokens replaced by a
  mask token in training (ratio ~ normal(0.6, 0.25) truncated to [0.4, 0.6], one per batch);
  shallow auxiliary MoVQ decoders predict, at the masked positions, HOG features (MSE) and
  frozen VFM features (-cos; DINOv2 and SigLIP in the paper). A second phase fine-tunes the
  pixel decoder with the encoder frozen (``freeze_encoder``).

Published weights (``MAETok/maetok-b-128``, ``SoftVQVAE/softvq-{l,bl,b}-{64,32}``: their
``model.safetensors`` and ``config.json``) load strictly; the training-only parts (the REPA
model and projector, SigLIP, the auxiliary decoders, SoftVQ's usage counter) are dropped by
rule. Their latent statistics are ``vq_mean`` / ``vq_std`` of ``config.json`` (a scalar
normalisation; ``generator.latent_stats=<config.json>`` reads them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from latentforge.config import TokenizerConfig
from latentforge.registry import TOKENIZERS
from latentforge.state_dicts import mismatch, read_state_dict
from latentforge.tokenizers.token1d_model import Token1D, build_perceptual, inference_state
from latentforge.tokenizers.token1d_nets import TokenArch
from latentforge.tokenizers.vfm import check_loss_vfms, check_vfm_spec

_B = dict(width=768, depth=12, heads=12)
_L = dict(width=1024, depth=24, heads=16)
_DB = dict(dec_width=768, dec_depth=12, dec_heads=12)
_DL = dict(dec_width=1024, dec_depth=24, dec_heads=16)
# SoftVQ: absolute positions, plain decoder with a class token; 4 codebooks x 8192, tau 0.07
_SOFTVQ = dict(kind="softvq", codebooks=4, codebook_size=8192, tau=0.07)
# MAETok: mixed RoPE (theta 10), MoVQ decoder without class token, an encoder mask token
_MAETOK = dict(kind="maetok", rope=True, movq=True, dec_cls_token=False)
_MAETOK.update(mask_token=True)


def _softvq(enc: dict, dec: dict, tokens: int) -> TokenArch:
    size = "l" if enc is _L else ("bl" if dec is _DL else "b")
    name = f"SoftVQVAE/softvq-{size}-{tokens}"
    return TokenArch(**enc, **dec, tokens=tokens, channels=32, **_SOFTVQ, published=name)


_SHAPES = dict(width=96, depth=4, heads=4, dec_width=96, dec_depth=4, dec_heads=4)
_SHAPES.update(tokens=16, channels=8, patch=4, image_size=32)
_TINY = dict(width=32, depth=2, heads=2, dec_width=32, dec_depth=2, dec_heads=2)
_TINY.update(tokens=8, channels=4, patch=8, image_size=32)
CONFIGS: dict[str, TokenArch] = {
    "softvq-l-64": _softvq(_L, _DL, 64),
    "softvq-bl-64": _softvq(_B, _DL, 64),
    "softvq-b-64": _softvq(_B, _DB, 64),
    "softvq-l-32": _softvq(_L, _DL, 32),
    "softvq-bl-32": _softvq(_B, _DL, 32),
    "softvq-b-32": _softvq(_B, _DB, 32),
    "maetok-b-128": TokenArch(
        **_B, **_DB, tokens=128, channels=32, **_MAETOK, published="MAETok/maetok-b-128"
    ),
    "maetok-b-128-512": TokenArch(
        **_B,
        **_DB,
        tokens=128,
        channels=32,
        **_MAETOK,
        image_size=512,
        published="MAETok/maetok-b-128-512",
    ),
    # the embedded default: 32 px shapes -> 16 tokens x 8 channels, patch 4 (the shapes
    # ViT's 8x8 grid, so its features align with the image tokens without resampling)
    # (mixed RoPE for SoftVQ too, and MAETok's plain decoder: the MoVQ decoder's zero-init
    # modulation passes no latent at the start and learns too slowly for this budget)
    "shapes-softvq": TokenArch(
        **_SHAPES, **{**_SOFTVQ, "codebooks": 2, "codebook_size": 256, "rope": True}
    ),
    "shapes-maetok": TokenArch(**_SHAPES, **{**_MAETOK, "movq": False}),
    "tiny": TokenArch(**_TINY, **{**_SOFTVQ, "codebooks": 2, "codebook_size": 16}),
    "tiny-maetok": TokenArch(**_TINY, **_MAETOK),
}


@dataclass
class Token1DConfig(TokenizerConfig):
    """Schema of ``tokenizer:`` for the 1-D token tokenizers (defaults: SoftVQ's recipe)."""

    name: str = "softvq"
    config: str = "shapes-softvq"  # key of CONFIGS, of the family the name says
    tokens: int | None = None  # override the named config's latent tokens L
    token_channels: int | None = None  # ... and their channels D
    recon: Literal["l2", "l1"] = "l2"
    # perceptual term: LPIPS (lpips package, torchvision backbone from the hub cache) or,
    # offline, a feature distance on a frozen VFM (logged as perceptual_vfm; not LPIPS)
    perceptual: Literal["lpips", "vfm", "none"] = "lpips"
    perceptual_weight: float = 1.0
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    perceptual_vfm: str = "local:shapes-vit"
    perceptual_warmup: float = 0.0  # images over which its weight ramps up from 0
    # SoftVQ's codebook entropy loss (softmax of the logits at this temperature)
    entropy_weight: float = 0.01
    entropy_temperature: float = 0.01
    # REPA-style alignment of the tokens to a frozen VFM's patch features; 0 disables
    repa_weight: float = 0.1
    repa_vfm: str = "local:shapes-vit"
    repa_vfm_weights: str | None = None
    repa_proj_dim: int = 1024  # width of the projector MLP
    # input size of the REPA and auxiliary VFMs (None: their own; the official DINOv2-L and
    # SigLIP run at 256 px with patch 16: 16x16 positions, as 224 px at patch 14)
    vfm_input_size: int | None = None
    # MAETok's mask modelling: ratio ~ N(mask_max, 0.25) truncated to [mask_min, mask_max]
    # (one per batch); mask_max 0 disables. Auxiliary decoders at the masked positions:
    mask_min: float = 0.0
    mask_max: float = 0.0
    hog_weight: float = 0.0  # HOG features (MSE)
    hog_cell: int = 8  # HOG cell side in pixels (8: 108 values per 16 px patch)
    aux_vfm: str | None = None  # first VFM target (-cos; MAETok: DINOv2-L)
    aux_vfm_weights: str | None = None
    aux_vfm2: str | None = None  # second VFM target (MAETok: SigLIP so400m)
    aux_vfm2_weights: str | None = None
    aux_weight: float = 1.0  # weight of each VFM target
    aux_width: int = 192  # the auxiliary decoders (MAETok: 192 wide, 3 blocks, 3 heads)
    aux_depth: int = 3
    aux_heads: int = 3
    freeze_encoder: bool = False  # MAETok's second phase: train the pixel decoder only
    # GAN: hinge loss on a frozen-ViT-feature discriminator; disc_weight 0 = no GAN
    disc_weight: float = 0.2
    disc_start: float = 0.0  # images seen before the discriminator and the GAN term start
    disc_adaptive: bool = False  # scale the generator term by the adaptive weight (MAETok)
    disc_max_weight: float = 1.0e4
    disc_vfm: str = "local:shapes-vit"  # its frozen ViT (the official: DINO ViT-S)
    disc_vfm_weights: str | None = None
    disc_kernel: int = 9
    disc_lr: float | None = None  # None: train.tokenizer_lr
    disc_betas: list[float] | None = None  # None: (0.9, 0.95) as the official
    diffaug_prob: float = 0.5  # DiffAugment (colour, translation, cutout 0.2), each p = 0.5
    diffaug_cutout: float = 0.2
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    cr_weight: float = 4.0  # consistency regularisation vs. strong augmentation (cutout 0.5)


@dataclass
class MAETokConfig(Token1DConfig):
    """Schema of ``tokenizer:`` for MAETok (defaults: MAETok's recipe)."""

    name: str = "maetok"
    config: str = "shapes-maetok"
    repa_weight: float = 0.0  # MAETok aligns through its auxiliary decoders instead
    mask_min: float = 0.4
    mask_max: float = 0.6
    hog_weight: float = 1.0
    hog_cell: int = 2  # 32 px shapes, patch 4: 2 px cells (108 values per patch)
    aux_vfm: str | None = "local:shapes-vit"
    aux_width: int = 64
    aux_depth: int = 1
    aux_heads: int = 2
    disc_weight: float = 0.4
    disc_adaptive: bool = True


# ----------------------------------------------------------------------------- registry


def resolve_arch(cfg: Token1DConfig) -> TokenArch:
    if cfg.config not in CONFIGS:
        raise KeyError(f"unknown tokenizer config {cfg.config!r}; known: {', '.join(CONFIGS)}")
    arch = CONFIGS[cfg.config]
    if cfg.tokens is not None:
        arch = replace(arch, tokens=cfg.tokens)
    if cfg.token_channels is not None:
        arch = replace(arch, channels=cfg.token_channels)
    if arch.kind != cfg.name:
        raise ValueError(f"tokenizer.config: {cfg.config!r} is a {arch.kind}, not a {cfg.name}")
    if cfg.mask_max > 0 and not arch.mask_token:
        raise ValueError(f"tokenizer.mask_max: config {cfg.config!r} has no mask token")
    if not 0 <= cfg.mask_min <= cfg.mask_max < 1:
        raise ValueError("tokenizer.mask_min/mask_max: need 0 <= mask_min <= mask_max < 1")
    return arch


def latent_shape(cfg: Token1DConfig, resolution: int) -> tuple[int, int]:
    """(D, L): L tokens of D channels, channels first, whatever the resolution."""
    arch = resolve_arch(cfg)
    for p in {arch.patch, arch.decoder_patch}:
        if resolution % p:
            raise ValueError(f"data.resolution {resolution} is not divisible by the patch {p}")
    return (arch.channels, arch.tokens)


def build_token1d(cfg: Token1DConfig, resolution: int) -> Token1D:
    """The configured tokenizer at ``resolution``, with the published or trained weights of
    ``tokenizer.weights`` when set."""
    arch = resolve_arch(cfg)
    latent_shape(cfg, resolution)
    model = Token1D(arch, cfg, resolution, build_perceptual(cfg))
    if cfg.weights:
        load_published(model, cfg.weights)
    return model


def published_hint(name: str) -> str:
    arch = CONFIGS.get(name)
    repo = arch.published if arch and arch.published else "SoftVQVAE/softvq-l-64"
    return (
        f"the published weights are model.safetensors of the Hugging Face repo {repo} (with "
        "its config.json); download both into one folder (hf download <repo> --local-dir "
        "<dir>) and set tokenizer.weights=<dir> (and generator.latent_stats=<dir>/config.json "
        "for vq_mean/vq_std)"
    )


def _check_published_config(model: Token1D, file: Path) -> None:
    """The ``config.json`` beside a published file (when there) describes this model."""
    path = file.parent / "config.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    meta = meta.get("config", meta)  # PyTorchModelHubMixin may nest the dataclass
    arch = model.arch
    want = {
        "num_latent_tokens": arch.tokens,
        "codebook_embed_dim": arch.channels,
        "use_rope": arch.rope,
        "dec_cls_token": arch.dec_cls_token,
    }
    if arch.codebooks:
        want["tau"] = arch.tau
    if arch.rope:
        want["rope_mixed"] = True
    if "decoder_model" in meta:
        meta["movq"] = "movq" in str(meta["decoder_model"])
        want["movq"] = arch.movq
    differs = [
        f"{k}={meta[k]!r} (expected {v!r})" for k, v in want.items() if k in meta and meta[k] != v
    ]
    if differs:
        raise ValueError(
            f"tokenizer.weights {file}: {path.name} describes another model than "
            f"tokenizer.config={model.cfg.config!r}: {', '.join(differs)}"
        )


def load_published(model: Token1D, path: str) -> None:
    """Load published weights (a hub folder or its ``model.safetensors``; or a checkpoint of
    ours) strictly, training-only entries dropped: the latent's D and L are read from
    ``quant_conv.weight`` and ``encoder.latent_tokens`` and must be the config's; then every
    key and shape must match, else the error names the first mismatched keys and the shapes
    expected; a ``config.json`` beside the file must describe the same model."""
    file = Path(path).expanduser()
    if file.is_dir():  # a downloaded hub folder
        file = file / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer.weights: {file} does not exist ({published_hint(model.cfg.config)})"
        )
    sd = inference_state(read_state_dict(file))
    ours = inference_state(model.state_dict())
    what = f"tokenizer.weights {file}: not a {model.cfg.name} {model.cfg.config}"
    if "quant_conv.weight" in sd and "encoder.latent_tokens" in sd:
        d, length = sd["quant_conv.weight"].shape[0], sd["encoder.latent_tokens"].shape[1]
        if (d, length) != (model.arch.channels, model.arch.tokens):
            raise ValueError(
                f"{what}: its latents are {length} tokens x {d} channels, the config's "
                f"{model.arch.tokens} x {model.arch.channels}"
            )
    if differs := mismatch(ours, sd):
        raise ValueError(f"{what} at {model.resolution} px ({differs})")
    _check_published_config(model, file)
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k in ours], missing


def check_training_files(cfg: Token1DConfig) -> None:
    """The frozen networks that training needs are there."""
    resolve_arch(cfg)
    check_loss_vfms(cfg)
    if cfg.repa_weight > 0 and not cfg.freeze_encoder:
        check_vfm_spec("tokenizer.repa_vfm", cfg.repa_vfm, cfg.repa_vfm_weights)
    if cfg.mask_max > 0 and not cfg.freeze_encoder:
        check_vfm_spec("tokenizer.aux_vfm", cfg.aux_vfm, cfg.aux_vfm_weights)
        check_vfm_spec("tokenizer.aux_vfm2", cfg.aux_vfm2, cfg.aux_vfm2_weights)


# what only training uses: the loss networks, targets and the weights training started from
TRAINING_ONLY = {
    "perceptual": "none",
    "disc_weight": 0.0,
    "weights": None,
    "repa_weight": 0.0,
    "mask_max": 0.0,
    "mask_min": 0.0,
    "hog_weight": 0.0,
    "aux_vfm": None,
    "aux_vfm2": None,
}

for _name, _schema in (("softvq", Token1DConfig), ("maetok", MAETokConfig)):
    TOKENIZERS.register(
        _name,
        config=_schema,
        latent_shape=latent_shape,
        normalization="scalar",
        check=resolve_arch,
        check_training=check_training_files,
        inference=TRAINING_ONLY,
        load_published=load_published,
        weights_hint=published_hint("maetok-b-128" if _name == "maetok" else "softvq-l-64"),
    )(build_token1d)
