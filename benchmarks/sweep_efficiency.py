"""ASHA vs the full grid on a frontier sweep: compute used and whether the best point agrees.

Runs the grid to the end (``scheduler.name=fifo``, in the sweep file's rungs, so every
trial reports a learning curve), then the same sweep with ASHA in the same run directory.
Both share the trials' stage caches: every rung ASHA asks for was already trained by the
grid, so ASHA decides on the very metrics a from-scratch run would have produced, with no
run-to-run noise between the two, and costs seconds. Compute is counted, not timed: the
seconds recorded by every stage each run used (tokenizer and extraction once per trial,
then each rung's generator, sampling and evaluation) and the generator images trained.

    python benchmarks/sweep_efficiency.py experiments/sweeps/dim_frontier.yaml \\
        --out runs/sweep_efficiency.json

With trials run one at a time (``max_concurrent_trials: 1``) ASHA's decisions depend only
on the metrics of the trials before, so the replay is exact. On the 2-core CI machine the
grid of ``dim_frontier`` takes over an hour; ``smoke.yaml`` runs in minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

RESULT_FILES = ("results.json", "results.csv", "frontier.png", "sweep.md")


def summarize(fifo: dict, asha: dict, metric: str, mode: str) -> dict:
    """Compare two sweep results (``{"rows", "seconds", "budget"}``, ``budget``: the generator
    images of one trial or, a list, of each trial; rows optionally with ``stage_seconds``)
    of the same grid."""
    sign = 1 if mode == "min" else -1

    def best(rows: list[dict]) -> dict | None:
        done = [r for r in rows if metric in r["metrics"] and not r.get("stopped_early")]
        return min(done, key=lambda r: sign * r["metrics"][metric])["point"] if done else None

    budget = fifo["budget"]
    f_images = sum(budget) if isinstance(budget, list) else budget * len(fifo["rows"])
    a_images = sum(float(r["metrics"].get("generator_images", 0)) for r in asha["rows"])
    out = {
        "fifo_seconds": fifo["seconds"],
        "asha_seconds": asha["seconds"],
        "fifo_generator_images": f_images,
        "asha_generator_images": a_images,
        "generator_compute_ratio": a_images / f_images if f_images else None,
        "fifo_best": best(fifo["rows"]),
        "asha_best": best(asha["rows"]),
        "same_best": best(fifo["rows"]) == best(asha["rows"]),
        "asha_stopped_early": sum(bool(r.get("stopped_early")) for r in asha["rows"]),
        "asha_stopped_after_extraction": sum(r.get("rung") == 0 for r in asha["rows"]),
    }
    if all("stage_seconds" in r for r in fifo["rows"] + asha["rows"]):
        f_s = sum(r["stage_seconds"] for r in fifo["rows"])
        a_s = sum(r["stage_seconds"] for r in asha["rows"])
        out |= {"fifo_stage_seconds": f_s, "asha_stage_seconds": a_s}
        out["stage_seconds_ratio"] = a_s / f_s if f_s else None
    return out


def stage_seconds(sweep, row: dict) -> float:
    """Seconds recorded by the stages trial ``row`` used up to the rung it reached (rung 0:
    stopped after its extraction)."""
    from latentforge.platform.sweep import stage_seconds as per_stage

    return sum(per_stage(sweep, row["point"], row.get("rung")).values())


def run_once(sweep_file: str, scheduler: str, run_dir: Path, keep: Path) -> dict:
    """Run the sweep with ``scheduler`` in ``run_dir`` (trials shared between calls), copy
    its result files to ``keep`` and return its rows, each with its ``stage_seconds``."""
    from latentforge.platform.sweep import load_sweep, run_sweep, trial_config

    changes = [f"run_dir={run_dir}", f"scheduler.name={scheduler}"]
    if scheduler == "fifo":  # the grid: every trial to its end, none stopped after extraction
        changes.append("scheduler.diagnostic_stop.metric=null")
    sweep = load_sweep(sweep_file, changes)
    # its own Tune run name: the same name would silently resume the other run
    sweep = replace(sweep, spec=replace(sweep.spec, name=f"{sweep.spec.name}-{scheduler}"))
    t0 = time.time()
    run_sweep(sweep)
    seconds = time.time() - t0
    keep.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, keep / name)
    rows = json.loads((run_dir / "results.json").read_text())
    for r in rows:
        r["stage_seconds"] = stage_seconds(sweep, r)
    # each trial's own (a sweep across variants may give them different budgets)
    budget = [trial_config(sweep, r["point"]).train.generator_images for r in rows]
    return {"rows": rows, "seconds": seconds, "budget": budget, "spec": sweep.spec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "sweep",
        nargs="?",
        default="experiments/sweeps/smoke.yaml",
        help="sweep YAML (its scheduler section sets the ASHA rungs)",
    )
    ap.add_argument("--run-dir", default="runs/sweep_efficiency")
    ap.add_argument("--out", default="runs/bench/sweep_efficiency.json")
    args = ap.parse_args()
    root = Path(args.run_dir).resolve()
    fifo = run_once(args.sweep, "fifo", root, root / "fifo")
    asha = run_once(args.sweep, "asha", root, root / "asha")
    from latentforge.platform.sweep import objective_mode

    spec = asha["spec"]
    result = {
        "sweep": args.sweep,
        "trials": len(fifo["rows"]),
        "rungs": spec.scheduler.rungs,
        "reduction_factor": spec.scheduler.reduction_factor,
        **summarize(fifo, asha, spec.objective.metric, objective_mode(spec)),
        "fifo_trials": [
            {"point": r["point"], "stage_seconds": r["stage_seconds"], **pick(r["metrics"])}
            for r in fifo["rows"]
        ],
        "asha_trials": [
            {"point": r["point"], "rung": r["rung"], "stage_seconds": r["stage_seconds"]}
            for r in asha["rows"]
        ],
    }
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


def pick(metrics: dict) -> dict:
    keys = ("fd_shapesnet", "rfd_shapesnet", "class_accuracy", "psnr", "generator_images")
    return {k: metrics[k] for k in keys if k in metrics}


if __name__ == "__main__":
    main()
