"""Test plugin (``plugins: [tests/families/failing_encoder.py]``): tokenizer family
``vavae-failing``, a VA-VAE whose ``encode`` raises a ``RuntimeError`` once
``fail_after_calls`` calls have completed in its process, unless ``fail_marker`` exists. It
writes the marker first, so a rerun of the same experiment encodes on. It stands in for a
kill inside the extraction's Ray Data encoder actors, which a test's monkeypatch does not
reach: the actors rebuild the experiment, and so import this plugin, themselves.

Same modules, weights and state_dict keys as ``vavae`` (the same trained tokenizer file
loads); the family's entries are vavae's. Import it through the experiment's ``plugins:``
(:func:`latentforge.registry.load_plugins`), not as a module of the ``tests`` package: a
second import would register the family twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latentforge.registry import TOKENIZERS
from latentforge.tokenizers.vavae import (
    VAVAE,
    VAVAEConfig,
    build_vavae,
)


@dataclass
class FailingVAVAEConfig(VAVAEConfig):
    """``tokenizer:`` of the ``vavae-failing`` family: VA-VAE's, plus when to fail."""

    name: str = "vavae-failing"
    fail_after_calls: int = 0  # encode calls this process completes before one raises
    fail_marker: str = ""  # JSON written just before the failure; empty: never fail


class FailingVAVAE(VAVAE):
    """VA-VAE (same modules, same state_dict) whose ``encode`` fails once per marker. Once
    failed, every later call in this process fails too: batches already queued on the
    failed actor write nothing after the failure."""

    fail_after_calls: int = 0
    fail_marker: str = ""
    calls: int = 0
    failed: bool = False

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        if self.fail_marker and (self.failed or self.calls >= self.fail_after_calls):
            self.fail()
        self.calls += 1
        return super().encode(images, sample)

    def fail(self) -> None:
        """Raise, after writing the marker, unless the marker was there first."""
        marker = Path(self.fail_marker)
        if not self.failed:
            if marker.exists():  # a rerun: disarmed
                return
            marker.write_text(json.dumps({"calls": self.calls, "pid": os.getpid()}))
            self.failed = True
        raise RuntimeError(f"killed by the test after {self.calls} encoder calls")


def build_failing(cfg: FailingVAVAEConfig, resolution: int) -> FailingVAVAE:
    model = build_vavae(cfg, resolution)
    model.__class__ = FailingVAVAE  # same modules and weights, only encode differs
    model.fail_after_calls, model.fail_marker = cfg.fail_after_calls, cfg.fail_marker
    return model


# everything else as VA-VAE's own entry says
TOKENIZERS.add(
    dataclasses.replace(
        TOKENIZERS.get("vavae"),
        name="vavae-failing",
        config_cls=FailingVAVAEConfig,
        builder=build_failing,
    )
)
