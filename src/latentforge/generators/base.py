"""The Generator interface: a backbone that knows nothing about the noise process."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

A = TypeVar("A")


def named_arch(configs: dict[str, A], cfg, without_layers: str | None = None) -> A:
    """The architecture ``configs[cfg.config]``; with ``without_layers`` (a family's name),
    raises for the transport weights that need layers the family does not have (REPA,
    REG)."""
    if cfg.config not in configs:
        raise KeyError(f"unknown generator config {cfg.config!r}; known: {', '.join(configs)}")
    for key in ("repa_weight", "reg_weight") if without_layers else ():
        if getattr(cfg.transport, key) > 0:
            raise ValueError(
                f"generator.transport.{key}: {without_layers} has no {key[:3].upper()} layers"
            )
    return configs[cfg.config]


class Generator(nn.Module):
    """Class-conditional latent backbone; the transport decides what its output means.

    ``num_classes`` real classes use ids 0..num_classes-1; id ``num_classes`` is the
    null (unconditional) class used by classifier-free guidance.
    """

    num_classes: int

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Args: x_t (B, *latent_shape) noisy latent, a grid (B, C, H, W) or 1-D tokens
        (B, C, N); t (B,) flow time in [0, 1]; y (B,) labels.

        Returns the prediction of x_t's shape chosen by the transport config.
        """
        raise NotImplementedError
