"""Ray Tune sweeps over experiment keys, ending in a reconstruction-vs-generation frontier.

A sweep YAML names a base experiment, a search space over dotted experiment keys and an
objective. One Tune trial = the whole pipeline (tokenizer -> ... -> evaluate) for one
point, in its own run directory named by the point's hash (never by a counter, which races
between trials). Tune's function trainable is the driver of the Ray Train jobs inside it
(Train V2). Results: ``results.json``, ``results.csv``, ``frontier.png`` and ``sweep.md``
in the sweep dir. A trial reports its extraction's latent diagnostics with its metrics, and
``sweep.md`` ranks them against the objective (Spearman, at each rung).

Early stopping (``scheduler: {name: asha, rungs: R}``): a trial trains its generator in R
rungs of ``generator_images / R`` images, each continuing from the previous rung's
checkpoint (``train.generator_init``), and after each rung samples and evaluates
(``rung_samples`` images for the intermediate rungs) and reports the objective with
``rung`` as ASHA's time axis (Li et al. 2020, "A System for Massively Parallel
Hyperparameter Tuning"). ``rung`` is a reported metric, not Tune's iteration counter, so
it stays right after ``--resume`` (Tune restarts function trainables; finished rungs are
cached stages and cost nothing).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from omegaconf import OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler

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
from latentforge.frontier import (
    correlation_markdown,
    diagnostic_correlations,
    pareto_front,
    plot_frontier,
    summary_markdown,
    write_tables,
)
from latentforge.metrics.table import direction, higher_is_better
from latentforge.platform.diagnose import read_diagnostics
from latentforge.platform.pipeline import Pipeline
from latentforge.platform.stages import NAMES
from latentforge.platform.workers import connect, outside_placement_group


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
class Scheduler:
    """``fifo`` runs every trial to the end; ``asha`` stops weak ones at rung boundaries.
    With ``rungs`` > 1 either trains the generator in rungs and reports after each (for
    fifo, a learning curve per trial; ASHA needs at least 2)."""

    name: Literal["fifo", "asha"] = "fifo"
    rungs: int = 1  # evaluations along the generator's training
    grace_rungs: int = 1  # rungs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung
    rung_samples: int | None = None  # samples for intermediate rungs (None: sample.num_images)


@dataclass
class SweepSpec:
    """Schema of a sweep YAML."""

    base: str = ""  # experiment YAML, relative to the sweep file
    name: str = "sweep"
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
    base_path: Path
    run_dir: Path

    def points(self) -> list[dict[str, Any]]:
        """Grid points (cartesian product of the ``grid`` dims); random dims left to Tune."""
        grids = {k: d.grid for k, d in self.spec.search_space.items() if d.grid is not None}
        keys = list(grids)
        return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grids.values())]


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """The sweep file with ``overrides``, checked: its experiment (``base:``, here the
    experiment the sweep varies, not a file to inherit from), the shared overrides and
    every grid point load against the schema, so a typo names its key before any trial."""
    path = Path(path)
    node = apply_overrides(read_mapping(path), overrides, path)
    spec: SweepSpec = merge_schema(SweepSpec, node, str(path))
    if not spec.base:
        raise ConfigError(f"{path}: base: the experiment YAML this sweep varies is required")
    base_path = (path.parent / spec.base).resolve()
    for key, dim in spec.search_space.items():
        given = [
            n for n in ("grid", "choice", "uniform", "loguniform") if getattr(dim, n) is not None
        ]
        if len(given) != 1:
            raise ConfigError(
                f"{path}: search_space.{key}: give exactly one of grid/choice/uniform/loguniform"
            )
    check_objective(spec, path)
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
    try:  # the base, the shared overrides and every grid point (a typo names its key)
        base = load_experiment(base_path, spec.overrides)
        for point in Sweep(spec, base_path, Path()).points() or [{}]:
            load_experiment(base_path, [*spec.overrides, *(f"{k}={v}" for k, v in point.items())])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if spec.run_dir and URI.match(spec.run_dir):
        raise ConfigError(f"{path}: run_dir: {spec.run_dir!r} is a URI; give a filesystem path")
    run_dir = resolve_run_dir(spec.run_dir or f"{base.run_dir}-{spec.name}", str(path))
    return Sweep(spec, base_path, run_dir)


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


def param_space(sweep: Sweep) -> dict[str, Any]:
    space = {}
    for key, dim in sweep.spec.search_space.items():
        if dim.grid is not None:
            space[key] = tune.grid_search(list(dim.grid))
        elif dim.choice is not None:
            space[key] = tune.choice(list(dim.choice))
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        else:
            space[key] = tune.loguniform(*dim.loguniform)
    return space


def trial_config(sweep: Sweep, point: dict[str, Any]):
    """The experiment of one trial, in its own run dir named by the point's hash."""
    overrides = [*sweep.spec.overrides, *(f"{k}={v}" for k, v in sorted(point.items()))]
    run_dir = sweep.run_dir / "trials" / config_hash(sorted(point.items()))
    return load_experiment(sweep.base_path, [*overrides, f"run_dir={run_dir}"])


def _run_pipeline(experiment: dict) -> tuple[dict, str | None]:
    """One trial's (or rung's) pipeline; returns its metrics (with its extraction's latent
    diagnostics) and the generator checkpoint."""
    pipeline = Pipeline(from_dict(experiment))
    pipeline.run()
    metrics = json.loads(Path(pipeline.paths()["metrics"]).read_text())
    metrics = read_diagnostics(pipeline.stage_dir("extract")) | metrics
    return metrics, pipeline.done_info("generator").get("checkpoint")


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


def _trainable(config: dict) -> None:
    """Tune trial: run the pipeline in a task scheduled outside the trial's placement
    group. Inside it, Ray Data would limit itself to the trial's tiny bundle and child
    tasks would be captured into it; Train places its own workers either way. With ASHA the
    trial runs rung by rung and reports after each."""
    sweep: Sweep = config.pop("__sweep__")
    cfg = trial_config(sweep, config)
    task = ray.remote(_run_pipeline).options(
        num_cpus=0, scheduling_strategy=outside_placement_group()
    )
    scheduler_cfg = sweep.spec.scheduler
    if scheduler_cfg.rungs <= 1:
        metrics, _ = ray.get(task.remote(to_dict(cfg)))
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        tune.report({**flat, "rung": 1, "run_dir": str(cfg.run_dir)})
        return
    init = None
    for rung in range(1, scheduler_cfg.rungs + 1):
        rcfg = rung_config(sweep, cfg, rung, init)
        metrics, init = ray.get(task.remote(to_dict(rcfg)))
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        images = rcfg.train.generator_images
        tune.report({**flat, "rung": rung, "generator_images": images, "run_dir": str(cfg.run_dir)})


def run_sweep(sweep: Sweep, resume: bool = False) -> dict:
    """Run (or resume) the sweep with Ray Tune; write results, frontier plot and summary."""
    connect(load_experiment(sweep.base_path, sweep.spec.overrides))
    resources = {
        k.upper() if k in ("cpu", "gpu") else k: v
        for k, v in sweep.spec.resources_per_trial.items()
    }
    trainable = tune.with_resources(_trainable, resources)
    storage = str(sweep.run_dir / "tune")
    path = f"{storage}/{sweep.spec.name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        space = {**param_space(sweep), "__sweep__": sweep}
        scheduler_cfg = sweep.spec.scheduler
        scheduler = None
        if scheduler_cfg.name == "asha":
            scheduler = ASHAScheduler(
                time_attr="rung",
                max_t=scheduler_cfg.rungs,
                grace_period=scheduler_cfg.grace_rungs,
                reduction_factor=scheduler_cfg.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.spec.objective.metric,
                mode=objective_mode(sweep.spec),
                num_samples=sweep.spec.num_samples,
                max_concurrent_trials=sweep.spec.max_concurrent_trials,
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(name=sweep.spec.name, storage_path=storage),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        point = {k: v for k, v in result.config.items() if k != "__sweep__"}
        metrics = result.metrics or {}
        rows.append(
            {
                "point": point,
                "metrics": metrics,
                "error": str(result.error) if result.error else None,
                "rung": metrics.get("rung"),
                "stopped_early": metrics.get("rung", sch_rungs(sweep)) < sch_rungs(sweep),
                "objective_by_rung": objective_by_rung(result, sweep.spec.objective.metric),
            }
        )
    return write_results(sweep, rows)


def objective_by_rung(result, metric: str) -> dict[int, float]:
    """The objective a trial reported at each rung it reached (Tune's history of it)."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "rung" not in frame:
        return {}
    pairs = zip(frame["rung"], frame[metric], strict=True)
    return {int(r): float(v) for r, v in pairs if r == r and v == v}  # NaN != NaN


def sch_rungs(sweep: Sweep) -> int:
    return max(1, sweep.spec.scheduler.rungs)


def trial_stage_dirs(sweep: Sweep, point: dict[str, Any], rung: int) -> list[Path]:
    """The stage directories trial ``point`` used up to ``rung`` (tokenizer and extract
    once, then every rung's generator, sample, evaluate and report), as ``_trainable``
    derives them; those not (yet) done are left out."""
    cfg = trial_config(sweep, point)
    if sch_rungs(sweep) <= 1:
        pipelines = [Pipeline(cfg, log=lambda _: None)]
    else:
        pipelines, init = [], None
        for r in range(1, rung + 1):
            p = Pipeline(rung_config(sweep, cfg, r, init), log=lambda _: None)
            pipelines.append(p)
            if not p.is_done("generator"):
                break
            init = p.done_info("generator").get("checkpoint")
    dirs = {p.stage_dir(s): None for p in pipelines for s in NAMES if p.is_done(s)}
    return list(dirs)


def write_results(sweep: Sweep, rows: list[dict]) -> dict:
    """``results.json``, ``results.csv``, ``frontier.png`` and ``sweep.md`` in the sweep
    directory (:mod:`latentforge.frontier`). Trials stopped early by ASHA are listed with
    the rung they reached and kept off the front."""
    spec, out = sweep.spec, sweep.run_dir
    y, x = spec.objective.metric, spec.frontier_x
    write_tables(out, rows, x, y)
    ok = [r for r in rows if r["error"] is None and y in r["metrics"]]
    full = [r for r in ok if not r.get("stopped_early")]
    x_mode = spec.frontier_x_mode or ("max" if higher_is_better(x) else "min")
    mode = objective_mode(spec)
    front = pareto_front(full, x, y, mode, x_mode)
    plot_frontier(ok, x, y, out / "frontier.png", front, list(spec.search_space))
    correlations = diagnostic_correlations(ok, y)
    md = summary_markdown(spec.name, rows, x, y, front) + correlation_markdown(correlations, y)
    (out / "sweep.md").write_text(md)
    sign = 1 if mode == "min" else -1
    return {
        "trials": len(rows),
        "failed": len(rows) - len(ok),
        "stopped_early": sum(bool(r.get("stopped_early")) for r in ok),
        "best": min(full, key=lambda r: sign * r["metrics"][y]) if full else None,
        "correlations": correlations,
        "dir": str(out),
    }
