"""``latentforge <verb> EXPERIMENT.yaml [key=value ...] [--dry-run]``.

Verbs only parse, validate and call the library. ``run`` runs every stage, skipping those
whose config hash is unchanged; the stage verbs (from the stage table,
:data:`latentforge.platform.stages.STAGES`) run one stage on the artifacts of the stage
before it; ``sweep`` runs a Ray Tune sweep; ``train-asset`` runs an embedded-asset recipe.
The console shows each stage's start, progress and end; Ray's own logs, progress bars and
worker output go to ``run_dir/ray.log`` (``--ray-logs`` shows them on the console instead).
"""

from __future__ import annotations

import argparse
import json
import sys

from latentforge.config import ConfigError, load_config, load_experiment, to_yaml

RAY_LOG = "ray.log"  # in the run directory: Ray's own output, unless --ray-logs
OTHER_VERBS = {
    "run": "run every stage of an experiment, skipping those already done",
    "sweep": "run a Ray Tune sweep over experiment keys (--resume continues one)",
    "train-asset": "train an embedded asset (the shapes ViT or classifier) from its recipe",
}


def stage_verbs() -> dict[str, str]:
    """CLI verb -> stage name, from the stage table (imported when a verb needs it: the
    table imports Ray)."""
    from latentforge.platform.stages import STAGES

    return {s.verb: s.name for s in STAGES}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latentforge", description=__doc__.splitlines()[0])
    p.add_argument("verb", choices=["run", *stage_verbs(), "sweep", "train-asset"])
    p.add_argument("config", help="experiment / sweep / asset-recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.cfg_scale=4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan")
    p.add_argument("--resume", action="store_true", help="sweep: resume an interrupted sweep")
    p.add_argument(
        "--ray-logs",
        action="store_true",
        help="show Ray's own logs, progress bars and worker output here (default: in "
        "run_dir/ray.log; the stages' progress lines show either way)",
    )
    return p.parse_args(argv)


def cmd_experiment(args) -> int:
    from latentforge.platform.pipeline import Pipeline
    from latentforge.platform.stages import NAMES
    from latentforge.platform.workers import connect

    cfg = load_experiment(args.config, args.overrides)
    pipeline = Pipeline(cfg)
    stages = NAMES if args.verb == "run" else (stage_verbs()[args.verb],)
    pipeline.preflight(stages)
    if args.dry_run:
        print(to_yaml(cfg))
        for row in pipeline.plan():
            mark = "cached" if row["done"] else ("will run" if row["stage"] in stages else "-")
            print(f"{row['stage']:<10} {row['hash']}  {mark:<8} {row['dir']}")
        return 0
    connect(pipeline.cfg, log_file=None if args.ray_logs else pipeline.run_dir / RAY_LOG)
    pipeline.run(stages)
    report = pipeline.run_dir / "report.html"
    if "report" in stages:
        print(f"report: {report}")
    return 0


def cmd_sweep(args) -> int:
    from latentforge.platform.sweep import load_sweep, run_sweep
    from latentforge.platform.sweep_spec import sweep_plan

    sweep = load_sweep(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(sweep.spec))
        plan = sweep_plan(sweep)
        for trial in plan:
            print(json.dumps(trial, default=str))
        missing = [f for t in plan for f in t["files"] if f["exists"] is False]
        for f in {f["path"]: f for f in missing}.values():
            print(f"missing: {f['path']} ({f['key']})")
        return 0
    result = run_sweep(sweep, resume=args.resume)
    print(json.dumps(result, indent=1, default=str))
    return 0


def cmd_asset(args) -> int:
    from latentforge.asset_recipes import AssetConfig, train_asset

    cfg = load_config(args.config, AssetConfig, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    print(json.dumps(train_asset(cfg), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verb == "sweep":
            return cmd_sweep(args)
        if args.verb == "train-asset":
            return cmd_asset(args)
        return cmd_experiment(args)
    except ConfigError as e:
        print(f"latentforge: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from latentforge.platform.pipeline import StageNotReady

        if isinstance(e, StageNotReady):
            print(f"latentforge: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    raise SystemExit(main())
