"""Features of several depths of a frozen VFM at once (VFM-VAE's multi-level encoder input;
Bi et al. 2025, tianciB/VFM-VAE), for the VFMs of :mod:`latentforge.tokenizers.vfm`."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.tokenizers.vfm import HFVFM, VFM, TimmVFM, _tokens_to_grid


def encode_levels(vfm: VFM, x: torch.Tensor, levels: list[int]) -> list[torch.Tensor]:
    """Token grids (B, C, h, w) of several depths of a frozen VFM at once, on input ``x``
    already prepared (resized and normalised) at any size divisible by the patch size.

    Levels are indexed as VFM-VAE indexes them (Bi et al. 2025, tianciB/VFM-VAE): ``0`` is
    the patch embedding (with the position embedding added), ``k`` the output of
    transformer block ``k`` (before any final norm), ``-1`` the final, normed output, and
    ``-k`` (k >= 2) the output of the k-1-th last block. The position embedding is
    interpolated for inputs other than the model's own size.
    """
    with torch.no_grad():
        if isinstance(vfm, TimmVFM):
            hidden, final, grid = _timm_hidden(vfm.model, x)
        elif isinstance(vfm, HFVFM):
            out = vfm.model(
                pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True
            )
            hidden, final = list(out.hidden_states), out.last_hidden_state
            grid = (x.shape[-2] // vfm.patch_size, x.shape[-1] // vfm.patch_size)
        else:
            raise TypeError(f"{type(vfm).__name__}: no multi-level features")
    n = grid[0] * grid[1]
    grids = []
    for level in levels:
        h = final if level == -1 else hidden[level if level >= 0 else level + 1]
        grids.append(_tokens_to_grid(h[:, h.shape[1] - n :].float(), grid))  # (B, C, h, w)
    return grids


def _timm_hidden(model: nn.Module, x: torch.Tensor):
    """A timm ViT's token sequences: [embedding, block 1, ..., block N], the normed final
    output and the patch grid, at any input size (position embedding resampled)."""
    from timm.layers import resample_abs_pos_embed

    embed = model.patch_embed
    tokens = embed.proj(x)  # (B, C, h, w)
    grid = tuple(tokens.shape[-2:])
    tokens = embed.norm(tokens.flatten(2).transpose(1, 2))  # (B, h*w, C)
    prefix = [] if model.cls_token is None else [model.cls_token.expand(x.shape[0], -1, -1)]
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(x.shape[0], -1, -1))
    n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos = resample_abs_pos_embed(
        model.pos_embed, new_size=grid, old_size=embed.grid_size, num_prefix_tokens=n_prefix
    )
    if model.no_embed_class:
        tokens = torch.cat([*prefix, tokens + pos], dim=1)
    else:
        tokens = torch.cat([*prefix, tokens], dim=1) + pos
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    hidden = [tokens]
    for block in model.blocks:
        hidden.append(block(hidden[-1]))
    return hidden, model.norm(hidden[-1]), grid
