"""Frozen vision foundation models (VFMs) behind one interface.

``load_vfm(spec)`` with ``spec`` one of

- ``local:<asset>``: an embedded asset ``src/latentforge/assets/<asset>.safetensors`` (or
  ``<assets_dir>/<asset>.safetensors``), or ``local:<path>.safetensors``. The file holds a
  timm ``VisionTransformer``'s state_dict; its safetensors metadata carries
  ``family="timm"``, ``model_kwargs`` (JSON constructor kwargs), ``mean``/``std`` (JSON
  lists), ``img_size``, ``patch_size``, optionally ``dtype`` (weights are cast to fp32)
  and ``stem="conv"`` (:func:`conv_stem_patch_embed`);
- ``timm:<model>``: e.g. ``timm:vit_large_patch14_dinov2.lvd142m`` (VA-VAE's VFM), weights
  from ``weights=`` or the existing Hugging Face hub cache; nothing is downloaded;
- ``hf:<repo id or local dir>``: DINOv2 (with or without registers), SigLIP, SigLIP2
  (fixed-size and NaFlex), CLIP vision and ViT-MAE through transformers with
  ``local_files_only=True``. Only the vision tower of CLIP/SigLIP checkpoints is loaded.

Every VFM takes images in [-1, 1], resizes them (bilinear, antialiased) to ``resize`` or
its own input size, maps them to [0, 1] and applies its own mean/std, and returns
final-norm patch grids (B, C, h, w) of the requested layers (class and register tokens
dropped) plus the class (or pooled) token; frozen, in eval mode.

``normalize=False`` reproduces VA-VAE, which fed its DINOv2 the raw [-1, 1] VAE input: no
[0, 1] mapping and no ImageNet mean/std (hustvl/LightningDiT ``vavae`` foundation model
wrapper; the author calls it a small bug in issue #78).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


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
    cls: torch.Tensor | None  # (B, C) class / pooled token; None if the model has none


class VFM(nn.Module):
    """A frozen foundation encoder: [-1, 1] images -> patch-feature grids + class token."""

    name: str
    embed_dim: int
    patch_size: int
    image_size: int  # the side every input is resized to

    def __init__(
        self,
        model: nn.Module,
        name: str,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        layers: list[int],
        mean,
        std,
        normalize: bool,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.layers = list(layers)
        self.normalize = normalize
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid (h, w) for an input of ``image_size``: every input is first resized
        to ``self.image_size``, so the grid does not depend on it."""
        side = self.image_size // self.patch_size
        return (side, side)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> the model's input (B, 3, S, S)."""
        x = images.to(self.mean.dtype)
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if not self.normalize:
            return x  # VA-VAE: raw [-1, 1] (see the module docstring)
        return ((x + 1) / 2 - self.mean) / self.std

    def train(self, mode: bool = True) -> VFM:
        return super().train(False)  # always frozen in eval mode

    def forward(self, images: torch.Tensor) -> VFMOutput:
        """Args: images float [-1, 1] (B, 3, H, W). Returns :class:`VFMOutput` with
        ``patch[k]`` (B, embed_dim, *grid()) for each requested layer; no gradients."""
        with torch.no_grad():
            return self.encode(self.prepare(images))

    def features(self, images: torch.Tensor) -> VFMOutput:
        """As ``forward``, but differentiable w.r.t. ``images`` (the weights stay frozen):
        for perceptual losses on reconstructions."""
        return self.encode(self.prepare(images))

    def encode(self, x: torch.Tensor) -> VFMOutput:
        raise NotImplementedError


def _tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, c = tokens.shape  # (B, h*w, C)
    return tokens.transpose(1, 2).reshape(b, c, *grid)  # (B, C, h, w)


class TimmVFM(VFM):
    """A timm VisionTransformer (DINOv2, the embedded shapes ViT, ...)."""

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
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if resize and resize != model.patch_embed.img_size[0]:
            model.set_input_size(img_size=resize)  # resamples pos_embed
        super().__init__(
            model,
            name,
            image_size=model.patch_embed.img_size[0],
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            layers=_resolve_layers(layers, len(model.blocks)),
            mean=mean or cfg.get("mean", IMAGENET_MEAN),
            std=std or cfg.get("std", IMAGENET_STD),
            normalize=normalize,
        )

    def encode(self, x: torch.Tensor) -> VFMOutput:
        inter = self.model.forward_intermediates(
            x,
            indices=self.layers,
            norm=True,  # the final norm on every returned layer, as timm's forward_features
            output_fmt="NCHW",
            return_prefix_tokens=True,
            intermediates_only=True,
        )  # [(grid (B, C, h, w), prefix (B, n_prefix, C) | None)] per layer
        prefix = inter[-1][1]
        cls = prefix[:, 0] if prefix is not None and self.model.cls_token is not None else None
        return VFMOutput([g for g, _ in inter], cls)


# transformers vision models: model_type -> (vision class name, final norm applied to all tokens)
HF_VISION = {
    "dinov2": ("Dinov2Model", "layernorm"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "layernorm"),
    "vit_mae": ("ViTMAEModel", "layernorm"),
    "siglip": ("SiglipVisionModel", "vision_model.post_layernorm"),
    "siglip_vision_model": ("SiglipVisionModel", "vision_model.post_layernorm"),
    "siglip2": ("Siglip2VisionModel", "vision_model.post_layernorm"),
    "siglip2_vision_model": ("Siglip2VisionModel", "vision_model.post_layernorm"),
    # CLIP applies post_layernorm to the pooled class token only: patch tokens stay raw
    "clip": ("CLIPVisionModel", None),
    "clip_vision_model": ("CLIPVisionModel", None),
}
HF_NORM = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (HALF, HALF), "siglip2": (HALF, HALF)}


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
        final_norm: str | None,
    ):
        vcfg = model.config
        native = _hf_native_size(vcfg)
        super().__init__(
            model,
            name,
            image_size=resize or native,
            patch_size=vcfg.patch_size,
            embed_dim=vcfg.hidden_size,
            layers=_resolve_layers(layers, vcfg.num_hidden_layers),
            mean=mean,
            std=std,
            normalize=normalize,
        )
        self.kind = vcfg.model_type.removesuffix("_vision_model")
        self.interpolate = self.image_size != native
        self.final_norm = model.get_submodule(final_norm) if final_norm else None

    def encode(self, x: torch.Tensor) -> VFMOutput:
        grid = self.grid()
        n = grid[0] * grid[1]
        if self.kind == "siglip2":  # NaFlex: patchified input + per-image grid + mask
            out = self.model(**_naflex_inputs(x, self.patch_size), output_hidden_states=True)
        else:
            kwargs = {}
            if self.kind == "vit_mae":
                # ascending noise keeps the patch order (MAE shuffles tokens even at mask 0)
                noise = torch.arange(n, dtype=x.dtype, device=x.device)
                kwargs["noise"] = noise.expand(x.shape[0], n)
            if self.interpolate and self.kind != "dinov2":  # DINOv2 always interpolates
                kwargs["interpolate_pos_encoding"] = True
            out = self.model(pixel_values=x, output_hidden_states=True, **kwargs)
        grids = []
        for layer in self.layers:
            h = out.hidden_states[layer + 1]  # hidden_states[0] is the embedding output
            h = h[:, h.shape[1] - n :]  # patch tokens are last: drop class / register tokens
            if self.final_norm is not None:
                h = self.final_norm(h)
            grids.append(_tokens_to_grid(h, grid))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and self.kind in ("dinov2", "dinov2_with_registers", "vit_mae"):
            pooled = out.last_hidden_state[:, 0]
        return VFMOutput(grids, pooled)


def _naflex_inputs(x: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """SigLIP2 NaFlex inputs for square images on a full patch grid (as its processor)."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return {
        "pixel_values": patches.reshape(b, gh * gw, p * p * c),
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=x.device),
        "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long, device=x.device),
    }


def _hf_native_size(vcfg) -> int:
    if getattr(vcfg, "image_size", None):
        return int(vcfg.image_size)
    return int(round(vcfg.num_patches**0.5)) * vcfg.patch_size  # SigLIP2 NaFlex


def _resolve_layers(layers: list[int] | None, depth: int) -> list[int]:
    """Block indices (negative counts from the end); default: the last block."""
    layers = list(layers) if layers else [-1]
    if any(not -depth <= i < depth for i in layers):
        raise ValueError(f"VFM layers {layers} out of range for a {depth}-block model")
    return [i % depth for i in layers]


def _missing(spec: str, expected: str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"VFM {spec!r}: weights not found at {expected}. {how}")


def load_local(
    spec: str, path: Path, layers, normalize: bool, resize: int | None
) -> TimmVFM:
    """A timm ViT asset: state_dict + constructor kwargs and mean/std in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    if not path.is_file():
        raise _missing(
            spec,
            str(path),
            "Embedded assets are rebuilt with `latentforge train-asset "
            f"experiments/assets/{path.stem}.yaml`; other files: local:/path/to/file.safetensors.",
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("family") != "timm":
        raise ValueError(f"{path}: not a VFM asset (metadata family={meta.get('family')!r})")
    kwargs = json.loads(meta["model_kwargs"])
    if meta.get("stem") == "conv":
        kwargs["embed_layer"] = conv_stem_patch_embed
    model = VisionTransformer(**kwargs)
    state = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)  # fp16 -> fp32
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    return TimmVFM(model, spec, layers, normalize, resize, mean, std)


def load_timm(
    spec: str,
    name: str,
    layers,
    normalize: bool,
    resize: int | None,
    weights: str | None,
    model_kwargs: dict | None,
) -> TimmVFM:
    """``timm.create_model(name, num_classes=0, **model_kwargs)`` with local weights only."""
    import timm
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    file = weights
    if file is None and hub_id:
        for candidate in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
            hit = try_to_load_from_cache(hub_id, candidate)
            if isinstance(hit, str):
                file = hit
                break
    if file is None or not Path(file).is_file():
        where = weights or (
            f"{HF_HUB_CACHE}/models--{hub_id.replace('/', '--')}/snapshots/*/model.safetensors"
            if hub_id
            else "(no hub id in timm's pretrained config)"
        )
        fetch = f"`hf download {hub_id}`" if hub_id else "the model's weights"
        raise _missing(
            spec,
            where,
            f"Fetch {fetch} on a machine with network access and copy its Hugging Face cache "
            "(HF_HOME) here, or pass the file as tokenizer.vfm_weights=/path/model.safetensors. "
            "Nothing is downloaded at run time.",
        )
    model = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(file)},
        num_classes=0,
        **(model_kwargs or {}),
    )
    return TimmVFM(model, spec, layers, normalize, resize)


def load_hf(spec: str, repo: str, layers, normalize: bool, resize: int | None) -> HFVFM:
    """The vision tower of a transformers checkpoint (local dir or hub cache only)."""
    import transformers
    from huggingface_hub.constants import HF_HUB_CACHE
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _missing(
            spec,
            f"{repo}/config.json (a local directory, or the hub cache {HF_HUB_CACHE})",
            f"Fetch it on a machine with network access (`hf download {repo}`) and copy the "
            "Hugging Face cache (HF_HOME) or the saved directory here. Nothing is downloaded "
            "at run time.",
        ) from e
    if config.model_type not in HF_VISION:
        raise ValueError(
            f"VFM {spec!r}: unsupported model_type {config.model_type!r}; "
            f"supported: {', '.join(sorted(HF_VISION))}"
        )
    cls_name, final_norm = HF_VISION[config.model_type]
    extra = {"mask_ratio": 0.0} if config.model_type == "vit_mae" else {}
    model = getattr(transformers, cls_name).from_pretrained(repo, local_files_only=True, **extra)
    mean, std = _hf_norm(repo, model.config.model_type)
    return HFVFM(model, spec, layers, normalize, resize, mean, std, final_norm)


def _hf_norm(repo: str, model_type: str) -> tuple:
    """mean/std from the checkpoint's ``preprocessor_config.json``, else the family's."""
    path = Path(repo) / "preprocessor_config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "preprocessor_config.json") if "/" in repo else None
        path = Path(hit) if isinstance(hit, str) else path
    if path.is_file():
        proc = json.loads(path.read_text())
        if "image_mean" in proc and "image_std" in proc:
            return tuple(proc["image_mean"]), tuple(proc["image_std"])
    family = model_type.removesuffix("_vision_model")
    return HF_NORM.get(family, (IMAGENET_MEAN, IMAGENET_STD))


def load_vfm(
    spec: str,
    layers: list[int] | None = None,
    resize: int | None = None,
    normalize: bool = True,
    *,
    weights: str | None = None,
    model_kwargs: dict | None = None,
    assets_dir: str | Path | None = None,
) -> VFM:
    """Load a frozen VFM by spec (see the module docstring).

    Args:
        spec: ``local:<asset or path.safetensors>``, ``timm:<model>`` or ``hf:<repo or dir>``.
        layers: block indices whose outputs are returned (negative from the end); default
            the last block.
        resize: side the images are resized to; default the model's own input size.
        normalize: map [-1, 1] to [0, 1] and apply the model's mean/std; False feeds the
            raw [-1, 1] input as VA-VAE did.
        weights: ``timm:`` only: a weights file instead of the hub cache.
        model_kwargs: ``timm:`` only: extra ``timm.create_model`` kwargs.
        assets_dir: ``local:<asset>`` only: where assets live (default: the package's).
    """
    kind, _, name = spec.partition(":")
    if kind == "local" and name:
        if name.endswith(".safetensors"):
            path = Path(name)
        else:
            path = Path(assets_dir or ASSETS) / f"{name}.safetensors"
        return load_local(spec, path, layers, normalize, resize)
    if kind == "timm" and name:
        return load_timm(spec, name, layers, normalize, resize, weights, model_kwargs)
    if kind == "hf" and name:
        return load_hf(spec, name, layers, normalize, resize)
    raise ValueError(f"VFM spec {spec!r}: expected local:<asset>, timm:<model> or hf:<repo or dir>")
