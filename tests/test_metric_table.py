"""The metric table: every metric evaluation accepts is in it with a direction and a meaning,
and the report's meanings and the sweep's directions are the table's."""

import numpy as np
import pytest

from latentforge.config import EvaluateConfig
from latentforge.metrics import table
from latentforge.metrics.classification import confusion
from latentforge.metrics.table import (
    BASELINE_NOTE,
    COMPANIONS,
    INCEPTION_METRICS,
    METRIC_NAMES,
    METRICS,
    RECON_METRICS,
    SAMPLE_METRICS,
    SHAPESNET_METRICS,
    VFM_METRICS,
    direction,
    higher_is_better,
    metric,
    metric_entry,
    note,
)
from latentforge.platform import evaluate as ev
from latentforge.platform import sweep
from latentforge.report import confusion_table, metrics_rows

# the better direction of every score, written out once more: a wrong entry in the table fails
DIRECTIONS = {
    "fd_shapesnet": "min",
    "fd_shapesnet_inf": "min",
    "class_accuracy": "max",
    "fid": "min",
    "fid_inf": "min",
    "sfid": "min",
    "is": "max",
    "kid": "min",
    "precision": "max",
    "recall": "max",
    "fd_vfm": "min",
    "rfd_shapesnet": "min",
    "psnr": "max",
    "ssim": "max",
    "lpips": "min",
    "fd_shapesnet_real_baseline": "min",
    "recon_class_accuracy": "max",
    "se_cknna": "max",
}


def test_every_metric_evaluate_accepts_has_a_direction_meaning_and_extractor():
    ev.check_metrics(list(METRIC_NAMES))
    assert set(EvaluateConfig().metrics) <= set(METRIC_NAMES)  # the default asks for known ones
    with pytest.raises(ValueError, match="fid_infinity"):
        ev.check_metrics(["fid", "fid_infinity"])
    assert len(set(METRIC_NAMES)) == len(METRICS)
    for m in METRICS:
        assert metric(m.name) is m
        assert m.direction in ("min", "max") and m.description, m.name
        assert m.extractor in ("shapesnet", "inception", "vfm", "pixels", "lpips"), m.name
        assert m.kind in ("generation", "reconstruction"), m.name
    # evaluate dispatches each metric by exactly one of these groups
    groups = [SHAPESNET_METRICS, INCEPTION_METRICS, VFM_METRICS & SAMPLE_METRICS, RECON_METRICS]
    for name in METRIC_NAMES:
        assert sum(name in g for g in groups) == 1, name
    with pytest.raises(KeyError, match="fid_infinity"):
        metric("fid_infinity")
    with pytest.raises(KeyError):
        metric("num_samples")  # a companion, not a metric one can ask for


def test_directions_are_right():
    scored = {e.name: e.direction for e in (*METRICS, *COMPANIONS) if e.direction}
    assert scored == DIRECTIONS
    for name, way in DIRECTIONS.items():
        assert direction(name) == way and higher_is_better(name) == (way == "max"), name
    distances = ("fd_", "fid", "sfid", "rfd_", "kid", "lpips")
    assert all(way == "min" for n, way in DIRECTIONS.items() if n.startswith(distances))
    assert {n for n in DIRECTIONS if higher_is_better(n)} == {
        "psnr",
        "ssim",
        "recon_class_accuracy",
        "class_accuracy",
        "is",
        "precision",
        "recall",
        "se_cknna",
    }
    # fd_vfm under its VFM's name, and its baseline: distances
    assert direction("fd_shapes_vit") == direction("fd_shapes_vit_real_baseline") == "min"
    assert direction("num_samples") is None and not higher_is_better("kid_subsets")


def test_report_notes_come_from_the_table():
    for entry in (*METRICS, *COMPANIONS):
        ((key, *_, meaning),) = metrics_rows({entry.name: 1.0})
        assert key == entry.name and meaning == entry.description == note(key, {}), key
    vfm = metric_entry("fd_dinov2_base", 2.0, 8, "hf:facebook/dinov2-base class token", "8")
    rows = {row[0]: row[-1] for row in metrics_rows(vfm)}
    assert rows["fd_dinov2_base"] == metric("fd_vfm").description
    assert note("fd_dinov2_base_real_baseline", {}) == BASELINE_NOTE
    assert note("something_else", {}) == ""
    assert table.vfm_metric_name("hf:facebook/dinov2-base") == "fd_dinov2_base"


def test_report_rows_carry_counts_extractors_and_meanings():
    metrics = {
        "num_samples": 40,
        **metric_entry("kid", 0.0123, 40, "inception pool3", "64 training images"),
        "kid_std": 0.002,
        **metric_entry("fd_shapes_vit", 1.5, 40, "local:shapes-vit class token (128)", "64 real"),
        **metric_entry("fd_shapes_vit_real_baseline", 0.2, 40, "local:shapes-vit", "64 real"),
        **metric_entry("sfid", 4.0, 40, ev.INCEPTION_SPATIAL, "VIRTUAL_ref.npz"),
        **metric_entry("fid_inf", 3.0, 40, "inception pool3", "64 real"),
        "fid_inf_sizes": [4, 10, 40],
        "class_accuracy_per_class": [0.5, None],
        "class_accuracy_per_class_num_samples": [4, 0],
        "class_confusion": [[3, 1] + [0] * 8, [0] * 10],  # a table of its own, not a row
    }
    rows = {row[0]: row[1:] for row in metrics_rows(metrics)}
    assert set(rows) == {
        "num_samples",
        "kid",
        "fd_shapes_vit",
        "fd_shapes_vit_real_baseline",
        "sfid",
        "fid_inf",
        "class_accuracy_per_class",
    }
    value, samples, extractor, reference, meaning = rows["kid"]
    assert value == "0.0123 ± 0.002" and samples == "40" and extractor == "inception pool3"
    assert reference == "64 training images" and "Kernel Inception" in meaning
    assert "FD_DINOv2" in rows["fd_shapes_vit"][4]
    assert rows["fd_shapes_vit_real_baseline"][4] == BASELINE_NOTE
    assert rows["fd_shapes_vit_real_baseline"][:2] == ("0.2", "40")
    assert "Nash" in rows["sfid"][4] and "mixed_6/conv" in rows["sfid"][2]
    assert rows["fid_inf"][1] == "40 (fit on 3 sizes 4..40)" and "Chong" in rows["fid_inf"][4]
    assert rows["class_accuracy_per_class"][:2] == ("0.5, n/a", "4, 0")


def front_of(tmp_path, monkeypatch, frontier_x: str) -> list[float]:
    """The frontier axis values of the trials ``sweep.write_results`` marks as on the front,
    for two trials equal on the objective."""
    monkeypatch.setattr(sweep, "plot_frontier", lambda *a, **k: None)  # what sweep calls
    spec = sweep.SweepSpec(frontier_x=frontier_x)
    run = sweep.Sweep(spec=spec, base_path=tmp_path, run_dir=tmp_path / frontier_x)
    rows = [
        {"point": {"p": i}, "metrics": {frontier_x: x, "fd_shapesnet": 5.0}, "error": None}
        for i, x in enumerate([20.0, 30.0])
    ]
    sweep.write_results(run, rows)
    lines = (run.run_dir / "sweep.md").read_text().splitlines()
    return [float(line.split("|")[4]) for line in lines if line.rstrip().endswith("| yes |")]


def test_the_sweeps_frontier_directions_come_from_the_table(tmp_path, monkeypatch):
    assert not hasattr(sweep, "HIGHER_IS_BETTER")  # no list of its own to keep in step
    assert front_of(tmp_path, monkeypatch, "psnr") == [30.0]  # higher is better
    assert front_of(tmp_path, monkeypatch, "rfd_shapesnet") == [20.0]  # lower is better
    # the sweep reads the table: flip psnr's direction there and the front flips
    flipped = {
        **table._ENTRIES,
        "psnr": table.Metric("psnr", "min", "x", "pixels", "reconstruction"),
    }
    monkeypatch.setattr(table, "_ENTRIES", flipped)
    assert front_of(tmp_path, monkeypatch, "psnr") == [20.0]


def test_confusion_counts_and_its_report_table():
    labels, preds = np.array([0, 0, 1, 1, 1]), np.array([0, 9, 1, 1, 0])
    conf = confusion(labels, preds, 2)
    assert conf.tolist() == [[1] + [0] * 8 + [1], [1, 2] + [0] * 8]
    table_rows = confusion_table(conf.tolist())
    assert table_rows[0][:3] == ["requested / classified as", "circle", "bar"]
    assert table_rows[0][-1] == "heart" and table_rows[2][:3] == ["bar", "1", "2"]
