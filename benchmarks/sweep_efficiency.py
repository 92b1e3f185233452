"""ASHA vs the full grid on a frontier sweep: compute used and whether the best point agrees.

Runs the sweep twice from empty run directories, once with ``scheduler.name=fifo`` (every
trial to its full budget) and once with ASHA, and writes JSON: wall time, generator images
trained over all trials (the compute ASHA saves) and each run's best point.

    python benchmarks/sweep_efficiency.py experiments/sweeps/dim_frontier.yaml \
        --out runs/sweep_efficiency.json

On the 2-core CI machine the full ``dim_frontier`` pair takes hours; ``smoke.yaml`` runs
in minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def summarize(fifo: dict, asha: dict, metric: str, mode: str) -> dict:
    """Compare two sweep results (``{"rows", "seconds", "budget"}``) of the same grid."""
    sign = 1 if mode == "min" else -1

    def best(rows: list[dict]) -> dict | None:
        done = [r for r in rows if metric in r["metrics"] and not r.get("stopped_early")]
        return min(done, key=lambda r: sign * r["metrics"][metric])["point"] if done else None

    f_images = fifo["budget"] * len(fifo["rows"])
    a_images = sum(float(r["metrics"].get("generator_images", 0)) for r in asha["rows"])
    return {
        "fifo_seconds": fifo["seconds"],
        "asha_seconds": asha["seconds"],
        "fifo_generator_images": f_images,
        "asha_generator_images": a_images,
        "generator_compute_ratio": a_images / f_images if f_images else None,
        "fifo_best": best(fifo["rows"]),
        "asha_best": best(asha["rows"]),
        "same_best": best(fifo["rows"]) == best(asha["rows"]),
        "asha_stopped_early": sum(bool(r.get("stopped_early")) for r in asha["rows"]),
    }


def run_once(sweep_file: str, scheduler: str, run_dir: Path) -> dict:
    from latentforge.platform.sweep import load_sweep, run_sweep, trial_config

    sweep = load_sweep(sweep_file, [f"run_dir={run_dir}", f"scheduler.name={scheduler}"])
    t0 = time.time()
    run_sweep(sweep)
    rows = json.loads((run_dir / "results.json").read_text())
    budget = trial_config(sweep, rows[0]["point"]).train.generator_images if rows else 0
    return {"rows": rows, "seconds": time.time() - t0, "budget": budget, "spec": sweep.spec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep YAML (its scheduler section sets the ASHA rungs)")
    ap.add_argument("--run-dir", default="runs/sweep_efficiency")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.run_dir).resolve()
    fifo = run_once(args.sweep, "fifo", root / "fifo")
    asha = run_once(args.sweep, "asha", root / "asha")
    spec = asha["spec"]
    result = {
        "sweep": args.sweep,
        "trials": len(fifo["rows"]),
        "rungs": spec.scheduler.rungs,
        "reduction_factor": spec.scheduler.reduction_factor,
        **summarize(fifo, asha, spec.objective.metric, spec.objective.mode),
    }
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
