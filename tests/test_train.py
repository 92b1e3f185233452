"""The training loop without Ray: resume from a checkpoint, EMA, checkpoint contents."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentforge.config import load_experiment
from latentforge.platform.train import LocalRuntime, ema_update, fit, generator_job, tokenizer_job
from tests.test_config import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"


def latents(n=64):
    rng = np.random.default_rng(0)
    return {
        "latent": rng.normal(size=(n, 4, 8, 8)).astype(np.float32),
        "label": (np.arange(n) % 10).astype(np.int64),
    }


STATS = {"latent_shape": [4, 8, 8], "mean": [0.0] * 4, "std": [1.0] * 4}


def test_generator_fit_checkpoints_and_resumes(tmp_path):
    cfg = load_experiment(
        SMOKE,
        [
            "train.generator_images=128",
            "train.checkpoint_every_images=64",
            "train.log_every_images=32",
        ],
    )
    runtime = LocalRuntime(latents(), tmp_path)
    out = fit(cfg, generator_job(cfg, STATS), runtime, log=lambda *_: None)
    assert out["nimg"] == 128
    ck = tmp_path / "checkpoint"
    assert json.loads((ck / "state.json").read_text())["nimg"] == 128
    assert set(load_file(str(ck / "model.safetensors"))) == set(
        load_file(str(ck / "ema.safetensors"))
    )
    assert not any(k.startswith("module.") for k in load_file(str(ck / "model.safetensors")))
    # a longer run with the same runtime resumes at 128 images instead of starting over
    longer = load_experiment(
        SMOKE,
        [
            "train.generator_images=192",
            "train.checkpoint_every_images=64",
            "train.log_every_images=32",
        ],
    )
    logs = []
    out = fit(longer, generator_job(longer, STATS), runtime, log=logs.append)
    assert any("resumed at 128" in line for line in logs)
    assert out["nimg"] == 192 and [p["nimg"] for p in out["curve"]] == [32, 64, 96, 128, 160, 192]


def test_tokenizer_fit_runs(tmp_path):
    cfg = load_experiment(SMOKE, ["train.tokenizer_images=64", "tokenizer.vfm=null"])
    from latentforge.shapes import render_shapes

    images, labels = render_shapes(range(64), 32)
    out = fit(
        cfg,
        tokenizer_job(cfg),
        LocalRuntime({"image": images, "label": labels}, tmp_path),
        log=lambda *_: None,
    )
    assert out["nimg"] == 64 and np.isfinite(out["curve"][-1]["recon"])


def test_ema_update():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.weight.clone()
    ema_update(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, before + 0.1)


@pytest.mark.parametrize("bad", ["nan"])
def test_non_finite_loss_is_an_error(tmp_path, bad):
    cfg = load_experiment(SMOKE, ["train.generator_images=32"])
    data = latents()
    data["latent"][:] = float(bad)
    with pytest.raises(FloatingPointError, match="generator loss"):
        fit(cfg, generator_job(cfg, STATS), LocalRuntime(data, tmp_path), log=lambda *_: None)


def test_published_tokenizer_stage_uses_weights_as_they_are(tmp_path):
    """train.tokenizer_images=0 with tokenizer.weights: no training, the stage's artifact is
    the published autoencoder (VF projection absent from the file, as in official ones)."""
    from safetensors.torch import save_file

    from latentforge.config import ConfigError
    from latentforge.platform.pipeline import Pipeline
    from latentforge.platform.train import build_tokenizer, state_dict_of

    base = [f"run_dir={tmp_path / 'run'}", "train.tokenizer_images=0"]
    published = state_dict_of(build_tokenizer(load_experiment(SMOKE)))
    published = {k: v + 0.01 for k, v in published.items() if not k.startswith("linear_proj.")}
    save_file(published, str(tmp_path / "published.safetensors"))
    cfg = load_experiment(SMOKE, [*base, f"tokenizer.weights={tmp_path}/published.safetensors"])
    p = Pipeline(cfg, log=lambda *_: None)
    p.run_stage("tokenizer")
    stored = load_file(str(p.stage_dir("tokenizer") / "model.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in published.items())
    with pytest.raises(ConfigError, match="tokenizer.weights"):
        Pipeline(load_experiment(SMOKE, base), log=lambda *_: None).run_stage("tokenizer")


def test_gradient_accumulation_equals_one_large_batch():
    """Two micro-batches of 4 with accumulation take the same optimizer step as one batch
    of 8 (a deterministic objective)."""
    from types import SimpleNamespace

    from latentforge.platform.train import train_step

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(-1, 1, 6))

        def forward(self, batch, nimg, gen):
            return {"loss": ((batch["x"] * self.w - 1) ** 2).mean()}

    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    tc = SimpleNamespace(warmup_images=0, grad_clip=0.5)
    results = []
    for batches in ([{"x": x}], [{"x": x[:4]}, {"x": x[4:]}]):
        model = Quadratic()
        job = SimpleNamespace(model=model, lr=0.1, kind="test")
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        out = train_step(model, opt, batches, 0, None, job, tc)
        results.append((model.w.detach().clone(), out))
    (w1, out1), (w2, out2) = results
    assert torch.allclose(w1, w2, atol=1e-6)
    assert out1["loss"] == pytest.approx(out2["loss"], rel=1e-6)
    assert out1["grad_norm"] == pytest.approx(out2["grad_norm"], rel=1e-5)


def test_fit_with_accumulation_and_compile(tmp_path):
    """grad_accum counts images per optimizer step; compile wraps the step (the eager
    backend here: the path, not inductor's code generation, is under test)."""
    overrides = [
        "train.generator_images=128",
        "train.generator_batch_size=32",
        "train.grad_accum=2",
        "train.compile=eager",
        "train.log_every_images=64",
    ]
    cfg = load_experiment(SMOKE, overrides)
    out = fit(
        cfg, generator_job(cfg, STATS), LocalRuntime(latents(), tmp_path), log=lambda *_: None
    )
    assert [p["nimg"] for p in out["curve"]] == [64, 128]


def test_generator_fit_and_stats_on_one_d_token_latents(tmp_path):
    """1-D token latents (B, C, N): per-channel statistics and the generator job."""
    from latentforge.platform.extract import _partial_sums

    z = np.random.default_rng(0).normal(2.0, 3.0, size=(64, 8, 16)).astype(np.float32)
    parts = _partial_sums({"latent": z})
    assert parts["shape"].tolist() == [[8, 16]] and int(parts["n"][0]) == 64 * 16
    mean = parts["s"][0] / parts["n"][0]
    assert np.allclose(mean, z.mean(axis=(0, 2)), atol=1e-6)
    stats = {"latent_shape": [8, 16], "mean": mean.tolist(), "std": [3.0] * 8}
    cfg = load_experiment(SMOKE, ["generator.config=tiny/1", "train.generator_images=64"])
    data = {"latent": z, "label": (np.arange(64) % 10).astype(np.int64)}
    out = fit(cfg, generator_job(cfg, stats), LocalRuntime(data, tmp_path), log=lambda *_: None)
    assert out["nimg"] == 64 and np.isfinite(out["curve"][-1]["loss"])
