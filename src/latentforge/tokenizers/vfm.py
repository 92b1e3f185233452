"""Frozen vision foundation models (VFMs) behind one interface.

``load_vfm(spec)`` with ``spec`` one of

- ``local:<asset>`` — an embedded asset (``src/latentforge/assets/<asset>.safetensors``)
  or ``local:/abs/path.safetensors``: a timm ViT whose constructor kwargs, mean/std and
  dtype are stored in the file's safetensors metadata;
- ``timm:<model>`` — e.g. ``timm:vit_large_patch14_dinov2.lvd142m``; weights from
  ``weights=`` or the existing Hugging Face hub cache (never downloaded here);
- ``hf:<repo id or local dir>`` — DINOv2 (with or without registers), DINOv3, SigLIP /
  SigLIP2, CLIP vision and ViT-MAE through transformers, ``local_files_only=True``;
- ``hub:<local repo dir>:<entry>`` — a torch.hub entry of a local clone of its repository
  with an explicit weights file, e.g. ``hub:/opt/dinov3:dinov3_vits16plus`` (DINOv3 as SVG
  loads it; timm's ``timm:vit_small_plus_patch16_dinov3`` is the same network).

Every VFM takes images in [-1, 1], resizes them to its own input size, applies its own
mean/std (``normalize=False`` instead feeds the raw [-1, 1] input, which reproduces what
VA-VAE fed DINOv2; hustvl/LightningDiT issue #78) and returns patch grids (B, C, h, w) of
the requested layers plus the class (or pooled) token, frozen and without gradients.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_stem_patch_embed(*args, **kwargs) -> nn.Module:
    """timm ``PatchEmbed`` whose projection is a small strided conv stem instead of one
    big-stride conv ("Early Convolutions Help Transformers See Better", Xiao et al. 2021).
    A drop-in ``embed_layer`` for timm's VisionTransformer, used by the embedded shapes ViT,
    which learns several times faster from scratch with it."""
    from timm.layers import PatchEmbed

    embed = PatchEmbed(*args, **kwargs)
    c, layers = embed.proj.in_channels, []
    for w in [32, 64, 128][: max(1, embed.patch_size[0].bit_length() - 1)]:
        layers += [
            nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, w),
            nn.ReLU(),
        ]
        c = w
    layers.append(nn.Conv2d(c, embed.proj.out_channels, 1))
    embed.proj = nn.Sequential(*layers)
    return embed


@dataclass
class VFMOutput:
    patch: list[torch.Tensor]  # one (B, C, h, w) grid per requested layer
    cls: torch.Tensor | None  # (B, C) class / pooled token, None if the model has none


class VFM(nn.Module):
    """A frozen foundation encoder: [-1, 1] images -> patch-feature grids + class token."""

    def __init__(
        self,
        name: str,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        mean,
        std,
        normalize: bool,
        resize: int | None,
    ):
        super().__init__()
        self.name = name
        self.image_size = int(resize or image_size)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.normalize = normalize
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid produced for any input size (inputs are resized to the model's own)."""
        side = self.image_size // self.patch_size
        return (side, side)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        if not self.normalize:
            return x
        return ((x + 1) / 2 - self.mean) / self.std

    def train(self, mode: bool = True) -> VFM:
        return super().train(False)  # always frozen in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> VFMOutput:
        """Args: images float [-1, 1] (B, 3, H, W). Returns :class:`VFMOutput`."""
        return self.encode(self.prepare(images))

    def encode(self, x: torch.Tensor) -> VFMOutput:
        raise NotImplementedError


def _tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, c = tokens.shape  # (B, h*w, C)
    return tokens.transpose(1, 2).reshape(b, c, *grid)


class TimmVFM(VFM):
    """A timm ViT (DINOv2, the embedded shapes ViT, ...)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        layers: list[int] | None,
        normalize: bool,
        resize: int | None,
        mean=None,
        std=None,
    ):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        image_size = model.patch_embed.img_size[0]
        patch = model.patch_embed.patch_size[0]
        mean = mean or cfg.get("mean", IMAGENET_MEAN)
        std = std or cfg.get("std", IMAGENET_STD)
        super().__init__(name, image_size, patch, model.embed_dim, mean, std, normalize, resize)
        if resize:
            model.set_input_size(img_size=resize)
        self.model = model.eval().requires_grad_(False)
        self.depth = len(model.blocks)  # transformer blocks; ``layers`` index them
        self.layers = layers or [self.depth - 1]

    def encode(self, x: torch.Tensor) -> VFMOutput:
        inter = self.model.forward_intermediates(
            x,
            indices=self.layers,
            norm=True,
            output_fmt="NCHW",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        grids = [g for g, _ in inter]
        prefix = inter[-1][1]
        cls = prefix[:, 0] if prefix is not None and prefix.shape[1] > 0 else None
        return VFMOutput(grids, cls)


class HFVFM(VFM):
    """A transformers vision model (DINOv2, SigLIP/SigLIP2, CLIP vision, ViT-MAE)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        layers: list[int] | None,
        normalize: bool,
        resize: int | None,
        mean,
        std,
    ):
        vcfg = getattr(model.config, "vision_config", model.config)
        super().__init__(
            name, vcfg.image_size, vcfg.patch_size, vcfg.hidden_size, mean, std, normalize, resize
        )
        self.model = model.eval().requires_grad_(False)
        # transformers' hidden_states precede the model's final LayerNorm; VA-VAE and REPA
        # align to normalised tokens, as timm's forward_intermediates(norm=True) gives them
        root = getattr(model, "vision_model", model)
        norms = [getattr(root, n, None) for n in ("layernorm", "post_layernorm", "norm")]
        self.final_norm = next((m for m in norms if isinstance(m, nn.Module)), nn.Identity())
        self.depth = vcfg.num_hidden_layers  # transformer blocks; ``layers`` index them
        self.layers = layers or [self.depth - 1]
        self.has_cls = model.config.model_type not in (
            "siglip_vision_model",
            "siglip",
            "siglip2_vision_model",
            "siglip2",
        )

    def encode(self, x: torch.Tensor) -> VFMOutput:
        grid = self.grid()
        n = grid[0] * grid[1]
        kwargs = {}
        if self.model.config.model_type == "vit_mae":
            # ascending noise keeps the patch order (MAE shuffles tokens even with mask 0)
            kwargs["noise"] = torch.arange(n, dtype=x.dtype, device=x.device).expand(x.shape[0], n)
        if x.shape[-1] != getattr(self.model.config, "image_size", x.shape[-1]) and (
            "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        ):  # ViT-MAE and SigLIP take other sizes only when asked (DINOv2 always does)
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=x, output_hidden_states=True, **kwargs)
        grids = []
        for layer in self.layers:
            h = self.final_norm(out.hidden_states[layer + 1])  # [0]: the embedding output
            grids.append(_tokens_to_grid(h[:, h.shape[1] - n :], grid))
        pooled = getattr(out, "pooler_output", None)
        cls = out.last_hidden_state[:, 0] if self.has_cls else pooled
        return VFMOutput(grids, cls)


def _missing(spec: str, expected: str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"VFM {spec!r}: weights not found ({expected}). {how}")


def load_local(spec: str, path: Path, layers, normalize, resize) -> VFM:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    if not path.is_file():
        raise _missing(
            spec,
            str(path),
            "Rebuild the embedded asset with `latentforge train-asset experiments/assets/<asset>.yaml`.",
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("family") != "timm":
        raise ValueError(f"{path}: not a VFM asset (metadata family={meta.get('family')!r})")
    kwargs = json.loads(meta["model_kwargs"])
    if meta.get("stem") == "conv":
        kwargs["embed_layer"] = conv_stem_patch_embed
    model = VisionTransformer(**kwargs)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(sd, strict=True)
    return TimmVFM(
        model, spec, layers, normalize, resize, json.loads(meta["mean"]), json.loads(meta["std"])
    )


def load_timm(spec: str, name: str, layers, normalize, resize, weights: str | None) -> VFM:
    import timm
    from huggingface_hub import try_to_load_from_cache

    probe = timm.create_model(name, pretrained=False)
    hub_id = (probe.pretrained_cfg or {}).get("hf_hub_id")
    file = weights
    if file is None and hub_id:
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, candidate)
            if isinstance(hit, str):
                file = hit
                break
    if file is None or not Path(file).is_file():
        raise _missing(
            spec,
            f"{weights or f'hub cache entry {hub_id}/model.safetensors'}",
            f"Download it where there is network (`huggingface-cli download {hub_id}`) and copy the "
            "Hugging Face cache here, or pass the file as tokenizer.vfm_weights=/path/model.safetensors.",
        )
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, num_classes=0
    )
    return TimmVFM(model, spec, layers, normalize, resize)


def load_hf(spec: str, repo: str, layers, normalize, resize) -> VFM:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(repo, local_files_only=True)
    except OSError as e:
        raise _missing(
            spec,
            f"{repo}/config.json (local dir or hub cache)",
            f"Download it where there is network (`huggingface-cli download {repo}`) and copy the cache "
            "or the directory here.",
        ) from e
    if hasattr(config, "vision_config"):  # CLIP / SigLIP full models: keep the vision tower
        from transformers import AutoModel as _Auto

        full = _Auto.from_pretrained(repo, local_files_only=True)
        model = full.vision_model
        model.config = config.vision_config
    else:
        if config.model_type == "vit_mae":
            config.mask_ratio = 0.0
        model = AutoModel.from_pretrained(repo, config=config, local_files_only=True)
    mean, std = _hf_norm(repo)
    return HFVFM(model, spec, layers, normalize, resize, mean, std)


def _hf_norm(repo: str) -> tuple:
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, local_files_only=True)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        return IMAGENET_MEAN, IMAGENET_STD


def local_asset(name: str) -> Path:
    """The file of a ``local:`` VFM spec: an embedded asset's name or a .safetensors path."""
    return Path(name) if name.endswith(".safetensors") else ASSETS / f"{name}.safetensors"


def check_vfm_spec(key: str, spec: str | None, weights: str | None) -> None:
    """A VFM spec's local files exist: a ``local:`` asset, an ``hf:`` directory given as a
    path, an explicit weights file (hub caches are checked when the VFM loads)."""
    if not spec:
        return
    if weights and not Path(weights).expanduser().is_file():
        raise ValueError(f"{key}_weights: {weights} does not exist")
    kind, _, name = spec.partition(":")
    if kind == "local":
        path = local_asset(name)
        if not path.is_file():
            raise ValueError(f"{key}: {spec!r}: {path} does not exist")
    elif kind == "hf" and name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ValueError(f"{key}: {spec!r}: directory {name} does not exist")
    elif kind == "hub":
        check_hub_spec(key, spec, weights)
    elif kind not in ("local", "hf", "timm"):
        raise ValueError(f"{key}: {spec!r}: expected local:<asset>, timm:<model> or hf:<repo>")


def check_loss_vfms(cfg) -> None:
    """The files of the VFMs a tokenizer config's losses train against: a VFM perceptual
    loss's (``perceptual: vfm``) and a VFM discriminator's (``disc_vfm`` with a
    ``disc_weight``), where the family has them."""
    if getattr(cfg, "perceptual", None) == "vfm":
        check_vfm_spec("tokenizer.perceptual_vfm", cfg.perceptual_vfm, None)
    if getattr(cfg, "disc_weight", 0) > 0:
        spec, weights = getattr(cfg, "disc_vfm", None), getattr(cfg, "disc_vfm_weights", None)
        check_vfm_spec("tokenizer.disc_vfm", spec, weights)


def load_vfm(
    spec: str,
    layers: list[int] | None = None,
    resize: int | None = None,
    normalize: bool = True,
    weights: str | None = None,
) -> VFM:
    """Load a frozen VFM by spec (``local:``, ``timm:``, ``hf:``); see the module docstring."""
    kind, _, name = spec.partition(":")
    if kind == "local":
        return load_local(spec, local_asset(name), layers, normalize, resize)
    if kind == "timm":
        return load_timm(spec, name, layers, normalize, resize, weights)
    if kind == "hf":
        return load_hf(spec, name, layers, normalize, resize)
    if kind == "hub":
        return load_hub(spec, name, layers, normalize, resize, weights)
    raise ValueError(f"VFM spec {spec!r}: expected local:<asset>, timm:<model> or hf:<repo or dir>")


# ----------------------------------------------------------------------------- torch.hub


class HubVFM(VFM):
    """A DINOv2 / DINOv3 torch.hub model: ``forward_features`` -> ``x_norm_patchtokens``."""

    def __init__(self, model: nn.Module, name: str, normalize: bool, resize: int | None):
        embed = model.patch_embed
        size = getattr(embed, "img_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        patch = getattr(model, "patch_size", None) or embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        super().__init__(
            name, size, patch, model.embed_dim, IMAGENET_MEAN, IMAGENET_STD, normalize, resize
        )
        self.model = model.eval().requires_grad_(False)
        self.depth = len(model.blocks)
        self.layers = [self.depth - 1]  # the last block's normalised tokens only

    def encode(self, x: torch.Tensor) -> VFMOutput:
        if self.layers != [self.depth - 1]:
            raise ValueError(f"VFM {self.name!r}: hub: VFMs give the last layer's features only")
        out = self.model.forward_features(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patch = _tokens_to_grid(out["x_norm_patchtokens"], grid)  # (B, C, h, w)
        return VFMOutput([patch], out.get("x_norm_clstoken"))


def _hub_parts(spec: str) -> tuple[str, str]:
    repo, _, entry = spec.partition(":")[2].rpartition(":")
    if not repo or not entry:
        raise ValueError(f"VFM spec {spec!r}: expected hub:<local repo dir>:<entry>")
    return repo, entry


def check_hub_spec(key: str, spec: str, weights: str | None) -> None:
    """A ``hub:`` spec names an existing local directory with a hubconf.py, and weights."""
    repo, _ = _hub_parts(spec)
    if not (Path(repo).expanduser() / "hubconf.py").is_file():
        raise ValueError(f"{key}: {spec!r}: {repo}/hubconf.py does not exist")
    if not weights:
        raise ValueError(f"{key}: {spec!r}: set {key}_weights to the model's weights file")


def load_hub(spec: str, name: str, layers, normalize, resize, weights: str | None) -> VFM:
    """A torch.hub entry of a local repository clone, with ``weights`` (never downloaded)."""
    repo, entry = _hub_parts(spec)
    if not weights or not Path(weights).expanduser().is_file():
        raise _missing(
            spec,
            str(weights or "no weights file given"),
            "Pass the model's weights file (e.g. dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth) "
            "as tokenizer.vfm_weights=<path>.",
        )
    model = torch.hub.load(
        str(Path(repo).expanduser()), entry, source="local", weights=str(Path(weights).expanduser())
    )
    vfm = HubVFM(model, spec, normalize, resize)
    if layers:
        vfm.layers = list(layers)
    return vfm


# ----------------------------------------------------------------------------- exact input


def prepare_exact(
    vfm: VFM, images: torch.Tensor, size: int, mode: str = "bicubic", antialias: bool = False
) -> torch.Tensor:
    """``images`` in [-1, 1] (B, 3, H, W) as a reference pipeline feeds the VFM: to [0, 1],
    resized to ``size`` x ``size`` with ``mode`` (and ``antialias``; RAE: bicubic without),
    then the VFM's mean/std. Differentiable; :meth:`VFM.prepare` is the antialiased default."""
    x = (images.float() + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=antialias)
    return (x - vfm.mean) / vfm.std


def final_norm_of(vfm: VFM) -> nn.Module:
    """The LayerNorm after the VFM's last block (timm ``norm``, transformers ``layernorm`` /
    ``post_layernorm``)."""
    norm = getattr(vfm, "final_norm", None) or getattr(vfm.model, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"VFM {vfm.name!r}: no final LayerNorm found")
    return norm


def drop_final_norm_affine(vfm: VFM) -> VFM:
    """Remove the final LayerNorm's scale and shift, so the last layer's tokens are plain
    standardised features (RAE, Zheng et al. 2025: the encoder's output keeps the
    LayerNorm without its affine parameters). Returns ``vfm``, changed in place."""
    norm = final_norm_of(vfm)
    norm.weight = None
    norm.bias = None
    norm.elementwise_affine = False
    return vfm
