"""The schema of a sweep YAML and what follows from it without running anything: its
points, each trial's experiment (file, overrides, run directory) and each rung's.
:mod:`latentforge.platform.sweep` runs it with Ray Tune."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from latentforge.config import (
    URI,
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_experiment,
    merge_schema,
    read_mapping,
    resolve_run_dir,
    to_dict,
)
from latentforge.metrics.table import DIAGNOSTIC_NAMES, diagnostic_of, direction


@dataclass
class SearchDim:
    """One dimension: exactly one of ``grid`` / ``choice`` / ``uniform`` / ``loguniform``."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None


@dataclass
class Objective:
    metric: str = "fd_shapesnet"
    mode: Literal["min", "max"] | None = None  # None: the metric table's direction


@dataclass
class DiagnosticStop:
    """Stop a trial after extraction when ``metric`` (a diagnostics.json key, e.g.
    ``probe_accuracy``) is worse than the ``quantile`` of the trials' before it; off while
    ``metric`` is unset or fewer than ``min_trials`` trials have one."""

    metric: str | None = None
    mode: Literal["min", "max"] | None = None  # None: the metric table's direction
    quantile: float = 0.5  # of the better-is-higher values: stop below it
    min_trials: int = 2


@dataclass
class Variant:
    """One experiment of a sweep across experiments: its file (relative to the sweep file;
    empty: the sweep's ``base``), its own overrides and its plot labels."""

    base: str = ""
    overrides: list[str] = field(default_factory=list)
    family: str | None = None  # marker label (None: tokenizer.name)
    size: str | None = None  # colour label (None: the latent shape, e.g. 4x8x8)


@dataclass
class Scheduler:
    """``fifo`` runs every trial to the end; ``asha`` stops weak ones at rung boundaries.
    With ``rungs`` > 1 either trains the generator in rungs and reports after each (for
    fifo, a learning curve per trial; ASHA needs at least 2)."""

    name: Literal["fifo", "asha"] = "fifo"
    rungs: int = 1  # evaluations along the generator's training
    grace_rungs: int = 1  # rungs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung
    rung_samples: int | None = None  # samples for intermediate rungs (None: sample.num_images)
    diagnostic_stop: DiagnosticStop = field(default_factory=DiagnosticStop)


@dataclass
class SweepSpec:
    """Schema of a sweep YAML."""

    base: str = ""  # experiment YAML, relative to the sweep file
    name: str = "sweep"
    # named experiments crossed with search_space (each a file and overrides)
    variants: dict[str, Variant] = field(default_factory=dict)
    run_dir: str | None = None  # default: <base run_dir>-<name>
    overrides: list[str] = field(default_factory=list)  # applied to every trial
    search_space: dict[str, SearchDim] = field(default_factory=dict)
    num_samples: int = 1  # random draws for choice/uniform dims (grids are crossed)
    objective: Objective = field(default_factory=Objective)
    scheduler: Scheduler = field(default_factory=Scheduler)
    frontier_x: str = "rfd_shapesnet"  # reconstruction axis of the frontier plot
    # its better direction; None: the metric table's (max for psnr, ...; min for distances)
    frontier_x_mode: Literal["min", "max"] | None = None
    # the trial driver only waits on its pipeline task: reserve memory, not CPUs, so the
    # Train workers and Ray Data operators of the trial get every CPU
    resources_per_trial: dict[str, float] = field(
        default_factory=lambda: {"cpu": 0, "memory": 2**28}
    )
    max_concurrent_trials: int = 1
    seed: int = 0


@dataclass
class Sweep:
    spec: SweepSpec
    base_path: Path  # the sweep's base experiment (a variant may name its own)
    run_dir: Path
    source: Path = Path("sweep.yaml")  # the sweep file (variants' paths are relative to it)

    def grids(self) -> dict[str, list[Any]]:
        """The crossed dims: ``variant`` (the named variants) and the ``grid`` dims."""
        grids = {"variant": list(self.spec.variants)} if self.spec.variants else {}
        dims = self.spec.search_space.items()
        return grids | {k: list(d.grid) for k, d in dims if d.grid is not None}

    def points(self) -> list[dict[str, Any]]:
        """Grid points (cartesian product of the ``grid`` dims); random dims left to Tune."""
        grids = self.grids()
        keys = list(grids)
        return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grids.values())]

    def experiment(self, point: dict[str, Any]) -> tuple[Path, list[str]]:
        """The experiment file of ``point`` and the overrides it takes (the sweep's, its
        variant's, the point's own keys)."""
        keys = [f"{k}={v}" for k, v in sorted(point.items()) if k != "variant"]
        if "variant" not in point:
            return self.base_path, [*self.spec.overrides, *keys]
        variant = self.spec.variants[point["variant"]]
        base = (self.source.parent / variant.base).resolve() if variant.base else self.base_path
        return base, [*self.spec.overrides, *variant.overrides, *keys]


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """The sweep file with ``overrides``, checked: its experiment (``base:``, here the
    experiment the sweep varies, not a file to inherit from), the shared overrides and
    every grid point load against the schema, so a typo names its key before any trial."""
    path = Path(path).resolve()  # trials run in other working directories
    node = apply_overrides(read_mapping(path), overrides, path)
    spec: SweepSpec = merge_schema(SweepSpec, node, str(path))
    unnamed = [n for n, v in spec.variants.items() if not v.base]
    if not spec.base and (unnamed or not spec.variants):
        where = f"variants.{unnamed[0]}.base or " if unnamed else ""
        raise ConfigError(f"{path}: {where}base: the experiment YAML this sweep varies is required")
    if "variant" in spec.search_space:
        raise ConfigError(f"{path}: search_space.variant: `variant` names the variants: entries")
    first = spec.base or next(iter(spec.variants.values())).base
    base_path = (path.parent / first).resolve()
    for key, dim in spec.search_space.items():
        given = [
            n for n in ("grid", "choice", "uniform", "loguniform") if getattr(dim, n) is not None
        ]
        if len(given) != 1:
            raise ConfigError(
                f"{path}: search_space.{key}: give exactly one of grid/choice/uniform/loguniform"
            )
    check_objective(spec, path)
    check_diagnostic_stop(spec.scheduler.diagnostic_stop, path)
    if spec.scheduler.name == "asha" and spec.scheduler.rungs < 2:
        raise ConfigError(f"{path}: scheduler.rungs: asha needs at least 2 rungs")
    # a trial's run directory is named by its point, so a repeated point is the same trial:
    # a cache hit when run after the first, a collision when run beside it
    dims = spec.search_space.values()
    if spec.num_samples > 1 and all(d.grid is not None for d in dims):
        raise ConfigError(
            f"{path}: num_samples: {spec.num_samples} repeats every grid point, and a repeated "
            "point is the same (cached) trial; set num_samples: 1"
        )
    if spec.max_concurrent_trials > 1 and any(d.choice is not None for d in dims):
        raise ConfigError(
            f"{path}: search_space: random `choice` dims can draw one point twice, and two "
            "trials of one point must not run at once (they share its run directory); use "
            "`grid` for discrete dims or max_concurrent_trials: 1"
        )
    sweep = Sweep(spec, base_path, Path(), path)
    try:  # the base, the shared overrides and every grid point (a typo names its key)
        base = load_experiment(base_path, spec.overrides)
        check_points(sweep)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if spec.run_dir and URI.match(spec.run_dir):
        raise ConfigError(f"{path}: run_dir: {spec.run_dir!r} is a URI; give a filesystem path")
    default = f"{base.run_dir}-{spec.name}" if spec.base else f"runs/sweeps/{spec.name}"
    run_dir = resolve_run_dir(spec.run_dir or default, str(path))
    return Sweep(spec, base_path, run_dir, path)


def check_points(sweep: Sweep) -> None:
    """Every grid point's experiment loads, and has the diagnostic a stop reads."""
    stop = sweep.spec.scheduler.diagnostic_stop.metric
    for point in sweep.points() or [{}]:
        where = f"variants.{point['variant']}: " if "variant" in point else ""
        try:
            cfg = load_experiment(*sweep.experiment(point))
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        if stop and diagnostic_of(stop).group not in cfg.extract.diagnostics.metrics:
            raise ConfigError(
                f"{where}scheduler.diagnostic_stop.metric: {stop} needs "
                f"{diagnostic_of(stop).group!r} in extract.diagnostics.metrics"
            )


def objective_mode(spec: SweepSpec) -> str:
    """``objective.mode``, or the metric table's direction when unset (min for metrics it
    does not know)."""
    return spec.objective.mode or direction(spec.objective.metric) or "min"


def check_objective(spec: SweepSpec, path: Path) -> None:
    """An objective optimised against its metric's direction is a mistake: say so."""
    known = direction(spec.objective.metric)
    if spec.objective.mode and known and spec.objective.mode != known:
        raise ConfigError(
            f"{path}: objective.mode: {spec.objective.mode!r}, but {spec.objective.metric} is "
            f"better when {'higher' if known == 'max' else 'lower'}; set {known!r} or leave "
            "it out"
        )


def check_diagnostic_stop(stop: DiagnosticStop, path: Path) -> None:
    if stop.metric is None:
        return
    if diagnostic_of(stop.metric) is None:
        raise ConfigError(
            f"{path}: scheduler.diagnostic_stop.metric: {stop.metric!r} is no latent "
            f"diagnostic; known: {', '.join(DIAGNOSTIC_NAMES)}"
        )
    known = direction(stop.metric)
    if stop.mode and known and stop.mode != known:
        raise ConfigError(
            f"{path}: scheduler.diagnostic_stop.mode: {stop.mode!r}, but {stop.metric} is "
            f"better when {'higher' if known == 'max' else 'lower'}; set {known!r} or leave "
            "it out"
        )
    if not stop.mode and not known:
        raise ConfigError(
            f"{path}: scheduler.diagnostic_stop.mode: {stop.metric} has no better direction; "
            "set min or max"
        )
    if not 0 < stop.quantile < 1 or stop.min_trials < 1:
        raise ConfigError(
            f"{path}: scheduler.diagnostic_stop: need 0 < quantile < 1 and min_trials >= 1"
        )


def trial_config(sweep: Sweep, point: dict[str, Any]):
    """The experiment of one trial, in its own run dir named by the point's hash."""
    base, overrides = sweep.experiment(point)
    run_dir = sweep.run_dir / "trials" / config_hash(sorted(point.items()))
    return load_experiment(base, [*overrides, f"run_dir={run_dir}"])


def rung_config(sweep: Sweep, cfg, rung: int, init: str | None):
    """The experiment of rung ``rung`` (1-based) of a trial: ``rung/R`` of its generator
    images, continuing from ``init`` (the previous rung's checkpoint); intermediate rungs
    sample ``rung_samples`` images."""
    scheduler_cfg = sweep.spec.scheduler
    images = int(round(cfg.train.generator_images * rung / scheduler_cfg.rungs))
    changes = [f"train.generator_images={images}"]
    if cfg.train.generator_lr_decay and cfg.train.generator_decay_end_images is None:
        # one schedule over the full budget, continued rung by rung
        changes.append(f"train.generator_decay_end_images={cfg.train.generator_images}")
    if init:
        changes.append(f"train.generator_init={init}")
    if rung < scheduler_cfg.rungs and scheduler_cfg.rung_samples:
        changes.append(f"sample.num_images={scheduler_cfg.rung_samples}")
    return merge_overrides(cfg, changes)


def merge_overrides(cfg, changes: list[str]):
    node = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.from_dotlist(changes))
    return from_dict(OmegaConf.to_container(node, resolve=True))


def sch_rungs(sweep: Sweep) -> int:
    return max(1, sweep.spec.scheduler.rungs)


# config keys that name a file or folder a trial reads (its weights, statistics, data)
FILE_KEYS = frozenset(
    {
        "weights",
        "vfm_weights",
        "disc_vfm_weights",
        "disc_weights",
        "latent_stats",
        "guide_weights",
        "inception_weights",
        "fid_reference",
        "fd_vfm_weights",
    }
)
DATA_KEYS = frozenset({"data.path", "data.holdout_path"})
HUB = ("hf:", "timm:")  # model specs resolved from a hub cache (tokenizers/vfm.py)


def required_inputs(cfg) -> tuple[list[dict], list[dict]]:
    """What a trial's experiment reads from outside its run directory: files (``key``,
    ``path``, ``exists``: None for URIs and globs, which are not checked) and hub-cache
    models (``key``, ``spec``), by walking its config."""
    files, hub = [], []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif isinstance(value, str) and value.startswith(HUB):
                hub.append({"key": name, "spec": value})
            elif isinstance(value, str) and (key in FILE_KEYS or name in DATA_KEYS):
                if URI.match(value) or any(c in value for c in "*?["):  # remote or a glob
                    files.append({"key": name, "path": value, "exists": None})
                    continue
                files.append({"key": name, "path": value, "exists": Path(value).exists()})

    walk(to_dict(cfg), "")
    return files, hub


def sweep_plan(sweep: Sweep) -> list[dict]:
    """Every grid trial's plan without running it: its variant and family, experiment,
    run directory, training budgets, generator, Ray resources and the files and hub
    models it needs (with whether each file is there)."""
    plan = []
    for point in sweep.points():
        cfg = trial_config(sweep, point)
        files, hub = required_inputs(cfg)
        variant = sweep.spec.variants.get(point.get("variant", ""), Variant())
        plan.append(
            {
                "point": point,
                "family": variant.family or cfg.tokenizer.name,
                "experiment": str(sweep.experiment(point)[0]),
                "run_dir": cfg.run_dir,
                "tokenizer": f"{cfg.tokenizer.name}:{cfg.tokenizer.config}",
                "tokenizer_images": cfg.train.tokenizer_images,
                "generator": f"{cfg.generator.name}:{cfg.generator.config}",
                "generator_images": cfg.train.generator_images,
                "resources": {
                    "workers": cfg.ray.num_workers,
                    "gpu": cfg.ray.use_gpu,
                    "accelerator_type": cfg.ray.accelerator_type,
                    "cpus_per_worker": cfg.ray.cpus_per_worker,
                },
                "files": files,
                "hub": hub,
            }
        )
    return plan
