"""Ray Tune sweeps over experiment keys, ending in a reconstruction-vs-generation frontier.

A sweep YAML names a base experiment, a search space over dotted experiment keys and an
objective. One Tune trial = the whole pipeline (tokenizer -> ... -> evaluate) for one
point, in its own run directory named by the point's hash (never by a counter, which races
between trials). Tune's function trainable is the driver of the Ray Train jobs inside it
(Train V2). Results: ``results.json``, ``frontier.png`` and ``sweep.md`` in the sweep dir.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from latentforge.config import ConfigError, config_hash, load_experiment, merge_schema


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
    mode: Literal["min", "max"] = "min"


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
    frontier_x: str = "rfd_shapesnet"  # reconstruction axis of the frontier plot
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    node = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
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
    base = load_experiment(base_path, spec.overrides)  # validates base + shared overrides
    for point in Sweep(spec, base_path, Path()).points() or [{}]:
        load_experiment(base_path, [*spec.overrides, *(f"{k}={v}" for k, v in point.items())])
    run_dir = Path(spec.run_dir or f"{base.run_dir}-{spec.name}").resolve()
    return Sweep(spec, base_path, run_dir)


def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

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


def _run_pipeline(experiment: dict) -> dict:
    """One trial's pipeline; returns its metrics."""
    from latentforge.config import from_dict
    from latentforge.platform.pipeline import Pipeline

    pipeline = Pipeline(from_dict(experiment))
    pipeline.run()
    return json.loads(Path(pipeline.paths()["metrics"]).read_text())


def _trainable(config: dict) -> None:
    """Tune trial: run the pipeline in a task scheduled outside the trial's placement
    group. Inside it, Ray Data would limit itself to the trial's tiny bundle and child
    tasks would be captured into it; Train places its own workers either way."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from latentforge.config import to_dict

    sweep: Sweep = config.pop("__sweep__")
    cfg = trial_config(sweep, config)
    task = ray.remote(_run_pipeline).options(
        num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
    )
    metrics = ray.get(task.remote(to_dict(cfg)))
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    tune.report({**flat, "run_dir": str(cfg.run_dir)})


def run_sweep(sweep: Sweep, resume: bool = False) -> dict:
    """Run (or resume) the sweep with Ray Tune; write results, frontier plot and summary."""
    from ray import tune

    from latentforge.platform.pipeline import connect

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
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.spec.objective.metric,
                mode=sweep.spec.objective.mode,
                num_samples=sweep.spec.num_samples,
                max_concurrent_trials=sweep.spec.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=sweep.spec.name, storage_path=storage),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        point = {k: v for k, v in result.config.items() if k != "__sweep__"}
        rows.append(
            {
                "point": point,
                "metrics": result.metrics or {},
                "error": str(result.error) if result.error else None,
            }
        )
    return write_results(sweep, rows)


def write_results(sweep: Sweep, rows: list[dict]) -> dict:
    out = sweep.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    ok = [r for r in rows if r["error"] is None and sweep.spec.objective.metric in r["metrics"]]
    plot_frontier(ok, sweep.spec.frontier_x, sweep.spec.objective.metric, out / "frontier.png")
    sign = 1 if sweep.spec.objective.mode == "min" else -1
    best = min(ok, key=lambda r: sign * r["metrics"][sweep.spec.objective.metric]) if ok else None
    lines = [
        f"# Sweep {sweep.spec.name}",
        "",
        "![frontier](frontier.png)",
        "",
        f"| point | {sweep.spec.frontier_x} | {sweep.spec.objective.metric} | class_accuracy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| `{json.dumps(r['point'])}` | {m.get(sweep.spec.frontier_x, 'n/a')} | "
            f"{m.get(sweep.spec.objective.metric, r['error'] or 'n/a')} | {m.get('class_accuracy', 'n/a')} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return {"trials": len(rows), "failed": len(rows) - len(ok), "best": best, "dir": str(out)}


def plot_frontier(rows: list[dict], x: str, y: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        if x in r["metrics"]:
            ax.scatter(r["metrics"][x], r["metrics"][y], color="tab:blue")
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["point"].items())
            ax.annotate(
                label,
                (r["metrics"][x], r["metrics"][y]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel(f"{x} (reconstruction)")
    ax.set_ylabel(f"{y} (generation)")
    ax.set_title("reconstruction vs generation frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
