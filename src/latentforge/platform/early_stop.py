"""Stopping a sweep trial after its extraction, before any generator compute.

A trial that has trained its tokenizer and extracted its latents knows its latent
diagnostics (:mod:`latentforge.platform.diagnose`) in seconds. When one of them is worse
than the running ``quantile`` of the same diagnostic over the trials that reached this
point before it (the rule of ASHA's rungs and of median stopping, Golovin et al. 2017,
"Google Vizier", applied at a rung before the first generator step), the trial ends
there. The record is one small JSON file per trial under the sweep's run directory, in a
folder per Tune run name, so a second run of the same grid under another name (ASHA
replayed on a finished grid) decides on its own running history.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation between order statistics
    (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def should_stop(value: float, before: list[float], mode: str, q: float, min_trials: int) -> bool:
    """Whether ``value`` is worse than the ``q`` quantile of ``before`` (orientated so that
    higher is better: for ``mode="min"`` the values are negated). Never with fewer than
    ``min_trials`` values before it; never for a NaN of its own (a diagnostic that could
    not be computed says nothing)."""
    valid = [v for v in before if v == v]
    if len(valid) < min_trials or value != value:
        return False
    sign = 1.0 if mode == "max" else -1.0
    return sign * value < quantile([sign * v for v in valid], q)


class StopRecord:
    """The diagnostic values of the trials of one sweep run, one file per trial. ``rule``
    (the stop's settings) is stored with each entry: entries of another rule (the sweep
    rerun under the same name with other settings) are neither reused nor compared with;
    ``key`` (the trial's extraction hash) likewise for a trial whose latents changed."""

    def __init__(self, sweep_dir: Path, run_name: str, metric: str, rule: dict | None = None):
        self.dir = Path(sweep_dir) / "diagnostic_stop" / run_name
        self.metric = metric
        self.rule = {"metric": metric, **(rule or {})}

    def _entries(self) -> dict[str, dict]:
        if not self.dir.exists():
            return {}
        entries = {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}
        return {k: e for k, e in entries.items() if e.get("rule") == self.rule}

    def before(self, trial: str) -> list[float]:
        """Values of the other trials recorded so far under this rule."""
        return [float(e["value"]) for k, e in self._entries().items() if k != trial]

    def decision(self, trial: str, key: str = "") -> dict | None:
        """The decision recorded for ``trial`` (a restarted trial keeps its first one)."""
        entry = self._entries().get(trial)
        return entry if entry is not None and entry.get("key", "") == key else None

    def add(self, trial: str, value: float, stopped: bool, among: int, key: str = "") -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        entry = {"rule": self.rule, "key": key, "value": value, "stopped": stopped, "among": among}
        tmp = self.dir / f"{trial}.json.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self.dir / f"{trial}.json")
        return entry


def decide(
    record: StopRecord, trial: str, diagnostics: dict, mode: str, q: float, n: int, key: str = ""
) -> dict:
    """Decide once for ``trial`` (with its extraction's ``diagnostics``; ``key``: the
    extraction's hash) and record it; a trial resumed after the decision gets the recorded
    one."""
    if (known := record.decision(trial, key)) is not None:
        return known
    if record.metric not in diagnostics:
        raise KeyError(
            f"scheduler.diagnostic_stop.metric: {record.metric!r} is not in this trial's "
            f"diagnostics.json (has: {', '.join(sorted(diagnostics)) or 'none'}); enable it "
            "in extract.diagnostics.metrics"
        )
    value = float(diagnostics[record.metric])
    before = record.before(trial)
    return record.add(trial, value, should_stop(value, before, mode, q, n), len(before), key)
