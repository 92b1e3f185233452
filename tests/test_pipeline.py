"""The real entry point end to end on a tiny config through Ray: artifacts, caching, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentforge.config import ConfigError, load_experiment
from latentforge.platform.pipeline import Pipeline, StageNotReady
from latentforge.platform.stages import NAMES as STAGES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def done_run(ray_session, tmp_path_factory):
    """The smoke experiment run once, shared by the tests below. ``ray_session``
    (conftest) declares a GPU that no task here can use (no CUDA): the GPU paths'
    scheduling runs, their computation falls back to the CPU."""
    run_dir = tmp_path_factory.mktemp("smoke")
    cfg = load_experiment(SMOKE, [f"run_dir={run_dir}"])
    pipeline = Pipeline(cfg)
    pipeline.run()
    return cfg, pipeline


def test_all_artifacts(done_run):
    cfg, p = done_run
    for stage in STAGES:
        assert p.is_done(stage), stage
    assert (p.run_dir / "config.yaml").exists()
    assert (p.stage_dir("tokenizer") / "model.safetensors").exists()
    stats = p.stats()
    assert stats["count"] == cfg.data.num_images
    assert len(stats["mean"]) == stats["latent_shape"][0] and min(stats["std"]) > 0
    with np.load(p.stage_dir("sample") / "samples.npz") as f:
        assert f["arr_0"].shape == (40, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert np.bincount(f["labels"]).tolist() == [4] * 10
    metrics = json.loads((p.stage_dir("evaluate") / "metrics.json").read_text())
    for key in (
        "fd_shapesnet",
        "fd_shapesnet_real_baseline",
        "class_accuracy",
        "rfd_shapesnet",
        "psnr",
        "recon_class_accuracy",
        "fd_shapesnet_inf",
        "fd_shapes_vit",  # fd_vfm on the embedded VFM, named by it
        "ssim",
    ):
        assert np.isfinite(metrics[key]), key
        assert metrics[f"{key}_num_samples"] in (40, cfg.evaluate.num_recon), key
        assert metrics[f"{key}_extractor"], key
    assert metrics["num_samples"] == 40
    assert len(metrics["class_accuracy_per_class"]) == cfg.data.num_classes
    report = (p.run_dir / "report.md").read_text()
    assert "| fd_shapes_vit |" in report and "local:shapes-vit class token" in report
    assert "| requested / classified as | circle |" in report  # the confusion table
    assert "<h2>What the samples of each class" in (p.run_dir / "report.html").read_text()
    # the latent diagnostics, written after the extraction beside its stats, in the report
    diagnostics = json.loads((p.stage_dir("extract") / "diagnostics.json").read_text())
    assert diagnostics["computed"] == cfg.extract.diagnostics.metrics
    assert "## Latent diagnostics" in report and "| probe_accuracy |" in report
    for name in ("report.html", "report.md", "grid.png", "curves.png", "recon.png"):
        assert (p.run_dir / name).stat().st_size > 0
    curve = json.loads((p.stage_dir("generator") / "curve.json").read_text())
    assert curve[-1]["nimg"] >= cfg.train.generator_images


def test_rerun_is_cached(done_run):
    cfg, p = done_run
    logs = []
    Pipeline(cfg, log=logs.append).run()
    assert all("cached" in line for line in logs), logs


def test_generator_change_reruns_only_generator_stages(done_run):
    cfg, p = done_run
    changed = load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", "generator.class_dropout=0.2"])
    q = Pipeline(changed)
    same = [s for s in STAGES if q.hashes[s] == p.hashes[s]]
    assert same == ["tokenizer", "extract"]
    assert [s for s in STAGES if not q.is_done(s)] == ["generator", "sample", "evaluate", "report"]
    with pytest.raises(StageNotReady, match="train-generator"):
        q.run(("sample",))


def test_sampling_does_not_depend_on_worker_count(done_run):
    cfg, p = done_run
    import dataclasses

    from latentforge.platform.sample import run_sampling

    two = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_workers=2))
    out = p.run_dir / "resample"
    out.mkdir()
    run_sampling(two, p.paths(), p.stats(), out)
    with np.load(out / "samples.npz") as a, np.load(p.stage_dir("sample") / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_sampling_autoguided_by_its_own_generator_is_unguided(done_run, tmp_path):
    """The sample stage's Ray tasks load ``sample.guide_weights``; the generator guiding
    itself at any scale gives the images of no guidance."""
    import dataclasses

    from latentforge.platform.sample import run_sampling

    cfg, p = done_run
    runs = {
        "self": dict(cfg_scale=2.5, guide_weights=p.paths()["generator"]),
        "plain": dict(cfg_scale=1.0),
    }
    for name, sample in runs.items():
        run_sampling(
            dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **sample)),
            p.paths(),
            p.stats(),
            tmp_path / name,
        )
    self_guided, plain, cfg_guided = (
        np.load(d / "samples.npz")["arr_0"]
        for d in (tmp_path / "self", tmp_path / "plain", p.stage_dir("sample"))
    )
    assert np.array_equal(self_guided, plain)
    assert not np.array_equal(cfg_guided, plain)  # the stage's classifier-free guidance


def test_gpu_runs_evaluate_in_a_task_holding_a_gpu(done_run, tmp_path):
    """With ray.use_gpu the evaluation runs in a Ray task holding a GPU (the head of a
    cluster has none), with the same metrics as in-process."""
    import dataclasses

    from latentforge.platform.evaluate import run_evaluation

    cfg, p = done_run
    gpu = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, use_gpu=True))
    result = run_evaluation(gpu, p.paths(), tmp_path)
    assert result["resources"]["GPU"] == 1 and result["device"] == "cpu"  # no CUDA here
    assert p.done_info("evaluate")["device"] == "cpu" and "resources" not in p.done_info("evaluate")
    expected = json.loads((p.stage_dir("evaluate") / "metrics.json").read_text())
    assert result["metrics"] == expected
    assert json.loads((tmp_path / "metrics.json").read_text()) == expected


def test_sampling_resumes_from_its_finished_chunks(done_run, monkeypatch):
    """Each task writes its chunk when done; rerunning the unfinished stage keeps its
    directory and samples only what is missing (a chunk left in place, zeroed to tell it
    apart, is reused; one of the wrong length is sampled again), streams the chunks into
    samples.npz and removes them. On GPUs each task runs in a fresh process (max_calls)."""
    from latentforge.platform import sample as sample_mod

    cfg, p = done_run
    monkeypatch.setattr(sample_mod, "CHUNK_IMAGES", 16)  # 40 images: chunks of 16, 16, 8
    direct = p.run_dir / "chunked"
    sample_mod.run_sampling(p.cfg, p.paths(), p.stats(), direct)
    with np.load(p.stage_dir("sample") / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], np.load(direct / "samples.npz")["arr_0"])
    assert not (direct / "chunks").exists()

    q = Pipeline(load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", "sample.seed=5"]))
    assert q.hashes["generator"] == p.hashes["generator"] != q.hashes["sample"] is not None
    sample_mod.run_sampling(q.cfg, q.paths(), q.stats(), direct)
    expected = np.load(direct / "samples.npz")["arr_0"]
    chunks = q.stage_dir("sample") / "chunks"  # as a stage killed after two chunks left it
    chunks.mkdir(parents=True)
    np.save(chunks / "000000000-000000016.npy", np.zeros_like(expected[:16]))
    np.save(chunks / "000000016-000000032.npy", np.zeros_like(expected[:3]))
    from ray.remote_function import RemoteFunction

    options, real_options = [], RemoteFunction.options

    def spy(self, **o):  # records the sampling task's options and max_calls
        if self._function.__name__ == "_sample_chunk":
            options.append({**o, "max_calls": self._max_calls})
        return real_options(self, **o)

    monkeypatch.setattr(RemoteFunction, "options", spy)
    gpu = load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", "sample.seed=5", "ray.use_gpu=true"])
    Pipeline(gpu).run(("sample",))
    with np.load(q.stage_dir("sample") / "samples.npz") as f:
        assert not f["arr_0"][:16].any()  # reused, not sampled again
        assert np.array_equal(f["arr_0"][16:], expected[16:])  # resampled or sampled
    assert not chunks.exists()
    assert options and all(o["num_gpus"] == 1 and o["max_calls"] == 1 for o in options)


def test_cli_dry_run_and_errors(done_run):
    cfg, _ = done_run
    cli = [sys.executable, "-m", "latentforge"]
    out = subprocess.run(
        [*cli, "run", str(SMOKE), f"run_dir={cfg.run_dir}", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("cached") == len(STAGES)
    bad = subprocess.run(
        [*cli, "run", str(SMOKE), "sample.cfg_scal=3", "--dry-run"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "sample.cfg_scal" in bad.stderr


def test_repa_and_reg_through_extract_generator_and_sampling(done_run):
    """extract.vfm stores the VFM's patch features and class token with the latents; the
    generator trains with REPA and REG on them (one run covers both terms), and its
    checkpoint (with the projector and class-token layers) loads for sampling."""
    cfg, p = done_run
    overrides = ["extract.vfm=local:shapes-vit", "generator.transport.repa_weight=0.5"]
    too_deep = load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", *overrides])
    overrides.append("generator.repa_depth=1")  # the tiny config has 2 blocks
    repa_cfg = load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", *overrides])
    q = Pipeline(repa_cfg)
    assert q.hashes["tokenizer"] == p.hashes["tokenizer"]  # only extract onwards re-run
    assert q.hashes["extract"] != p.hashes["extract"]
    q.run(("extract",))
    with pytest.raises(ConfigError, match="repa_depth 4 outside the 2 blocks"):
        Pipeline(too_deep).run(("generator",))
    stats = q.stats()
    assert stats["vfm"] == "local:shapes-vit" and stats["vfm_shape"] == [128, 8, 8]
    # REPA without stored features is a config error that names the key to set
    no_feats = load_experiment(
        SMOKE, [f"run_dir={cfg.run_dir}", "generator.transport.repa_weight=0.5"]
    )
    with pytest.raises(ConfigError, match="extract.vfm"):
        Pipeline(no_feats).run(("generator",))
    # REG: the class token stored with the features is generated jointly with the latent
    assert stats["vfm_cls_dim"] == 128
    reg_cfg = load_experiment(
        SMOKE, [f"run_dir={cfg.run_dir}", *overrides, "generator.transport.reg_weight=0.03"]
    )
    streamed = load_experiment(  # and streamed: its latents read anew each epoch
        SMOKE,
        [
            f"run_dir={cfg.run_dir}",
            *overrides,
            "generator.transport.reg_weight=0.03",
            "ray.training_data=stream",
        ],
    )
    r = Pipeline(streamed)
    assert r.hashes == Pipeline(reg_cfg).hashes  # how data is held is not part of a result
    assert r.hashes["extract"] == q.hashes["extract"]
    r.run(("generator", "sample"))
    assert r.done_info("generator")["training_data"] == "stream"
    curve = json.loads((r.stage_dir("generator") / "curve.json").read_text())
    assert all(np.isfinite(point["reg"]) and np.isfinite(point["repa"]) for point in curve)
    with np.load(r.stage_dir("sample") / "samples.npz") as f:
        assert f["arr_0"].shape == (40, 32, 32, 3)
    no_cls = load_experiment(
        SMOKE, [f"run_dir={cfg.run_dir}", "generator.transport.reg_weight=0.03"]
    )
    with pytest.raises(ConfigError, match="class token"):
        Pipeline(no_cls).run(("generator",))


def test_report_without_reconstruction_metrics(done_run):
    """Generation metrics only: no reconstructions are made, and the report (and the run
    directory's copy of it) has no reconstruction section or stale image."""
    cfg, p = done_run
    assert (p.run_dir / "recon.png").exists()  # the full run's report has one
    gen_only = load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", "evaluate.metrics=[fd_shapesnet]"])
    q = Pipeline(gen_only)
    q.run(("evaluate", "report"))
    assert not (q.stage_dir("evaluate") / "recon.png").exists()
    assert "fd_shapesnet" in json.loads((q.stage_dir("evaluate") / "metrics.json").read_text())
    report = (q.run_dir / "report.md").read_text()
    assert "Reconstructions" not in report and "grid.png" in report
    assert not (q.run_dir / "recon.png").exists()


def test_tokenizer_streams_an_image_folder(ray_session, tmp_path, monkeypatch):
    """``ray.training_data=stream``: the tokenizer trains on an image folder read anew each
    epoch (two epochs here) through Ray Train, never materialised in the object store."""
    import dataclasses

    from PIL import Image
    from ray.data.dataset import MaterializedDataset

    from latentforge.data import ImageFolderData
    from latentforge.platform import train

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "img" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = np.full((40, 36, 3), 60 * c, np.uint8) + rng.integers(0, 30, (40, 36, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "img" / f"class{c}/{i}.png")
    cfg = load_experiment(
        SMOKE,
        [
            f"run_dir={tmp_path / 'run'}",
            "ray.training_data=stream",
            "train.tokenizer_images=64",
            "train.tokenizer_batch_size=16",
            "train.log_every_images=32",
            "train.checkpoint_every_images=32",
        ],
    )
    data = ImageFolderData(path=str(tmp_path / "img"), resolution=32, holdout_fraction=0.25)
    cfg = dataclasses.replace(cfg, data=data)
    given, run_trainer = [], train.run_trainer
    monkeypatch.setattr(
        train,
        "run_trainer",
        lambda c, k, n, ds, *a: given.append(ds) or run_trainer(c, k, n, ds, *a),
    )
    info = Pipeline(cfg).run(("tokenizer",))["tokenizer"]
    assert info["training_data"] == "stream" and info["nimg"] == 64
    assert not isinstance(given[0], MaterializedDataset)
    curve = json.loads((Pipeline(cfg).stage_dir("tokenizer") / "curve.json").read_text())
    assert [p["nimg"] for p in curve] == [32, 64] and all(np.isfinite(p["loss"]) for p in curve)


def test_fid_in_the_evaluate_stage(done_run, inception_file):
    cfg, p = done_run
    weights = inception_file
    inception_set = ["fid", "is", "kid", "precision", "recall"]
    overrides = [f"evaluate.metrics={inception_set}", f"evaluate.inception_weights={weights}"]
    overrides.append("evaluate.num_real=16")  # InceptionV3 at 299 px: ~0.2 s per image here
    q = Pipeline(load_experiment(SMOKE, [f"run_dir={cfg.run_dir}", *overrides]))
    q.run(("evaluate",))
    metrics = json.loads((q.stage_dir("evaluate") / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["fid_reference"] == "16 training images"
    for name in inception_set:
        assert np.isfinite(metrics[name]), name
        assert metrics[f"{name}_num_samples"] == 40, name
        assert "inception" in metrics[f"{name}_extractor"], name
