"""A two-trial Ray Tune sweep over the smoke experiment: results, frontier, resume."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from latentforge.config import ConfigError, load_experiment
from latentforge.platform.sweep import load_sweep, run_sweep, rung_config, trial_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "experiments" / "sweeps" / "smoke.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sweep_points_and_trial_dirs(tmp_path):
    sweep = load_sweep(SMOKE_SWEEP, [f"run_dir={tmp_path}"])
    points = sweep.points()
    assert (
        len(points) == 4 and {"tokenizer.latent_channels": 8, "tokenizer.vf_weight": 0.1} in points
    )
    dirs = {trial_config(sweep, p).run_dir for p in points}
    assert len(dirs) == 4 and all(d.startswith(str(tmp_path)) for d in dirs)
    # an ASHA rung: its share of the generator budget, continuing the previous rung
    cfg = trial_config(sweep, points[0])
    first = rung_config(sweep, cfg, 1, None)
    assert first.train.generator_images == 256 and first.sample.num_images == 20
    last = rung_config(sweep, cfg, 2, "/ckpt")
    assert last.train.generator_images == 512 and last.train.generator_init == "/ckpt"
    assert last.sample.num_images == cfg.sample.num_images


def test_bad_search_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {ROOT / 'experiments' / 'quickstart.yaml'}\nsearch_space:\n  tokenizer.vf_wieght: {{grid: [0.0]}}\n"
    )
    with pytest.raises(ConfigError, match="vf_wieght"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="run_dir: 'gs://b/sweep' is a URI"):
        load_sweep(SMOKE_SWEEP, ["run_dir=gs://b/sweep"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: x.yaml\nsearch_space: {a: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_sweep(broken)
    with pytest.raises(ConfigError, match="override 'scheduler.rungs': expected key=value"):
        load_sweep(SMOKE_SWEEP, ["scheduler.rungs"])
    with pytest.raises(ConfigError, match="num_samples: 3 repeats every grid point"):
        load_sweep(SMOKE_SWEEP, ["num_samples=3"])
    choice = tmp_path / "choice.yaml"
    choice.write_text(
        f"base: {ROOT / 'experiments' / 'smoke.yaml'}\nmax_concurrent_trials: 2\n"
        "search_space:\n  tokenizer.latent_channels: {choice: [4, 8]}\n"
    )
    with pytest.raises(ConfigError, match="draw one point twice"):
        load_sweep(choice)


def two_point_sweep(tmp_path) -> Path:
    """experiments/sweeps/smoke.yaml (same base, objective, ASHA scheduler and trial
    settings) with its 2 x 2 grid cut to the two points of latent_channels 8, and the
    tokenizer given as weights (a random initialisation, ``train.tokenizer_images=0``):
    every trial still runs every stage, and its generator trains in rungs through Ray
    Train (about 15 s of start-up each on 2 cores); two trials exercise every path of the
    four (ASHA continues the first trial and compares the second with it at rung 1, the
    grid reuses and completes the rungs)."""
    from safetensors.torch import save_file

    from latentforge.models import build_tokenizer, state_dict_of

    node = OmegaConf.load(SMOKE_SWEEP)
    node.base = str((SMOKE_SWEEP.parent / node.base).resolve())
    node.search_space["tokenizer.latent_channels"].grid = [8]
    tokenizer = build_tokenizer(load_experiment(node.base, ["tokenizer.latent_channels=8"]))
    weights = tmp_path / "random-tokenizer.safetensors"
    save_file(state_dict_of(tokenizer), str(weights))
    node.overrides = ["train.tokenizer_images=0", f"tokenizer.weights={weights}"]
    path = tmp_path / "smoke-two-points.yaml"
    OmegaConf.save(node, path)
    return path


def test_sweep_end_to_end(ray_session, tmp_path):
    spec = two_point_sweep(tmp_path)
    sweep = load_sweep(spec, [f"run_dir={tmp_path}"])
    assert sweep.spec.scheduler.name == "asha" and len(sweep.points()) == 2
    result = run_sweep(sweep)
    assert result["trials"] == 2 and result["failed"] == 0, result
    rows = json.loads((tmp_path / "results.json").read_text())
    points = {
        (r["point"]["tokenizer.latent_channels"], r["point"]["tokenizer.vf_weight"]) for r in rows
    }
    assert points == {(8, 0.0), (8, 0.1)}
    assert all("fd_shapesnet" in r["metrics"] and "rfd_shapesnet" in r["metrics"] for r in rows)
    # ASHA: every trial reported rung 1; those it stopped never reached rung 2, whose
    # generator continued rung 1's checkpoint to the full budget
    assert all(r["rung"] in (1, 2) and r["stopped_early"] == (r["rung"] == 1) for r in rows)
    finished = [r for r in rows if r["rung"] == 2]
    assert finished and result["stopped_early"] == 2 - len(finished)
    for r in finished:
        assert r["metrics"]["generator_images"] == 512  # smoke.yaml's budget
    # the latent diagnostics of each trial's extraction come with its metrics; the
    # objective of every rung a trial reached is kept for their rank correlations
    assert all(
        {"probe_accuracy", "latent_se_cknna", "robust_psnr"} <= set(r["metrics"]) for r in rows
    )
    assert all(len(r["objective_by_rung"]) == r["rung"] for r in rows)
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith(
        "tokenizer.latent_channels,tokenizer.vf_weight,rung"
    )
    assert ",probe_accuracy," in csv_rows[0]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "| point | rung |" in (tmp_path / "sweep.md").read_text()
    # resuming a finished sweep re-runs no trial (every stage is cached)
    again = run_sweep(sweep, resume=True)
    assert again["trials"] == 2 and again["failed"] == 0

    # the grid in the same rungs shares the trials: every rung ASHA ran is the grid's own
    # rung (a cache hit; benchmarks/sweep_efficiency.py replays ASHA on a finished grid
    # this way), the rungs ASHA stopped are the only ones left to train
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep_efficiency import stage_seconds

    from latentforge.platform.sweep import trial_stage_dirs

    grid = load_sweep(spec, [f"run_dir={tmp_path}", "scheduler.name=fifo", "name=grid"])
    for r in rows:
        dirs = trial_stage_dirs(grid, r["point"], 2)  # those done, of the grid's rungs 1-2
        assert dirs == trial_stage_dirs(sweep, r["point"], r["rung"])
        assert len(dirs) == 2 + 4 * r["rung"]  # tokenizer, extract; 4 stages a rung
        r["stage_seconds"] = stage_seconds(sweep, r)
        assert r["stage_seconds"] > 0
    stopped = [r for r in rows if r["stopped_early"]]
    if stopped:  # a stopped trial used its tokenizer, extraction and rung 1 only
        assert stopped[0]["stage_seconds"] < finished[0]["stage_seconds"]


def test_pareto_front_and_groups():
    from latentforge.frontier import pareto_front, point_groups

    def row(x, y):
        return {"metrics": {"rfd": x, "fd": y}}

    rows = [row(1, 5), row(2, 3), row(3, 4), row(4, 1), row(2, 6)]
    front = pareto_front(rows, "rfd", "fd")
    assert [(r["metrics"]["rfd"], r["metrics"]["fd"]) for r in front] == [(1, 5), (2, 3), (4, 1)]
    assert pareto_front(rows, "rfd", "fd", mode="max")[-1]["metrics"]["fd"] == 6
    # PSNR as the reconstruction axis: higher is better, (4, 1) dominates everything with
    # more fd, (1, 5) and (2, 6) are dominated
    psnr = pareto_front(rows, "rfd", "fd", x_mode="max")
    assert [(r["metrics"]["rfd"], r["metrics"]["fd"]) for r in psnr] == [(4, 1)]
    dims = ["tokenizer.latent_channels", "tokenizer.vf_weight"]
    point = {"tokenizer.latent_channels": 8, "tokenizer.vf_weight": 0.0}
    assert point_groups(point, dims) == ("latent_channels=8", "vf_weight=0.0")
    assert point_groups({"generator.lr": 1}, ["generator.lr"]) == ("lr=1", "n/a")
    assert point_groups({}, []) == ("n/a", "n/a")


def test_asha_needs_rungs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {SMOKE_SWEEP.parent.parent / 'smoke.yaml'}\nscheduler: {{name: asha, rungs: 1}}\n"
    )
    with pytest.raises(ConfigError, match="rungs"):
        load_sweep(bad)


def test_the_objective_direction_comes_from_the_metric_table(tmp_path):
    from latentforge.platform.sweep import objective_mode

    sweep_file = tmp_path / "s.yaml"
    base = ROOT / "experiments" / "smoke.yaml"
    sweep_file.write_text(f"base: {base}\nobjective: {{metric: class_accuracy}}\n")
    assert objective_mode(load_sweep(sweep_file).spec) == "max"
    sweep_file.write_text(f"base: {base}\nobjective: {{metric: fd_shapesnet}}\n")
    assert objective_mode(load_sweep(sweep_file).spec) == "min"
    sweep_file.write_text(f"base: {base}\nobjective: {{metric: class_accuracy, mode: min}}\n")
    with pytest.raises(ConfigError, match="objective.mode: 'min', but class_accuracy is better"):
        load_sweep(sweep_file)
