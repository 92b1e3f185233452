"""Test plugin (``plugins: [tests/families/crashing.py]``): generator family ``crashing``, a
LightningDiT whose Ray Train worker process dies (SIGKILL, a real crash) in the forward
after ``crash_after_calls`` forwards, once per marker: it first waits until Ray Train has
registered every checkpoint it reported (so the restarted worker group finds the latest),
then writes ``crash_marker`` (forwards done, pid). An existing marker disarms it, so the
restarted workers train on. Outside a Ray Train worker it never crashes."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from latentforge.generators.lightningdit import (
    LightningDiT,
    LightningDiTConfig,
    build_lightningdit,
    resolve_arch,
)
from latentforge.registry import GENERATORS


@dataclass
class CrashingConfig(LightningDiTConfig):
    """``generator:`` of the ``crashing`` family: LightningDiT's, plus when to crash."""

    name: str = "crashing"
    crash_after_calls: int = 0  # forwards this process completes before it dies
    crash_marker: str = ""  # JSON written just before the crash; empty: never crash


class CrashingDiT(LightningDiT):
    """LightningDiT (same modules, same state_dict keys) that crashes its Train worker."""

    crash_after_calls: int = 0
    crash_marker: str = ""
    calls: int = 0

    def forward(self, *args, **kwargs):
        if self.crash_marker and self.calls >= self.crash_after_calls:
            crash_once(self.crash_marker, self.calls)
        self.calls += 1
        return super().forward(*args, **kwargs)


def crash_once(marker: str, calls: int) -> None:
    """SIGKILL this process unless ``marker`` exists or this is no Ray Train worker."""
    import ray.train

    if Path(marker).exists():
        return
    try:
        ray.train.get_context()
    except RuntimeError:  # the driver, a test process, a sampling task: never crash
        return
    ray.train.get_all_reported_checkpoints()  # blocks until every report is registered
    Path(marker).write_text(json.dumps({"calls": calls, "pid": os.getpid()}))
    os.kill(os.getpid(), signal.SIGKILL)


def build_crashing(cfg: CrashingConfig, *args, **kwargs) -> CrashingDiT:
    model = build_lightningdit(cfg, *args, **kwargs)
    model.__class__ = CrashingDiT  # same modules and weights, only forward differs
    model.crash_after_calls, model.crash_marker = cfg.crash_after_calls, cfg.crash_marker
    return model


GENERATORS.register("crashing", config=CrashingConfig, check=resolve_arch)(build_crashing)
