"""Build and load any configured model through the registry: tokenizers, generators, their
transport, published weights and latent statistics. Plain PyTorch, no Ray: the platform's
stages, the training loop, the benchmarks and the tests all build models here, and nothing
here names a family (a family's specifics come from its registry entry)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from latentforge.config import ConfigError, ExperimentConfig, merge_schema, to_dict
from latentforge.generators.transport import Transport
from latentforge.registry import GENERATORS, TOKENIZERS, Entry
from latentforge.state_dicts import mismatch, read_state_dict


def tokenizer_family(cfg: ExperimentConfig) -> Entry:
    return TOKENIZERS.get(cfg.tokenizer.name)


def generator_family(cfg: ExperimentConfig) -> Entry:
    return GENERATORS.get(cfg.generator.name)


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the unwrapped model (no ``module.`` prefixes)."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tokenizers


def build_tokenizer(cfg: ExperimentConfig) -> nn.Module:
    """The configured tokenizer for training: with its frozen loss networks and, when
    ``tokenizer.weights`` is set, the published weights it starts from."""
    return TOKENIZERS.build(cfg.tokenizer.name, cfg.tokenizer, cfg.data.resolution)


def load_tokenizer(cfg: ExperimentConfig, weights: str | Path, device="cpu") -> nn.Module:
    """The configured tokenizer with its trained ``weights``, for encoding and decoding:
    built without what only training uses (the family's ``inference`` values), so
    extraction actors and sampling tasks on other nodes need no VFM, LPIPS or
    published-weights file; then :meth:`Tokenizer.load_trained`."""
    tok = cfg.tokenizer
    slim = {k: v for k, v in tokenizer_family(cfg).inference.items() if hasattr(tok, k)}
    model = build_tokenizer(dataclasses.replace(cfg, tokenizer=dataclasses.replace(tok, **slim)))
    model.load_trained(load_file(str(weights)))
    return model.to(device).eval().requires_grad_(False)


def latent_shape_of(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The configured tokenizer's latent shape at ``data.resolution``, without building it:
    (C, H, W) or (C, N)."""
    family = tokenizer_family(cfg)
    if family.latent_shape is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer.name}: latent shape needs the extraction")
    try:
        return tuple(family.latent_shape(cfg.tokenizer, cfg.data.resolution))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e.args[0] if e.args else e}") from None


def normalization_of(cfg: ExperimentConfig) -> str:
    """How the tokenizer's latents are normalised: ``channel``, ``element`` or ``scalar``."""
    return tokenizer_family(cfg).normalization


# ----------------------------------------------------------------------------- generators


def repa_dim(cfg: ExperimentConfig, stats: dict[str, Any]) -> int:
    """Width of the stored VFM features REPA aligns to; 0 when REPA is off."""
    if cfg.generator.transport.repa_weight <= 0:
        return 0
    if "vfm_shape" not in stats:
        raise ConfigError(
            "generator.transport.repa_weight > 0 needs VFM features stored with the "
            "latents: set extract.vfm (e.g. extract.vfm=local:shapes-vit)"
        )
    return int(stats["vfm_shape"][0])


def reg_dim(cfg: ExperimentConfig, stats: dict[str, Any]) -> int:
    """Width of the VFM class token REG generates (0 without REG)."""
    if cfg.generator.transport.reg_weight <= 0:
        return 0
    if "vfm_cls_dim" not in stats:
        raise ConfigError(
            "generator.transport.reg_weight > 0 needs the VFM class token stored with the "
            "latents: set extract.vfm (a VFM with a class token) and extract again"
        )
    return int(stats["vfm_cls_dim"])


def num_classes_of(cfg: ExperimentConfig) -> int:
    n = cfg.data.num_classes
    if n is None:
        raise ConfigError("data.num_classes: unset; the generator needs the number of classes")
    return int(n)


def build_generator(cfg: ExperimentConfig, stats: dict[str, Any]) -> nn.Module:
    """The configured generator for the latents described by ``stats``; with REPA, its
    projector is sized to the stored VFM features; with REG, its class-token layers to the
    stored class token."""
    dim = repa_dim(cfg, stats)
    extra = {"repa_dim": dim} if dim else {}
    if reg := reg_dim(cfg, stats):
        extra["reg_dim"] = reg
    return GENERATORS.build(
        cfg.generator.name,
        cfg.generator,
        tuple(stats["latent_shape"]),
        num_classes_of(cfg),
        **extra,
    )


def load_generator(cfg: ExperimentConfig, weights: str | Path, stats: dict, device="cpu"):
    """The configured generator with its trained ``weights`` (strict), for sampling."""
    model = build_generator(cfg, stats)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval().requires_grad_(False)


def load_published_generator(model: nn.Module, cfg: ExperimentConfig) -> None:
    """``generator.weights`` into ``model`` as the family's published loader reads it."""
    family = generator_family(cfg)
    if family.load_published is None:
        raise ConfigError(f"generator {cfg.generator.name}: no published-weights loader")
    family.load_published(model, cfg.generator.weights)


def guide_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment with the autoguidance guide as its generator: ``sample.guide_generator``
    over the generator config (same family), without the generator's published files."""
    overrides = dict(cfg.sample.guide_generator)
    name = overrides.pop("name", cfg.generator.name)
    if name != cfg.generator.name:
        raise ConfigError(
            f"sample.guide_generator.name: {name!r}; the guide is a {cfg.generator.name} "
            "(the generator's family), sized by the other keys"
        )
    values = {**to_dict(cfg.generator), "weights": None, "latent_stats": None}
    node = OmegaConf.merge(OmegaConf.create(values), OmegaConf.create(overrides))
    merged = merge_schema(type(cfg.generator), node, "sample.guide_generator")
    return dataclasses.replace(cfg, generator=merged)


def load_guide(cfg: ExperimentConfig, stats: dict, device="cpu") -> nn.Module:
    """The autoguidance guide: the generator config with ``sample.guide_generator`` applied,
    loaded strictly from ``sample.guide_weights`` (a generator stage's ``ema.safetensors``,
    or a published file the family's loader reads)."""
    gcfg = guide_config(cfg)
    model = build_generator(gcfg, stats)
    path = cfg.sample.guide_weights
    family = generator_family(gcfg)
    try:
        if family.load_published is not None:
            family.load_published(model, path)
        else:
            sd = read_state_dict(path, entries=("ema", "model", "state_dict"))
            if differs := mismatch(model.state_dict(), sd):
                raise ValueError(f"{path}: not a checkpoint of this config ({differs})")
            model.load_state_dict(sd, strict=True)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"sample.guide_weights: {e.args[0] if e.args else e}") from None
    return model.to(device).eval().requires_grad_(False)


def check_guide(cfg: ExperimentConfig) -> None:
    """The guide's config resolves and its weights file exists (when autoguidance is on)."""
    if not cfg.sample.guide_weights:
        if cfg.sample.guide_generator:
            raise ConfigError("sample.guide_generator: set, but sample.guide_weights is not")
        return
    if cfg.sample.cfg_channels is not None:
        raise ConfigError("sample.cfg_channels: legacy partial guidance; unset it for autoguidance")
    gcfg = guide_config(cfg)
    family = generator_family(gcfg)
    if family.check is not None:
        try:
            family.check(gcfg.generator)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"sample.guide_generator: {e.args[0] if e.args else e}") from None
    if not Path(cfg.sample.guide_weights).expanduser().is_file():
        raise ConfigError(f"sample.guide_weights: {cfg.sample.guide_weights} does not exist")


def build_transport(
    cfg: ExperimentConfig, latent_shape: tuple[int, ...] | None = None
) -> Transport:
    """The configured transport; ``latent_shape`` resolves ``train_shift: auto``."""
    return Transport(cfg.generator.transport, latent_shape)


# ----------------------------------------------------------------------------- checks


def check_model_configs(cfg: ExperimentConfig, generator: bool) -> None:
    """The families' own config checks (named configs exist, values fit), as
    :class:`ConfigError` naming the key."""
    parts = [("tokenizer", tokenizer_family(cfg), cfg.tokenizer)]
    if generator:
        parts.append(("generator", generator_family(cfg), cfg.generator))
    for kind, family, part in parts:
        if family.check is None:
            continue
        try:
            family.check(part)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            text = msg if msg.startswith(f"{kind}.") else f"{kind}.config: {msg}"
            raise ConfigError(text) from None


def check_published_files(cfg: ExperimentConfig, kind: str) -> None:
    """``<kind>.weights`` (and a generator's ``latent_stats``) exist, else a
    :class:`ConfigError` saying where the published file comes from."""
    part = getattr(cfg, kind)
    family = tokenizer_family(cfg) if kind == "tokenizer" else generator_family(cfg)
    hint = f" ({family.weights_hint})" if family.weights_hint else ""
    for key in ("weights", "latent_stats"):
        file = getattr(part, key, None)
        if file and not Path(file).expanduser().is_file():
            raise ConfigError(f"{kind}.{key}: {file} does not exist{hint}")


def check_training_files(cfg: ExperimentConfig) -> None:
    """The files only the tokenizer's training needs (its frozen VFM, ...) exist, as the
    family's ``check_training`` says."""
    family = tokenizer_family(cfg)
    if family.check_training is None:
        return
    try:
        family.check_training(cfg.tokenizer)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(e.args[0] if e.args else str(e)) from None


# ----------------------------------------------------------------------------- latent stats


def read_latent_stats(path: str | Path, shape: tuple[int, ...] | int) -> dict[str, list]:
    """``mean`` / ``std`` of published latents (LightningDiT's ``latents_stats.pt``, RAE's
    ``stat.pt``, SVG's ``dinov3_sp_stats.pt``, or a JSON ``{"mean": ..., "std": ...}``): a
    scalar is repeated per channel; per-channel values (C, 1, 1) become a list of C; per-element values of the latent's
    full shape are kept as nested lists. ``shape`` is the latent shape (or its channels)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    channels = shape[0]
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"generator.latent_stats: {file} does not exist")
    if file.suffix == ".json":
        raw = json.loads(file.read_text())
    else:
        raw = torch.load(str(file), map_location="cpu", weights_only=True)
    if "std" not in raw and "var" in raw:  # RAE's stat.pt: its std is sqrt(var + 1e-5)
        raw = {"mean": raw["mean"], "std": (torch.as_tensor(raw["var"]).double() + 1e-5).sqrt()}
    out = {}
    for key in ("mean", "std"):
        # a prefixed name is accepted too (SVG's dinov3_sp_mean / dinov3_sp_std)
        name = key if key in raw else next((k for k in raw if k.endswith(f"_{key}")), key)
        value = torch.as_tensor(raw[name], dtype=torch.float64)
        if value.numel() > channels and value.numel() == math.prod(shape):  # per element
            out[key] = value.reshape(shape).tolist()
            continue
        values = value.flatten().tolist()
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise ValueError(
                f"generator.latent_stats {file}: {key} has {len(values)} values for "
                f"{channels} latent channels"
            )
        out[key] = values
    return out


def latent_mean_std(stats: dict[str, Any], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An extraction's ``stats.json`` mean and std, each shaped by :func:`latent_stat` for
    its ``latent_shape``."""
    shape = tuple(stats["latent_shape"])
    return latent_stat(stats["mean"], shape, device), latent_stat(stats["std"], shape, device)


def latent_stat(values: Any, latent_shape: tuple[int, ...], device=None) -> torch.Tensor:
    """A latent statistic (``stats["mean"]`` / ``["std"]``) shaped to broadcast against a
    batch (B, *latent_shape): per channel (C,) -> (1, C, 1, ...); per element (the latent's
    shape) -> (1, *latent_shape); a scalar -> (1, 1, ...)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    nd = len(latent_shape)
    if tuple(t.shape) == tuple(latent_shape):
        return t.unsqueeze(0)
    if t.numel() == latent_shape[0]:
        return t.view(1, -1, *[1] * (nd - 1))
    if t.numel() == 1:
        return t.view(*[1] * (nd + 1))
    raise ValueError(
        f"latent statistics of shape {tuple(t.shape)} fit neither the latent shape "
        f"{tuple(latent_shape)}, its channels nor a scalar"
    )
