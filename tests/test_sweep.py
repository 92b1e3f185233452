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
        "family,latent,tokenizer.latent_channels,tokenizer.vf_weight,rung"
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


def test_the_diagnostic_stop_rule_and_its_record(tmp_path):
    from latentforge.platform.early_stop import StopRecord, decide, quantile, should_stop

    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0 and quantile([1.0, 2.0], 0.25) == 1.25
    # higher is better: below the running median stops; lower is better: above it
    assert should_stop(0.2, [0.1, 0.3, 0.5], "max", 0.5, 2)
    assert not should_stop(0.4, [0.1, 0.3, 0.5], "max", 0.5, 2)
    assert should_stop(0.4, [0.1, 0.3, 0.5], "min", 0.5, 2)
    assert not should_stop(0.0, [0.5], "max", 0.5, 2)  # too few trials before it
    assert not should_stop(float("nan"), [0.5, 0.6], "max", 0.5, 1)
    record = StopRecord(tmp_path, "run-a", "probe_accuracy")
    first = decide(record, "t1", {"probe_accuracy": 0.5}, "max", 0.5, 1)
    assert first["stopped"] is False and first["among"] == 0
    worse = decide(record, "t2", {"probe_accuracy": 0.3}, "max", 0.5, 1)
    assert worse["stopped"] is True and worse["among"] == 1
    # a resumed trial keeps its decision; another run name keeps its own history
    assert decide(record, "t2", {"probe_accuracy": 0.9}, "max", 0.5, 1) == worse
    other = StopRecord(tmp_path, "run-b", "probe_accuracy")
    assert decide(other, "t2", {"probe_accuracy": 0.3}, "max", 0.5, 1)["stopped"] is False
    # another rule under the same run name starts afresh; so does a trial whose latents changed
    strict = StopRecord(tmp_path, "run-a", "probe_accuracy", {"quantile": 0.9})
    assert strict.before("t3") == [] and strict.decision("t1") is None
    assert record.decision("t1", key="other-extraction") is None
    # NaNs (a diagnostic that could not be computed) are no trials to compare with
    assert not should_stop(0.5, [float("nan"), float("nan")], "max", 0.5, 2)
    assert should_stop(0.5, [float("nan"), 0.7, 0.9], "max", 0.5, 2)
    with pytest.raises(KeyError, match="extract.diagnostics.metrics"):
        decide(other, "t3", {"robust_psnr": 1.0}, "max", 0.5, 1)


def test_the_families_sweeps_load_with_matched_generators(tmp_path):
    from latentforge.platform.sweep import trial_labels

    sweep = load_sweep(ROOT / "experiments" / "sweeps" / "families.yaml", [f"run_dir={tmp_path}"])
    points = sweep.points()
    assert len(points) == 14 and all(set(p) == {"variant"} for p in points)
    labels = [trial_labels(sweep, p) for p in points]
    families = {lab["family"] for lab in labels}
    assert families == {
        "VA-VAE", "VA-VAE (no VF)", "Siglip-VAE", "VFM-VAE", "SoftVQ-VAE", "MAETok", "RAE", "SVG"
    }  # fmt: skip
    # every family with a size knob at two sizes
    for family in families - {"RAE", "SVG"}:
        sizes = {lab["latent"] for lab in labels if lab["family"] == family}
        assert len(sizes) == 2, (family, sizes)
    cfgs = [trial_config(sweep, p) for p in points]
    assert {c.tokenizer.name for c in cfgs} == {
        "vavae", "siglipvae", "vfmvae", "softvq", "maetok", "rae", "svg"
    }  # fmt: skip
    # one generator family, size and budget, one sampler and one evaluation for all
    assert {(c.generator.name, c.generator.config.split("/")[0]) for c in cfgs} == {
        ("lightningdit", "micro")
    }
    assert len({(c.train.generator_images, c.train.tokenizer_images) for c in cfgs}) == 1
    assert len({(c.sample.steps, c.sample.cfg_scale, c.sample.num_images) for c in cfgs}) == 1
    assert len({tuple(c.evaluate.metrics) for c in cfgs}) == 1
    assert len({c.run_dir for c in cfgs}) == 14
    smoke = load_sweep(ROOT / "experiments" / "sweeps" / "families_smoke.yaml")
    assert len(smoke.points()) == 7


def test_a_variant_with_a_bad_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"variants:\n  a: {{base: {ROOT / 'experiments' / 'smoke.yaml'}}}\n"
        f"  b: {{base: {ROOT / 'experiments' / 'smoke.yaml'}, overrides: [tokenizer.latnt=3]}}\n"
    )
    with pytest.raises(ConfigError, match=r"variants\.b: .*latnt"):
        load_sweep(bad)
    bad.write_text("variants:\n  a: {overrides: [train.generator_images=1]}\n")
    with pytest.raises(ConfigError, match=r"variants\.a\.base or base: .* required"):
        load_sweep(bad)
    bad.write_text(
        f"base: {ROOT / 'experiments' / 'smoke.yaml'}\n"
        "scheduler: {diagnostic_stop: {metric: probe_acc}}\n"
    )
    with pytest.raises(ConfigError, match="probe_acc.*no latent diagnostic"):
        load_sweep(bad)
    smoke = ROOT / "experiments" / "sweeps" / "smoke.yaml"
    with pytest.raises(ConfigError, match="diagnostic_stop.mode: 'min', but probe_accuracy"):
        load_sweep(smoke, ["scheduler.diagnostic_stop={metric: probe_accuracy, mode: min}"])
    bad.write_text(
        f"base: {ROOT / 'experiments' / 'smoke.yaml'}\n"
        "overrides: ['extract.diagnostics.metrics=[]']\n"
        "scheduler: {diagnostic_stop: {metric: probe_accuracy}}\n"
    )
    with pytest.raises(ConfigError, match="needs 'linear_probe' in extract.diagnostics.metrics"):
        load_sweep(bad)


def smoke_families(tmp_path, names=("vavae", "softvq")) -> Path:
    """experiments/sweeps/families_smoke.yaml cut to ``names``, each tokenizer given as
    random weights (``train.tokenizer_images=0``): every stage of every trial still runs,
    the tokenizer without a Ray Train job."""
    from safetensors.torch import save_file

    from latentforge.models import build_tokenizer, state_dict_of

    path = ROOT / "experiments" / "sweeps" / "families_smoke.yaml"
    node = OmegaConf.load(path)
    sweep = load_sweep(path)
    node.variants = {k: v for k, v in node.variants.items() if k in names}
    for name in names:
        variant = node.variants[name]
        variant.base = str((path.parent / variant.base).resolve())
        tokenizer = build_tokenizer(trial_config(sweep, {"variant": name}))
        weights = tmp_path / f"{name}.safetensors"
        save_file(state_dict_of(tokenizer), str(weights))
        variant.overrides = [
            *variant.overrides, "train.tokenizer_images=0", f"tokenizer.weights={weights}"
        ]  # fmt: skip
    out = tmp_path / "families-smoke.yaml"
    OmegaConf.save(node, out)
    return out


def test_families_sweep_end_to_end(ray_session, tmp_path):
    """Two families (a grid latent and 1-D tokens) through the sweep, the second trial
    judged after its extraction against the first (``min_trials: 1``)."""
    stop = "scheduler.diagnostic_stop={metric: probe_accuracy, quantile: 0.5, min_trials: 1}"
    sweep = load_sweep(smoke_families(tmp_path), [f"run_dir={tmp_path / 'sweep'}", stop])
    result = run_sweep(sweep)
    assert result["trials"] == 2 and result["failed"] == 0, result
    rows = {
        r["point"]["variant"]: r for r in json.loads((sweep.run_dir / "results.json").read_text())
    }
    assert rows["vavae"]["family"] == "VA-VAE" and rows["vavae"]["latent"] == "4x8x8"
    assert rows["softvq"]["family"] == "SoftVQ-VAE" and rows["softvq"]["latent"] == "4x8"
    first, second = rows["vavae"], rows["softvq"]  # the grid's order
    assert "fd_shapesnet" in first["metrics"] and first["rung"] == 1
    assert set(first["stage_seconds"]) == {
        "tokenizer",
        "extract",
        "generator",
        "sample",
        "evaluate",
        "report",
    }
    stop = sweep.run_dir / "diagnostic_stop" / "families_smoke"
    decision = json.loads(
        next(p for p in stop.glob("*.json") if p.stem in second["metrics"]["run_dir"]).read_text()
    )
    worse = second["metrics"]["probe_accuracy"] < first["metrics"]["probe_accuracy"]
    assert decision["stopped"] == worse and second["stopped_early"] == worse
    if worse:  # no generator compute, no objective, off the front
        assert second["rung"] == 0 and "fd_shapesnet" not in second["metrics"]
        assert set(second["stage_seconds"]) == {"tokenizer", "extract"}
    else:
        assert second["rung"] == 1 and "fd_shapesnet" in second["metrics"]
    csv_head = (sweep.run_dir / "results.csv").read_text().splitlines()[0]
    assert csv_head.startswith("family,latent,variant,rung") and "generator_seconds" in csv_head
    md = (sweep.run_dir / "sweep.md").read_text()
    assert "| family | latent | point |" in md and "| SoftVQ-VAE | 4x8 |" in md
    assert (sweep.run_dir / "frontier.png").stat().st_size > 0


def test_variant_files_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """Tune runs a trial in a working directory of its own: the variants' files are found
    from the sweep file however it was named."""
    monkeypatch.chdir(ROOT)
    sweep = load_sweep("experiments/sweeps/families_smoke.yaml")
    monkeypatch.chdir(tmp_path)
    assert trial_config(sweep, {"variant": "rae"}).tokenizer.name == "rae"


def test_the_imagenet_families_sweep_dry_run(capsys):
    """experiments/sweeps/families_imagenet256.yaml: every trial uses its family's published
    tokenizer (no tokenizer training), its own generator recipe for one short budget on
    GPUs, and names the files it needs; none is here, and none is fetched."""
    from latentforge.cli import main
    from latentforge.platform.sweep_spec import sweep_plan

    path = ROOT / "experiments" / "sweeps" / "families_imagenet256.yaml"
    plan = sweep_plan(load_sweep(path))
    assert {t["family"] for t in plan} == {
        "VA-VAE",
        "VFM-VAE",
        "RAE",
        "SVG",
        "MAETok",
        "SoftVQ-VAE",
    }
    generators = {t["family"]: t["generator"] for t in plan}
    assert generators["RAE"] == "ditdh:DiTDH-XL" and generators["SVG"] == "lightningdit:SVG-XL"
    assert generators["MAETok"] == generators["SoftVQ-VAE"] == "sit:SiT-XL/1"
    for t in plan:
        assert t["tokenizer_images"] == 0 and t["generator_images"] == 1.6e7
        assert t["resources"]["gpu"] and t["resources"]["workers"] >= 8
        keys = {f["key"] for f in t["files"]}
        assert {"tokenizer.weights", "data.path", "evaluate.fid_reference"} <= keys, t
        assert not any(f["exists"] for f in t["files"] if f["path"].startswith("/ckpt"))
    by_family = {t["family"]: t for t in plan}
    assert {"generator.latent_stats", "sample.guide_weights"} <= {
        f["key"] for f in by_family["RAE"]["files"]
    }
    assert {"key": "tokenizer.vfm", "spec": "hf:google/siglip2-large-patch16-512"} in by_family[
        "VFM-VAE"
    ]["hub"]
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "missing: /ckpt/softvq/softvq-l-64/model.safetensors (tokenizer.weights)" in out
