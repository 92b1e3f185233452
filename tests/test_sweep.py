"""A two-trial Ray Tune sweep over the smoke experiment: results, frontier, resume."""

import json
from pathlib import Path

import pytest

from latentforge.config import ConfigError
from latentforge.platform.sweep import load_sweep, run_sweep, trial_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "experiments" / "sweeps" / "smoke.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sweep_points_and_trial_dirs(tmp_path):
    sweep = load_sweep(SMOKE_SWEEP, [f"run_dir={tmp_path}"])
    points = sweep.points()
    assert points == [{"tokenizer.vf_weight": 0.0}, {"tokenizer.vf_weight": 0.1}]
    dirs = {trial_config(sweep, p).run_dir for p in points}
    assert len(dirs) == 2 and all(d.startswith(str(tmp_path)) for d in dirs)


def test_bad_search_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {ROOT / 'experiments' / 'quickstart.yaml'}\nsearch_space:\n  tokenizer.vf_wieght: {{grid: [0.0]}}\n"
    )
    with pytest.raises(ConfigError, match="vf_wieght"):
        load_sweep(bad)


def test_sweep_end_to_end(ray_session, tmp_path):
    sweep = load_sweep(SMOKE_SWEEP, [f"run_dir={tmp_path}"])
    result = run_sweep(sweep)
    assert result["trials"] == 2 and result["failed"] == 0, result
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["point"]["tokenizer.vf_weight"] for r in rows} == {0.0, 0.1}
    assert all("fd_shapesnet" in r["metrics"] and "rfd_shapesnet" in r["metrics"] for r in rows)
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "sweep.md").exists()
    # resuming a finished sweep re-runs no trial (every stage is cached)
    again = run_sweep(sweep, resume=True)
    assert again["trials"] == 2 and again["failed"] == 0
