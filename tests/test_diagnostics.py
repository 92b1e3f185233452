"""Latent diagnostics on synthetic latents whose answers are known, their config, their
metric-table entries, and the sweep's rank correlations of them with the objective."""

import json
from itertools import pairwise
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from latentforge.config import ConfigError, load_experiment
from latentforge.metrics import diagnostics as diag
from latentforge.metrics import table
from latentforge.metrics.reconstruction import psnr
from latentforge.platform import diagnose, sweep
from latentforge.platform.pipeline import stage_hashes
from latentforge.report import diagnostics_rows
from tests.test_config import QUICKSTART


def classes(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def test_probe_separates_separable_classes_and_not_random_ones():
    g = torch.Generator().manual_seed(0)
    labels = classes(1200, 5, 1)
    centres = 3 * torch.randn(5, 32, generator=g)
    separable = centres[labels] + torch.randn(1200, 32, generator=g)
    noise = torch.randn(1200, 32, generator=g)
    fit, test = slice(0, 1000), slice(1000, None)
    good = diag.ridge_probe(separable[fit], labels[fit], separable[test], labels[test])
    bad = diag.ridge_probe(noise[fit], labels[fit], noise[test], labels[test])
    assert good["accuracy"] > 0.98 and abs(bad["accuracy"] - 0.2) < 0.08
    assert (good["num_fit"], good["num_test"], good["classes"]) == (1000, 200, 5)
    assert 0.2 <= good["chance"] < 0.3  # the majority class's share of the test set
    # fewer latents than dimensions: the dual form, same answer as the primal
    wide = centres[labels] @ torch.randn(32, 400, generator=g) + torch.randn(1200, 400)
    dual = diag.ridge_probe(wide[:300], labels[:300], wide[1000:], labels[1000:])
    assert dual["accuracy"] > 0.95
    assert diag.ridge_probe(separable[fit], labels[fit], separable[test], labels[test]) == good


def test_effective_dimension_of_isotropic_and_rank_k_latents():
    g = torch.Generator().manual_seed(0)
    iso = diag.effective_dimension(torch.randn(4000, 16, generator=g))
    assert 15.5 < iso["participation_ratio"] <= 16 and iso["dim"] == 16
    assert iso["dims_99"] == 16 and iso["dims_90"] >= 14
    basis, _ = torch.linalg.qr(torch.randn(64, 3, generator=g))  # (64, 3) orthonormal
    low = torch.randn(4000, 3, generator=g) @ basis.T  # rank 3 in 64 dimensions
    rank3 = diag.effective_dimension(low)
    assert abs(rank3["participation_ratio"] - 3) < 0.05
    assert rank3["dims_90"] == rank3["dims_99"] == 3 and rank3["dim"] == 64
    # fewer rows than dimensions: the Gram matrix's spectrum, the same nonzero eigenvalues
    few = low[:40]
    gram = diag.covariance_spectrum(few)
    cov = torch.linalg.eigvalsh(torch.cov(few.double().T)).flip(0)
    assert len(gram) == 40 and torch.allclose(gram[:3], cov[:3], rtol=1e-9)
    one = diag.effective_dimension(torch.randn(500, 1) * torch.ones(1, 8))
    assert abs(one["participation_ratio"] - 1) < 1e-6 and one["dims_99"] == 1


class PoolTokenizer(torch.nn.Module):
    """A stand-in tokenizer: 4x4 average pooling down, nearest upsampling back."""

    def encode(self, x):
        return F.avg_pool2d(x, 4)  # (B, 3, H/4, W/4)

    def decode(self, z):
        return F.interpolate(z, scale_factor=4, mode="nearest")


def test_decoding_robustness_falls_with_the_noise_and_ignores_batching():
    from latentforge.shapes import render_shapes

    images, _ = render_shapes(range(24), 32, 0)
    mean, std = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.5)
    sigmas = [0.1, 0.25, 0.5]
    decodes = diag.noisy_decodes(PoolTokenizer(), images, mean, std, sigmas, 64, seed=0)
    assert list(decodes) == [0.0, *sigmas]
    scores = [psnr(decodes[s], images) for s in decodes]
    assert all(a > b for a, b in pairwise(scores)) and scores[0] > scores[-1] + 3, scores
    small = diag.noisy_decodes(PoolTokenizer(), images, mean, std, sigmas, 5, seed=0)
    assert all(np.array_equal(small[s], decodes[s]) for s in decodes)


def test_spearman_of_known_rankings_with_ties():
    assert diag.average_ranks([3, 1, 2, 2]).tolist() == [4, 1, 2.5, 2.5]
    assert diag.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert diag.spearman([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5)
    assert diag.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.sqrt(0.9))
    assert diag.spearman([1, 2], [2, 1]) is None  # fewer than 3 pairs
    assert diag.spearman([1, 1, 1], [1, 2, 3]) is None  # no ranking
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    assert diag.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_diagnostics_config_names_a_wrong_key_and_stays_out_of_the_hashes():
    cfg = load_experiment(QUICKSTART)
    assert cfg.extract.diagnostics.metrics == list(get_args(table.DiagnosticGroup))
    with pytest.raises(ConfigError, match=r"extract\.diagnostics\.num_imagez"):
        load_experiment(QUICKSTART, ["extract.diagnostics.num_imagez=3"])
    with pytest.raises(ConfigError, match=r"extract\.diagnostics\.metrics\[1\].*'linear_prob'"):
        load_experiment(QUICKSTART, ["extract.diagnostics.metrics=[se_cknna,linear_prob]"])
    changed = load_experiment(
        QUICKSTART, ["extract.diagnostics.metrics=[]", "extract.diagnostics.noise=[1.0]"]
    )
    assert stage_hashes(changed) == stage_hashes(cfg)
    bad = load_experiment(QUICKSTART, ["extract.diagnostics.probe_test=6000"])
    with pytest.raises(ConfigError, match="extract.diagnostics.probe_test"):
        diagnose.check_diagnostics(bad)


def test_the_table_declares_every_diagnostic_once_with_its_direction():
    groups = {d.group for d in table.DIAGNOSTICS}
    assert groups == set(get_args(table.DiagnosticGroup))  # each group reports something
    assert len(set(table.DIAGNOSTIC_NAMES)) == len(table.DIAGNOSTICS)
    assert not set(table.DIAGNOSTIC_NAMES) & set(table.METRIC_NAMES)  # no clash in a sweep
    assert table.direction("probe_accuracy") == "max"
    assert table.direction("robust_psnr_sigma_0.25") == "max"
    assert table.direction("robust_rfd_shapesnet_sigma_0.5") == "min"
    assert table.direction("participation_ratio") is None  # neither way is better in itself
    assert table.diagnostic_of(table.per_sigma_key("robust_psnr", 0.1)).name == "robust_psnr"
    assert table.diagnostic_of("robust_psnr_clean") is None  # a companion
    assert "0.1" in table.note("robust_psnr_sigma_0.1", {})


def test_se_cknna_says_why_it_has_no_vfm(tmp_path):
    cfg = load_experiment(
        QUICKSTART,
        ["evaluate.fd_vfm=timm:vit_small", f"evaluate.fd_vfm_weights={tmp_path / 'none.pt'}"],
    )
    held = np.zeros((16, 32, 32, 3), np.uint8)
    out = diagnose.alignment(cfg, None, held, "cpu")
    assert list(out) == ["latent_se_cknna_unavailable"]
    assert "no VFM" in out["latent_se_cknna_unavailable"] and "none.pt" in str(out)


def test_the_single_run_report_lists_the_diagnostics(tmp_path):
    values = {"probe_accuracy": 0.9, "probe_accuracy_num_samples": 64, "latent_dim": 256}
    values |= {"computed": ["linear_probe"], "settings": {"seed": 0}, "seconds": {"x": 1.0}}
    (tmp_path / "diagnostics.json").write_text(json.dumps(values))
    rows = {row[0]: row for row in diagnostics_rows(tmp_path)}
    assert set(rows) == {"probe_accuracy", "latent_dim"}
    assert rows["probe_accuracy"][1:3] == ("0.9", "64") and "ridge" in rows["probe_accuracy"][5]
    assert diagnostics_rows(tmp_path / "missing") == [] and diagnostics_rows(None) == []


def sweep_rows(n: int) -> list[dict]:
    """``n`` trials whose probe accuracy ranks them as their objective does (reversed)
    and whose participation ratio is tied; the last trial stopped at rung 1."""
    rows = []
    for i in range(n):
        metrics = {"fd_shapesnet": 10.0 - i, "rfd_shapesnet": 1.0, "probe_accuracy": 0.5 + i / 10}
        metrics |= {"participation_ratio": float(i // 2), "robust_psnr_sigma_0.5": 20.0 + i}
        history = {1: 20.0 - i} if i == n - 1 else {1: 20.0 - i, 2: 10.0 - i}
        rows.append(
            {"point": {"p": i}, "metrics": metrics, "error": None, "rung": len(history)}
            | {"stopped_early": len(history) == 1, "objective_by_rung": history}
        )
    return rows


def test_the_sweep_reports_rank_correlations_of_the_diagnostics(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "plot_frontier", lambda *a, **k: None)
    run = sweep.Sweep(spec=sweep.SweepSpec(), base_path=tmp_path, run_dir=tmp_path / "four")
    result = sweep.write_results(run, sweep_rows(4))
    found = {(c["diagnostic"], c["rung"]): c for c in result["correlations"]}
    assert found["probe_accuracy", 1] == {
        "diagnostic": "probe_accuracy",
        "rung": 1,
        "rho": pytest.approx(-1.0),
        "trials": 4,
    }
    assert found["probe_accuracy", 2]["trials"] == 3  # the stopped trial has no rung 2
    tied = found["participation_ratio", 1]["rho"]
    assert tied == pytest.approx(diag.spearman([0, 0, 1, 1], [20, 19, 18, 17]))
    md = (run.run_dir / "sweep.md").read_text()
    assert "## Latent diagnostics vs fd_shapesnet" in md
    assert "| probe_accuracy | higher | -1.00 (n=4) | -1.00 (n=3) |" in md
    assert "| robust_psnr_sigma_0.5 | higher |" in md
    header = (run.run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == [
        "probe_accuracy",
        "participation_ratio",
        "robust_psnr_sigma_0.5",
        "error",
    ]
    # two trials: no correlation and no section
    two = sweep.Sweep(spec=sweep.SweepSpec(), base_path=tmp_path, run_dir=tmp_path / "two")
    assert sweep.write_results(two, sweep_rows(2))["correlations"] == []
    assert "Latent diagnostics" not in (two.run_dir / "sweep.md").read_text()


def test_latents_without_a_manifest_are_said_to_be_unavailable(tmp_path):
    (tmp_path / "stats.json").write_text("{}")  # the layout before manifests
    cfg = load_experiment(QUICKSTART)
    out, _ = diagnose.compute(cfg, {}, tmp_path, ["linear_probe", "effective_dim"], "cpu")
    assert set(out) == {"probe_accuracy_unavailable", "participation_ratio_unavailable"}
