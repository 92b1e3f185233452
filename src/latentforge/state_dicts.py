"""Reading published checkpoints, and comparing their state_dict with a model's for strict
loading with an error that says what differs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


def mismatch(
    ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], optional: str = ""
) -> str | None:
    """None when ``theirs`` has exactly ``ours``' keys and shapes (keys starting with
    ``optional``, when given, may be absent); else a short description of what differs."""
    missing = [k for k in ours if k not in theirs and not (optional and k.startswith(optional))]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        (k, tuple(theirs[k].shape), tuple(ours[k].shape))
        for k in theirs
        if k in ours and theirs[k].shape != ours[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}"


def read_state_dict(
    path: str | Path, entries: tuple[str, ...] = ("state_dict", "model")
) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict: a safetensors file as it is; a torch file's first entry
    of ``entries`` present (e.g. an official LightningDiT file's ``"ema"``), else the file
    as a plain state_dict. A DDP ``module.`` prefix is dropped. Loaded with
    ``weights_only=True``: never a pickled object."""
    file = Path(path).expanduser()
    if file.suffix == ".safetensors":
        sd = load_file(str(file))
    else:
        ckpt = torch.load(str(file), map_location="cpu", weights_only=True)
        sd = next((ckpt[k] for k in entries if k in ckpt), ckpt)
    return {k.removeprefix("module."): v for k, v in sd.items()}
