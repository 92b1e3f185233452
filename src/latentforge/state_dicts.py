"""Comparing a published checkpoint's state_dict with a model's, for strict loading with an
error that says what differs."""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
