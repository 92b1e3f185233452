"""Family-agnostic latents: a tokenizer and a generator defined only in the tests
(``tests/families/tokens1d.py``, an experiment's ``plugins:`` file) with 1-D token latents
(C, N) and per-element or scalar statistics, through the statistics of the extraction, the
generator's normalisation, sampling and the real entry point end to end."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from latentforge.config import load_experiment, read_yaml, to_dict
from latentforge.models import build_tokenizer, latent_stat, normalization_of, state_dict_of
from latentforge.platform.shards import (
    Store,
    check_markers,
    finalize_shard,
    latent_sums,
    shard_stats,
    write_manifest,
)
from latentforge.registry import load_plugins
from latentforge.shapes import render_shapes
from tests.test_config import ROOT

PLUGIN = Path(__file__).resolve().parent / "families" / "tokens1d.py"
SMOKE = ROOT / "experiments" / "smoke.yaml"
load_plugins([str(PLUGIN)])  # the families, as an experiment naming the plugin loads them


def toy_experiment(folder: Path, tokenizer: str = "toytokens") -> Path:
    """experiments/smoke.yaml's sizes with the toy families and metrics that need no grid,
    written in full (a ``base:`` would keep the base tokenizer's VA-VAE keys)."""
    node = OmegaConf.to_container(read_yaml(SMOKE))
    node["plugins"] = [str(PLUGIN)]
    node["tokenizer"] = {"name": tokenizer, "config": "tiny"}
    transport = node["generator"]["transport"]
    node["generator"] = {"name": "toydit", "config": "tiny", "transport": transport}
    node["evaluate"]["metrics"] = ["fd_shapesnet", "class_accuracy", "psnr"]
    path = folder / f"{tokenizer}.yaml"
    path.write_text(OmegaConf.to_yaml(node))
    return path


def offset_latents(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Latents (B, *shape) whose mean and scale differ per channel *and* per position, so
    that statistics over the wrong axes differ from the right ones."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 3.0, size=shape[1:])
    scale = rng.uniform(0.5, 2.0, size=shape[1:])
    return (rng.normal(size=shape) * scale + mean).astype(np.float32)


# ----------------------------------------------------------------------------- statistics


def expected_stats(z: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    z = z.astype(np.float64)
    if mode == "channel":
        return z.mean(axis=(0, *range(2, z.ndim))), z.std(axis=(0, *range(2, z.ndim)))
    if mode == "element":
        return z.mean(axis=0), z.std(axis=0)
    return np.array([z.mean()]), np.array([z.std()])


@pytest.mark.parametrize("mode", ["channel", "element", "scalar"])
@pytest.mark.parametrize("shape", [(40, 3, 4, 5), (40, 4, 16)], ids=["grid", "tokens"])
def test_extraction_statistics_in_each_normalization(mode, shape):
    """Sums per shard (three of unequal size), combined as the manifest combines them,
    equal numpy's mean / std over the axes of the mode, in the mode's shape."""
    z = offset_latents(shape)
    markers = []
    for part in np.split(z, [7, 30]):
        sums = latent_sums(part, mode)
        markers.append(
            {"n": sums["n"], "sum": sums["sum"].tolist(), "sumsq": sums["sumsq"].tolist()}
        )
        assert sums["shape"] == list(shape[1:])
    stats = shard_stats(markers)
    mean, std = expected_stats(z, mode)
    assert np.asarray(stats["mean"]).shape == mean.shape == np.asarray(stats["std"]).shape
    assert stats["samples"] == z.size // mean.size
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-7, atol=1e-9)
    # what the generator does with them: unit statistics over the mode's axes
    x = (torch.from_numpy(z).double() - latent_stat(stats["mean"], shape[1:]).double()) / (
        latent_stat(stats["std"], shape[1:]).double()
    )
    axes = (0, *range(2, z.ndim)) if mode == "channel" else (0,) if mode == "element" else None
    assert np.allclose(x.numpy().mean(axis=axes), 0.0, atol=1e-6)
    assert np.allclose(x.numpy().std(axis=axes), 1.0, atol=1e-6)


def test_channel_sums_are_the_float64_sums_over_batch_and_positions():
    """The per-channel path (the demo's) bit for bit: float64 sums over (0, 2, ...)."""
    z = offset_latents((16, 4, 8, 8))
    sums = latent_sums(z)
    z64 = z.astype(np.float64)
    assert np.array_equal(sums["sum"], z64.sum(axis=(0, 2, 3)))
    assert np.array_equal(sums["sumsq"], (z64**2).sum(axis=(0, 2, 3)))
    assert sums["n"] == 16 * 8 * 8
    with pytest.raises(ValueError, match="normalization"):
        latent_sums(z, "pixel")


@pytest.fixture
def threads():
    """The encoder sets torch's thread count for its actor; keep this process's."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", ["toytokens", "toytokens-scalar"])
def test_shards_of_token_latents_store_the_family_normalization(family, tmp_path, threads):
    """No Ray: the encoder writes (C, N) latents, the shard writer sums them in the
    family's mode, ``stats.json`` names it and holds per-element or scalar statistics."""
    from latentforge.platform.extract import LatentEncoder

    cfg = load_experiment(toy_experiment(tmp_path, family), ["extract.shard_rows=32"])
    mode = normalization_of(cfg)
    assert mode == {"toytokens": "element", "toytokens-scalar": "scalar"}[family]
    weights = tmp_path / "tokenizer.safetensors"
    torch.manual_seed(0)
    save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
    images, labels = render_shapes(range(48), cfg.data.resolution, cfg.data.seed)
    store = Store.open(tmp_path / "latents")
    encoder = LatentEncoder(to_dict(cfg), str(weights), store)
    encoder({"image": images, "label": labels, "id": np.arange(48).astype(str).astype(object)})
    for name in ("000000", "000001"):
        finalize_shard(store, name, cfg.extract.shard_rows, mode)
    stats = write_manifest(cfg, store, {"num_skipped": 0, "skipped_ids": []})
    assert stats == json.loads((tmp_path / "latents" / "stats.json").read_text())
    assert stats["normalization"] == mode and stats["latent_shape"] == [4, 16]
    tables = [
        pq.read_table(tmp_path / "latents" / "shards" / f"shard-{n}.parquet")
        for n in ("000000", "000001")
    ]
    both = np.concatenate(
        [t.column(c).combine_chunks().to_numpy() for c in ("latent", "latent_flip") for t in tables]
    )
    assert both.shape == (96, 4, 16)
    mean, std = expected_stats(both, mode)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-6, atol=1e-9)
    markers = [store.read_json(f"shards/shard-{n}.json") for n in ("000000", "000001")]
    with pytest.raises(RuntimeError, match="delete"):  # the family changed its mode since
        check_markers(markers, "channel", store.root)


# ----------------------------------------------------------------------------- latent_stat


def test_latent_stat_broadcasts_channel_element_and_scalar_statistics():
    grid, tokens = (3, 4, 5), (4, 16)
    per_channel = latent_stat([1.0, 2.0, 3.0], grid)
    assert per_channel.shape == (1, 3, 1, 1) and per_channel[0, 2, 0, 0] == 3.0
    assert latent_stat([1.0, 2.0, 3.0, 4.0], tokens).shape == (1, 4, 1)
    element = np.arange(64, dtype=np.float64).reshape(tokens)
    stat = latent_stat(element.tolist(), tokens)
    assert stat.shape == (1, 4, 16) and torch.equal(stat[0], torch.from_numpy(element).float())
    assert latent_stat(np.ones(grid).tolist(), grid).shape == (1, 3, 4, 5)
    assert latent_stat([2.5], tokens).shape == (1, 1, 1)
    assert latent_stat([2.5], grid).shape == (1, 1, 1, 1)
    z = torch.randn(2, *tokens)
    assert torch.equal(z - latent_stat([2.5], tokens), z - 2.5)
    assert torch.equal(z - stat, z - torch.from_numpy(element).float())
    with pytest.raises(ValueError, match="fit neither"):
        latent_stat([1.0, 2.0], tokens)


# ----------------------------------------------------------------------------- no Ray


def test_token_generator_trains_and_samples_on_element_statistics(tmp_path):
    """The generator objective normalises (C, N) tokens per element and sampling
    de-normalises them before decoding (plain torch, no Ray)."""
    from latentforge.generators.generate import sample_images, sample_seeds
    from latentforge.models import build_generator
    from latentforge.training.loop import fit, generator_job
    from latentforge.training.runtime import LocalRuntime

    cfg = load_experiment(toy_experiment(tmp_path), ["train.generator_images=64"])
    z = offset_latents((64, 4, 16))
    mean, std = z.mean(axis=0), z.std(axis=0)
    stats = {"latent_shape": [4, 16], "mean": mean.tolist(), "std": std.tolist()}
    job = generator_job(cfg, stats)
    assert job.objective.mean.shape == job.objective.std.shape == (1, 4, 16)
    data = {"latent": z, "label": (np.arange(64) % 10).astype(np.int64)}
    out = fit(cfg, job, LocalRuntime(data, tmp_path), log=lambda *_: None)
    assert out["nimg"] == 64 and np.isfinite(out["curve"][-1]["loss"])
    generator = build_generator(cfg, stats).eval()
    tokenizer = build_tokenizer(cfg).eval()
    images = sample_images(
        cfg, generator, tokenizer, stats, sample_seeds(cfg, 16), np.arange(16) % 10, log=print
    )
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8


# ----------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.slow
def test_token_family_runs_through_the_cli(ray_session, tmp_path):
    """``latentforge run`` on the smoke sizes with the test-only families: every stage,
    per-element statistics of (C, N) latents, samples and metrics."""
    from latentforge.cli import main
    from latentforge.platform.pipeline import Pipeline
    from latentforge.platform.stages import NAMES

    experiment = toy_experiment(tmp_path)
    run_dir = f"run_dir={tmp_path / 'run'}"
    assert main(["run", str(experiment), run_dir]) == 0
    cfg = load_experiment(experiment, [run_dir])
    p = Pipeline(cfg)
    for stage in NAMES:
        assert (p.stage_dir(stage) / "done.json").exists(), stage
    stats = json.loads((p.stage_dir("extract") / "stats.json").read_text())
    assert stats["normalization"] == "element" and stats["latent_shape"] == [4, 16]
    assert stats["count"] == cfg.data.num_images and stats["samples"] == 2 * cfg.data.num_images
    assert np.asarray(stats["mean"]).shape == np.asarray(stats["std"]).shape == (4, 16)
    assert np.min(stats["std"]) > 0
    with np.load(p.stage_dir("sample") / "samples.npz") as f:
        assert f["arr_0"].shape == (cfg.sample.num_images, 32, 32, 3)
        assert f["arr_0"].dtype == np.uint8
    metrics = json.loads((p.stage_dir("evaluate") / "metrics.json").read_text())
    for key in ("fd_shapesnet", "class_accuracy", "psnr"):
        assert np.isfinite(metrics[key]), key
    assert (p.run_dir / "report.md").stat().st_size > 0
