"""Ray Tune sweeps over experiment keys, ending in a reconstruction-vs-generation frontier.

A sweep YAML names a base experiment, a search space over dotted experiment keys and an
objective. One Tune trial = the whole pipeline (tokenizer -> ... -> evaluate) for one
point, in its own run directory named by the point's hash (never by a counter, which races
between trials). Tune's function trainable is the driver of the Ray Train jobs inside it
(Train V2). Results: ``results.json``, ``results.csv``, ``frontier.png`` and ``sweep.md``
in the sweep dir. A trial reports its extraction's latent diagnostics with its metrics, and
``sweep.md`` ranks them against the objective (Spearman, at each rung).

A sweep across experiments (``variants:``, e.g. one tokenizer family's ``shapes`` file per
entry, each with its own overrides) crosses the named variants with the search space: the
point's ``variant`` names its experiment file and overrides; the plot marks each trial by
the variant's ``family`` and colours it by its ``size``.

Stop after extraction (``scheduler.diagnostic_stop``): a trial first trains its tokenizer
and extracts, then compares one latent diagnostic with those of the trials before it
(:mod:`latentforge.platform.early_stop`) and ends at rung 0, before any generator
compute, when it is worse than their running quantile.

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

import json
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from latentforge.config import ConfigError, from_dict, load_experiment, to_dict
from latentforge.frontier import (
    correlation_markdown,
    diagnostic_correlations,
    pareto_front,
    plot_frontier,
    summary_markdown,
    write_tables,
)
from latentforge.metrics.table import direction, higher_is_better
from latentforge.models import latent_shape_of
from latentforge.platform.diagnose import read_diagnostics
from latentforge.platform.early_stop import StopRecord, decide
from latentforge.platform.pipeline import Pipeline
from latentforge.platform.stages import NAMES
from latentforge.platform.sweep_spec import (  # noqa: F401  (the sweep API in one place)
    DiagnosticStop,
    Objective,
    Scheduler,
    SearchDim,
    Sweep,
    SweepSpec,
    Variant,
    load_sweep,
    objective_mode,
    rung_config,
    sch_rungs,
    trial_config,
)
from latentforge.platform.workers import connect, outside_placement_group


def param_space(sweep: Sweep) -> dict[str, Any]:
    space = {k: tune.grid_search(v) for k, v in sweep.grids().items()}
    for key, dim in sweep.spec.search_space.items():
        if dim.grid is not None:
            continue
        elif dim.choice is not None:
            space[key] = tune.choice(list(dim.choice))
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        else:
            space[key] = tune.loguniform(*dim.loguniform)
    return space


def _run_pipeline(experiment: dict) -> tuple[dict, str | None]:
    """One trial's (or rung's) pipeline; returns its metrics (with its extraction's latent
    diagnostics) and the generator checkpoint."""
    pipeline = Pipeline(from_dict(experiment))
    pipeline.run()
    metrics = json.loads(Path(pipeline.paths()["metrics"]).read_text())
    metrics = read_diagnostics(pipeline.stage_dir("extract")) | metrics
    return metrics, pipeline.done_info("generator").get("checkpoint")


def _run_extraction(experiment: dict) -> dict:
    """A trial's tokenizer and extraction; returns the extraction's latent diagnostics."""
    pipeline = Pipeline(from_dict(experiment))
    pipeline.run(("tokenizer", "extract"))
    return read_diagnostics(pipeline.stage_dir("extract"))


def _stopped_after_extraction(sweep: Sweep, cfg, remote) -> dict | None:
    """With ``scheduler.diagnostic_stop``: train the tokenizer, extract and decide; the
    rung-0 report of a trial stopped there (its diagnostics; the objective NaN), else None."""
    stop = sweep.spec.scheduler.diagnostic_stop
    if not stop.metric:
        return None
    diagnostics = ray.get(remote(_run_extraction).remote(to_dict(cfg)))
    mode = stop.mode or direction(stop.metric)
    rule = {"mode": mode, "quantile": stop.quantile, "min_trials": stop.min_trials}
    record = StopRecord(sweep.run_dir, sweep.spec.name, stop.metric, rule)
    trial, key = Path(cfg.run_dir).name, Pipeline(cfg, log=lambda _: None).hashes["extract"]
    decision = decide(record, trial, diagnostics, mode, stop.quantile, stop.min_trials, key)
    if not decision["stopped"]:
        return None
    objective = sweep.spec.objective.metric
    return {
        **diagnostics,
        objective: float("nan"),
        "rung": 0,
        "generator_images": 0,
        "stopped_after_extraction": 1,
        "run_dir": str(cfg.run_dir),
    }


def _trainable(config: dict) -> None:
    """Tune trial: run the pipeline in a task scheduled outside the trial's placement
    group. Inside it, Ray Data would limit itself to the trial's tiny bundle and child
    tasks would be captured into it; Train places its own workers either way. With ASHA the
    trial runs rung by rung and reports after each; with a diagnostic stop it may end
    after its extraction (rung 0)."""
    sweep: Sweep = config.pop("__sweep__")
    cfg = trial_config(sweep, config)

    def remote(fn):
        return ray.remote(fn).options(num_cpus=0, scheduling_strategy=outside_placement_group())

    if (report := _stopped_after_extraction(sweep, cfg, remote)) is not None:
        tune.report(report)
        return
    task = remote(_run_pipeline)
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
        metrics = dict(result.metrics or {})
        if metrics.get("stopped_after_extraction"):
            metrics.pop(sweep.spec.objective.metric, None)  # NaN: it never generated
        rung = metrics.get("rung")
        rows.append(
            {
                "point": point,
                **trial_labels(sweep, point),
                "metrics": metrics,
                "error": str(result.error) if result.error else None,
                "rung": rung,
                "stopped_early": metrics.get("rung", sch_rungs(sweep)) < sch_rungs(sweep),
                "objective_by_rung": objective_by_rung(result, sweep.spec.objective.metric),
                "stage_seconds": stage_seconds(sweep, point, rung),
            }
        )
    return write_results(sweep, rows)


def trial_labels(sweep: Sweep, point: dict[str, Any]) -> dict[str, str]:
    """A trial's ``family`` (the variant's, else its tokenizer's name), ``latent`` shape
    (e.g. ``4x8x8``; ``8x16`` for 16 tokens of 8 channels) and ``size`` label (the
    variant's, else the latent shape)."""
    cfg = trial_config(sweep, point)
    try:
        latent = "x".join(str(n) for n in latent_shape_of(cfg))
    except ConfigError:  # a family whose latent shape only its extraction knows
        latent = "?"
    variant = sweep.spec.variants.get(point.get("variant", ""), Variant())
    return {
        "family": variant.family or cfg.tokenizer.name,
        "latent": latent,
        "size": variant.size or latent,
    }


def stage_seconds(sweep: Sweep, point: dict[str, Any], rung: int | None) -> dict[str, float]:
    """Seconds each stage recorded (``done.json``) for the stages trial ``point`` used up to
    ``rung`` (the generator, sampling and evaluation summed over its rungs; a trial that
    reported no rung, having failed: its tokenizer and extraction)."""
    out: dict[str, float] = {}
    for d in trial_stage_dirs(sweep, point, 0 if rung is None else int(rung)):
        seconds = json.loads((d / "done.json").read_text())["seconds"]
        out[d.parent.name] = out.get(d.parent.name, 0.0) + seconds
    return out


def objective_by_rung(result, metric: str) -> dict[int, float]:
    """The objective a trial reported at each rung it reached (Tune's history of it)."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "rung" not in frame:
        return {}
    pairs = zip(frame["rung"], frame[metric], strict=True)
    return {int(r): float(v) for r, v in pairs if r == r and v == v}  # NaN != NaN


def trial_stage_dirs(sweep: Sweep, point: dict[str, Any], rung: int) -> list[Path]:
    """The stage directories trial ``point`` used up to ``rung`` (tokenizer and extract
    once, then every rung's generator, sample, evaluate and report; rung 0: tokenizer and
    extract), as ``_trainable`` derives them; those not (yet) done are left out."""
    cfg = trial_config(sweep, point)
    if rung == 0:  # stopped after its extraction (or failed): a later run's rungs aren't its own
        p = Pipeline(cfg, log=lambda _: None)
        return [p.stage_dir(s) for s in ("tokenizer", "extract") if p.is_done(s)]
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
    the rung they reached and kept off the front; those stopped after their extraction
    (rung 0, no objective) are listed, neither plotted nor failed."""
    spec, out = sweep.spec, sweep.run_dir
    y, x = spec.objective.metric, spec.frontier_x
    write_tables(out, rows, x, y)
    ok = [r for r in rows if r["error"] is None and y in r["metrics"]]
    at_extraction = [
        r for r in rows if r["error"] is None and r["metrics"].get("stopped_after_extraction")
    ]
    full = [r for r in ok if not r.get("stopped_early")]
    x_mode = spec.frontier_x_mode or ("max" if higher_is_better(x) else "min")
    mode = objective_mode(spec)
    front = pareto_front(full, x, y, mode, x_mode)
    dims = list(dict.fromkeys([*sweep.grids(), *spec.search_space]))
    plot_frontier(ok, x, y, out / "frontier.png", front, dims)
    correlations = diagnostic_correlations(ok, y)
    md = summary_markdown(spec.name, rows, x, y, front) + correlation_markdown(correlations, y)
    (out / "sweep.md").write_text(md)
    sign = 1 if mode == "min" else -1
    return {
        "trials": len(rows),
        "failed": len(rows) - len(ok) - len(at_extraction),
        "stopped_early": sum(bool(r.get("stopped_early")) for r in ok + at_extraction),
        "stopped_after_extraction": len(at_extraction),
        "best": min(full, key=lambda r: sign * r["metrics"][y]) if full else None,
        "correlations": correlations,
        "dir": str(out),
    }
