"""The experiment pipeline: the stages of :data:`~latentforge.platform.stages.STAGES` in
order, tokenizer -> extract -> generator -> sample -> evaluate -> report.

Each stage writes its artifacts to ``run_dir/<stage>/<hash>/`` where the hash covers the
stage's own config parts and its upstream stage's hash. A stage whose ``done.json`` exists
is skipped, so rerunning an experiment re-runs nothing, and changing a generator key
re-runs only the generator and what follows it. A stage's extras (outputs in no hash: the
extraction's latent diagnostics) run after it and whenever it is found cached, and return
at once when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from latentforge.config import ConfigError, ExperimentConfig, config_hash, resolve_run_dir, to_yaml
from latentforge.models import latent_shape_of, read_latent_stats
from latentforge.platform.stages import BY_NAME, NAMES, STAGES


class StageNotReady(RuntimeError):
    """A stage was asked for whose upstream artifacts do not exist yet."""


def stage_hashes(cfg: ExperimentConfig) -> dict[str, str]:
    """Hash of every stage: its own config parts plus the hash of the stage before it."""
    hashes: dict[str, str] = {}
    for stage in STAGES:
        upstream = [hashes[stage.upstream]] if stage.upstream else []
        hashes[stage.name] = config_hash(stage.name, *upstream, *stage.hash_parts(cfg))
    return hashes


def published_generator(cfg: ExperimentConfig) -> bool:
    """``train.generator_images: 0`` with ``generator.weights`` and
    ``generator.latent_stats``: the generator stage needs no extracted latents."""
    g = cfg.generator
    return cfg.train.generator_images == 0 and bool(g.weights and g.latent_stats)


class Run:
    """What a stage sees of its experiment: the config (``run_dir`` absolute), every
    stage's directory and state, the paths of the artifacts and the latent statistics."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] = print):
        self.log = log
        self.run_dir = resolve_run_dir(cfg.run_dir, "experiment")
        # absolute from here on: Ray workers resolve paths against their own cwd
        self.cfg = dataclasses.replace(cfg, run_dir=str(self.run_dir))
        self.hashes = stage_hashes(self.cfg)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage / self.hashes[stage]

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "done.json").exists()

    def done_info(self, stage: str) -> dict:
        return json.loads((self.stage_dir(stage) / "done.json").read_text())

    def paths(self) -> dict[str, str]:
        return {
            "tokenizer": str(self.stage_dir("tokenizer") / "model.safetensors"),
            "latents": str(self.stage_dir("extract")),
            "generator": str(self.stage_dir("generator") / "ema.safetensors"),
            "samples": str(self.stage_dir("sample")),
            "metrics": str(self.stage_dir("evaluate") / "metrics.json"),
        }

    def stats(self) -> dict:
        """The latent statistics: the extraction's, with ``generator.latent_stats`` (the
        normalisation published weights were trained with) replacing mean / std; a
        published generator with its statistics needs no extraction (shape from config)."""
        path = self.stage_dir("extract") / "stats.json"
        if path.exists():
            stats = json.loads(path.read_text())
        elif published_generator(self.cfg):
            stats = {"latent_shape": list(latent_shape_of(self.cfg))}
        else:
            raise StageNotReady(f"no latent statistics yet: {path} (run `latentforge extract`)")
        if file := self.cfg.generator.latent_stats:
            stats.update(read_latent_stats(file, tuple(stats["latent_shape"])))
            stats["stats_source"] = str(file)
        return stats


class Pipeline(Run):
    """Runs the stages of one experiment, skipping those already done."""

    def plan(self) -> list[dict]:
        return [
            {
                "stage": s,
                "hash": self.hashes[s],
                "done": self.is_done(s),
                "dir": str(self.stage_dir(s)),
            }
            for s in NAMES
        ]

    def preflight(self, stages: tuple[str, ...] = NAMES) -> None:
        """Check what a stage would only meet after the ones before it ran, possibly for
        hours: named model configs, metric names, weights and reference files of the
        ``stages`` still to run. Raises :class:`ConfigError` naming the key."""
        try:
            for name in stages:
                if not self.is_done(name):
                    BY_NAME[name].check(self.cfg)
        except (KeyError, ValueError, FileNotFoundError) as e:
            if isinstance(e, ConfigError):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ConfigError(msg) from None

    def save_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def run(self, stages: tuple[str, ...] = NAMES, upstream: bool = False) -> dict:
        """Run ``stages`` in order. With ``upstream``, missing earlier stages run too."""
        self.preflight(NAMES if upstream else tuple(stages))
        self.save_config()
        wanted = list(stages)
        if upstream:
            first = min(NAMES.index(s) for s in stages)
            wanted = sorted(set(wanted) | set(NAMES[:first]), key=NAMES.index)
        if published_generator(self.cfg) and "generator" in wanted and not self.is_done("extract"):
            # a published generator with its own latent statistics samples without latents
            self.log("[extract] not needed: generator.weights with generator.latent_stats")
            wanted = [s for s in wanted if s != "extract"]
        for stage in wanted:
            self.run_stage(stage)
        return {s: self.done_info(s) for s in wanted}

    def run_stage(self, name: str) -> dict:
        stage = BY_NAME[name]
        if self.is_done(name):
            self.log(f"[{name}] cached: {self.stage_dir(name)}")
            if stage.extras:  # what the done stage still owes (complete: returns at once)
                stage.extras(self, self.stage_dir(name))
            return self.done_info(name)
        before = stage.upstream
        if name == "generator" and published_generator(self.cfg):
            before = "tokenizer"  # its latent shape; the statistics come with the weights
        if before and not self.is_done(before):
            raise StageNotReady(
                f"{name} needs the {before} stage's artifacts ({self.stage_dir(before)}); "
                f"run `latentforge {BY_NAME[before].verb}` (or `latentforge run`) first"
            )
        out = self.stage_dir(name)
        if out.exists() and not stage.resumes_in_place:
            # a stage that did not finish: training resumes from Ray storage; extraction
            # and sampling resume from their finished shards / chunks in place
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(self.cfg))
        self.log(f"[{name}] running -> {out}")
        t0 = time.time()
        info = stage.run(self, out) or {}
        info.update({"stage": name, "hash": self.hashes[name], "seconds": time.time() - t0})
        tmp = out / "done.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, out / "done.json")
        self.log(f"[{name}] done in {info['seconds']:.1f} s")
        if stage.extras:  # after done.json: the stage's time and result are its own
            stage.extras(self, out)
        return info
