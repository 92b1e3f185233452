"""The training loop: resume from a checkpoint, EMA, checkpoint contents (without Ray), and a
Train worker killed mid-run that finishes from its checkpoint (through Ray Train)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentforge.config import ConfigError, load_experiment
from latentforge.training.loop import ema_update, fit, generator_job, tokenizer_job
from latentforge.training.runtime import LocalRuntime, shuffled_batches
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


class TransportSpy:
    """Records the x1 the transport loss is given."""

    def __init__(self):
        self.x1 = []

    def loss(self, model, x1, y, generator=None, features=None, cls=None):
        self.x1.append(x1)
        return {"loss": x1.sum()}


def test_generator_trains_on_latents_normalised_with_the_dataset_statistics():
    """The generator's data x1 is the latent standardised per channel,
    (latent - mean) / std, with the extracted statistics (LightningDiT's latent norm)."""
    mean, std = [0.5, -1.0, 0.25, 2.0], [2.0, 0.5, 1.0, 3.0]
    stats = {"latent_shape": [4, 8, 8], "mean": mean, "std": std}
    job = generator_job(load_experiment(SMOKE), stats)
    spy = job.objective.transport = TransportSpy()
    batch = {k: torch.from_numpy(v[:8]) for k, v in latents().items()}
    job.objective(batch, 0, torch.Generator().manual_seed(0))
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(spy.x1[0], (batch["latent"] - m) / s, atol=1e-6)


class Crash(RuntimeError):
    pass


class CrashingRuntime(LocalRuntime):
    """A LocalRuntime whose process 'dies' right after the checkpoint at ``at`` images."""

    def __init__(self, arrays, out_dir, at):
        super().__init__(arrays, out_dir)
        self.at = at

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None and metrics["nimg"] == self.at:
            raise Crash


@pytest.mark.parametrize("crash_at", [64, 96])  # at an epoch boundary (64 latents) and inside
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, crash_at):
    """Exact resume: data order (epoch, step in epoch) and per-step seeds come back from the
    checkpoint, so crash + rerun ends with the very weights of a run that never stopped."""
    cfg = load_experiment(
        SMOKE,
        ["train.generator_images=160", "train.checkpoint_every_images=32"],
    )
    fit(cfg, generator_job(cfg, STATS), LocalRuntime(latents(), tmp_path / "a"), log=print)
    crashing = CrashingRuntime(latents(), tmp_path / "b", at=crash_at)
    with pytest.raises(Crash):
        fit(cfg, generator_job(cfg, STATS), crashing, log=print)
    logs = []
    fit(cfg, generator_job(cfg, STATS), LocalRuntime(latents(), tmp_path / "b"), log=logs.append)
    assert any(f"resumed at {crash_at}" in line for line in logs)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoint" / name))
        b = load_file(str(tmp_path / "b" / "checkpoint" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_generator_init_continues_a_shorter_run(tmp_path):
    """train.generator_init (the sweep's ASHA rungs): a fresh run starts from another run's
    checkpoint, with its weights, optimizer and images seen, and must not go backwards."""
    common = ["train.checkpoint_every_images=64", "train.log_every_images=32"]
    short = load_experiment(SMOKE, ["train.generator_images=64", *common])
    fit(short, generator_job(short, STATS), LocalRuntime(latents(), tmp_path / "a"), log=print)
    ck = tmp_path / "a" / "checkpoint"
    cont = load_experiment(
        SMOKE, ["train.generator_images=128", f"train.generator_init={ck}", *common]
    )
    job = generator_job(cont, STATS)
    logs = []
    out = fit(cont, job, LocalRuntime(latents(), tmp_path / "b"), log=logs.append)
    assert any("continuing" in line and "from 64 images" in line for line in logs)
    assert out["nimg"] == 128 and [p["nimg"] for p in out["curve"]] == [32, 64, 96, 128]
    # asking for fewer images than the checkpoint has seen is an error, not a silent no-op
    fewer = load_experiment(
        SMOKE, ["train.generator_images=32", f"train.generator_init={ck}", *common]
    )
    with pytest.raises(ValueError, match="more than the 32"):
        fit(fewer, generator_job(fewer, STATS), LocalRuntime(latents(), tmp_path / "c"))
    missing = load_experiment(SMOKE, [f"train.generator_init={tmp_path}/nowhere", *common])
    with pytest.raises(FileNotFoundError, match="generator_init"):
        fit(missing, generator_job(missing, STATS), LocalRuntime(latents(), tmp_path / "d"))


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


def test_ema_decay_warm_up_follows_its_formula():
    """min(decay, (1 + step) / (10 + step)): 0.1 at step 0, then the configured decay."""
    from latentforge.training.loop import ema_decay_at

    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert ema_decay_at(10**6, 0.9999) == pytest.approx(0.9999, rel=1e-12)
    assert ema_decay_at(10**6, 0.999) == pytest.approx(0.999, rel=1e-12)


def read(path):
    """A checkpoint file's tensors, copied (not views of a file that is rewritten in place)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def test_fit_moves_the_ema_towards_the_model_with_the_warm_up_decay(tmp_path):
    """After step k the EMA is d_k EMA + (1 - d_k) W_k with d_k = min(decay, (1+k)/(10+k))
    and W_k the weights after the step; it starts from the initial weights."""
    from latentforge.models import state_dict_of

    common = ["train.warmup_images=0", "train.checkpoint_every_images=32"]  # full lr at once
    one = load_experiment(SMOKE, ["train.generator_images=32", *common])  # one step of 32
    job = generator_job(one, STATS)
    init = {k: v.clone() for k, v in state_dict_of(job.model).items()}
    runtime = LocalRuntime(latents(), tmp_path)
    fit(one, job, runtime, log=lambda *_: None)
    ck = tmp_path / "checkpoint"
    w1, ema1 = (read(ck / f) for f in ("model.safetensors", "ema.safetensors"))
    moved = [k for k in init if not torch.equal(w1[k], init[k])]
    assert "final_layer.linear.weight" in moved  # (the zero-initialised layer moves first)
    for k in moved:
        assert not torch.equal(ema1[k], init[k]) and not torch.equal(ema1[k], w1[k]), k
    for k in init:
        assert torch.allclose(ema1[k], 0.1 * init[k] + 0.9 * w1[k], rtol=1e-5, atol=1e-7), k
    two = load_experiment(SMOKE, ["train.generator_images=64", *common])
    fit(two, generator_job(two, STATS), runtime, log=lambda *_: None)  # resumes: step 1
    w2, ema2 = (read(ck / f) for f in ("model.safetensors", "ema.safetensors"))
    moved = [k for k in init if not torch.equal(w2[k], w1[k])]
    assert len(moved) > 2  # (the zero-initialised modulations open up the rest)
    for k in moved:
        assert not torch.equal(ema2[k], ema1[k]) and not torch.equal(ema2[k], w2[k]), k
    for k in init:
        expected = 2 / 11 * ema1[k] + 9 / 11 * w2[k]
        assert torch.allclose(ema2[k], expected, rtol=1e-5, atol=1e-7), k


def test_shuffled_batches_cut_shuffled_chunks_with_carry_over():
    rows = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 16), np.arange(16, 19)]
    chunks = [{"id": r, "x": r * 10.0} for r in rows]
    out = list(shuffled_batches(iter(chunks), 4, seed=3))
    assert [len(b["id"]) for b in out] == [4, 4, 4, 4]  # 19 rows: 3 dropped at the end
    ids = torch.cat([b["id"] for b in out]).numpy()
    assert len(set(ids)) == 16 and set(ids) <= set(range(19))  # no row twice
    assert all(torch.equal(b["x"], b["id"] * 10.0) for b in out)  # columns stay aligned
    assert not np.array_equal(ids, np.arange(16))  # shuffled
    again = torch.cat([b["id"] for b in shuffled_batches(iter(chunks), 4, seed=3)]).numpy()
    other = torch.cat([b["id"] for b in shuffled_batches(iter(chunks), 4, seed=4)]).numpy()
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)


@pytest.mark.parametrize("bad", ["nan"])
def test_non_finite_loss_is_an_error(tmp_path, bad):
    cfg = load_experiment(SMOKE, ["train.generator_images=32"])
    data = latents()
    data["latent"][:] = float(bad)
    with pytest.raises(FloatingPointError, match="generator loss"):
        fit(cfg, generator_job(cfg, STATS), LocalRuntime(data, tmp_path), log=lambda *_: None)


def test_batch_that_cannot_be_split_or_filled_is_an_error(tmp_path):
    # a global batch not divisible by workers x accumulation would silently shrink; a data
    # share smaller than one step used to loop forever without a single step
    cfg = load_experiment(SMOKE, ["train.generator_images=64", "train.grad_accum=3"])
    with pytest.raises(ValueError, match="not a multiple of ray.num_workers 1 x train.grad_acc"):
        fit(cfg, generator_job(cfg, STATS), LocalRuntime(latents(), tmp_path / "a"))
    cfg = load_experiment(SMOKE, ["train.generator_images=64"])
    with pytest.raises(ValueError, match="smaller than one step"):
        fit(cfg, generator_job(cfg, STATS), LocalRuntime(latents(n=8), tmp_path / "b"))


def test_published_tokenizer_stage_uses_weights_as_they_are(tmp_path):
    """train.tokenizer_images=0 with tokenizer.weights: no training, the stage's artifact is
    the published autoencoder (VF projection absent from the file, as in official ones)."""
    from safetensors.torch import save_file

    from latentforge.config import ConfigError
    from latentforge.models import build_tokenizer, state_dict_of
    from latentforge.platform.pipeline import Pipeline

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

    from latentforge.training.loop import Job, train_step

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
        job = Job("test", model, model, 8, 8, lr=0.1, ema_decay=0.999)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        out = train_step(model, opt, batches, 0, None, job, tc)
        results.append((model.w.detach().clone(), out))
    (w1, out1), (w2, out2) = results
    assert torch.allclose(w1, w2, atol=1e-6)
    assert out1["loss"] == pytest.approx(out2["loss"], rel=1e-6)
    assert out1["grad_norm"] == pytest.approx(out2["grad_norm"], rel=1e-5)


def test_lr_warms_up_linearly_then_stays_constant():
    """Linear warm-up over warmup_images: base_lr (n + 1) / warmup at n images seen (the first
    step is not wasted at lr 0), then base_lr; no warm-up: base_lr from the start."""
    from latentforge.training.loop import lr_at

    assert lr_at(0, 1e-3, 1000) == pytest.approx(1e-6)
    assert lr_at(249, 1e-3, 1000) == pytest.approx(2.5e-4)
    assert lr_at(499, 1e-3, 1000) == pytest.approx(5e-4)
    assert lr_at(999, 1e-3, 1000) == pytest.approx(1e-3)
    assert lr_at(10**6, 1e-3, 1000) == pytest.approx(1e-3)
    assert lr_at(0, 1e-3, 0) == lr_at(123, 1e-3, 0) == pytest.approx(1e-3)


def rae_lr_ratio(step, kind, warmup, end, final_ratio):
    """bytetriper/RAE's LambdaLR factor (warmup_from_zero), written out from its formula."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= end:
        return final_ratio
    progress = (step - warmup) / max(end - warmup, 1)
    if kind == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_decays_after_the_warm_up_as_rae_schedules_it(kind, tmp_path):
    from latentforge.platform.sweep import load_sweep, rung_config, trial_config
    from latentforge.training.loop import lr_at

    for n in (0, 99, 100, 101, 550, 999, 1000, 5000):
        expected = 2e-4 * rae_lr_ratio(n, kind, 100, 1000, 0.1)
        assert lr_at(n, 2e-4, 100, kind, 2e-5, 1000) == pytest.approx(expected, rel=1e-9), n
    assert lr_at(550, 2e-4, 100, kind, 2e-5, 1000) == pytest.approx(1.1e-4)  # half-way
    # RAE's DiT^DH: no warm-up, the lr held until the decay starts (warmup_from_zero false)
    held = [lr_at(n, 2e-4, 0, kind, 2e-5, 1000, 100) for n in (0, 99, 100, 550, 1000)]
    assert held == pytest.approx([2e-4, 2e-4, 2e-4, 1.1e-4, 2e-5])
    # each model has its own decay; the generator's end is its budget, or the sweep's
    over = [f"train.tokenizer_lr_decay={kind}", "train.tokenizer_final_lr=2e-5"]
    cfg = load_experiment(SMOKE, [f"run_dir={tmp_path}", *over])
    job = tokenizer_job(cfg)
    assert (job.lr_decay, job.final_lr, job.decay_end_images) == (kind, 2e-5, None)
    assert generator_job(cfg, STATS).lr_decay is None
    with pytest.raises(ConfigError, match="train.generator_final_lr: set without"):
        load_experiment(SMOKE, ["train.generator_final_lr=1e-5"])
    sweep = load_sweep(ROOT / "experiments/sweeps/smoke.yaml", [f"run_dir={tmp_path}"])
    trial = trial_config(sweep, sweep.points()[0])
    decaying = dataclasses.replace(
        trial, train=dataclasses.replace(trial.train, generator_lr_decay=kind)
    )
    decayed = rung_config(sweep, decaying, 1, None)
    assert generator_job(decayed, STATS).decay_end_images == 512
    assert decayed.train.generator_images == 256 and decayed.train.generator_decay_end_images == 512
    assert rung_config(sweep, trial, 1, None).train.generator_decay_end_images is None


def test_gradients_are_clipped_before_the_step():
    """With train.grad_clip c the step uses the gradient rescaled to norm min(|g|, c): under
    plain SGD at lr 1 the parameters move by exactly that much; grad_norm logs |g|."""
    from types import SimpleNamespace

    from latentforge.training.loop import Job, train_step

    target = torch.tensor([3.0, -4.0, 12.0])  # |grad of |w - target|^2 at 0| = 2 * 13 = 26

    class Far(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, batch, nimg, gen):
            return {"loss": (self.w - target).pow(2).sum()}

    for clip, moved in ((0.5, 0.5), (100.0, 26.0), (0.0, 26.0)):  # 0: off
        model = Far()
        job = Job("test", model, model, 1, 1, lr=1.0, ema_decay=0.999)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        tc = SimpleNamespace(warmup_images=0, grad_clip=clip)
        out = train_step(model, opt, [{"x": torch.zeros(1)}], 0, None, job, tc)
        step = model.w.detach()
        assert step.norm().item() == pytest.approx(moved, rel=1e-5), clip
        assert torch.allclose(step / step.norm(), target / 13, atol=1e-6)  # direction kept
        if clip > 0:
            assert out["grad_norm"] == pytest.approx(26.0, rel=1e-5)


def test_weight_decay_reaches_the_optimiser():
    """train.weight_decay is AdamW's decoupled weight decay for the model's parameters; the
    ImageNet LightningDiT-XL/1 reproduction trains without (0.0, not AdamW's default 0.01)."""
    from latentforge.training.loop import make_optimizers

    for overrides, decay in (([], 0.0), (["train.weight_decay=0.037"], 0.037)):
        cfg = load_experiment(SMOKE, overrides)
        opt, _ = make_optimizers(generator_job(cfg, STATS), cfg.train)
        assert isinstance(opt, torch.optim.AdamW)
        assert [g["weight_decay"] for g in opt.param_groups] == [decay] * len(opt.param_groups)
    xl = load_experiment(
        ROOT / "experiments/imagenet256/lightningdit_xl1_vavae_f16d32.yaml",
        ["generator.config=tiny"],  # the experiment's train settings on a model that fits here
    )
    opt, _ = make_optimizers(generator_job(xl, STATS), xl.train)
    assert xl.train.weight_decay == 0.0 and opt.param_groups[0]["weight_decay"] == 0.0


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
    from latentforge.platform.shards import latent_sums

    z = np.random.default_rng(0).normal(2.0, 3.0, size=(64, 8, 16)).astype(np.float32)
    sums = latent_sums(z)
    assert sums["shape"] == [8, 16] and sums["n"] == 64 * 16
    mean = sums["sum"] / sums["n"]
    assert np.allclose(mean, z.mean(axis=(0, 2)), atol=1e-6)
    stats = {"latent_shape": [8, 16], "mean": mean.tolist(), "std": [3.0] * 8}
    cfg = load_experiment(SMOKE, ["generator.config=tiny/1", "train.generator_images=64"])
    data = {"latent": z, "label": (np.arange(64) % 10).astype(np.int64)}
    out = fit(cfg, generator_job(cfg, stats), LocalRuntime(data, tmp_path), log=lambda *_: None)
    assert out["nimg"] == 64 and np.isfinite(out["curve"][-1]["loss"])


def test_tokenizer_gan_phase_switches_on_checkpoints_and_resumes(tmp_path):
    """The discriminator steps from disc_start images on (logged ``disc_active``, ``d_loss``,
    ``g_loss``); the checkpoint holds it and its optimizer apart from the tokenizer's
    weights (official keys only), and resume restores both."""
    from latentforge.shapes import render_shapes
    from latentforge.training.checkpoint import load_checkpoint
    from latentforge.training.loop import make_optimizers

    def cfg_for(total):
        return load_experiment(
            SMOKE,
            [
                f"train.tokenizer_images={total}",
                "train.checkpoint_every_images=64",
                "train.log_every_images=32",
                "tokenizer.vfm=null",
                "tokenizer.disc_weight=0.5",
                "tokenizer.disc_start=64",
                "tokenizer.disc_channels=8",
                "tokenizer.disc_lr=1.0e-3",
            ],
        )

    images, labels = render_shapes(range(64), 32)
    runtime = LocalRuntime({"image": images, "label": labels}, tmp_path)
    cfg = cfg_for(128)
    job = tokenizer_job(cfg)
    out = fit(cfg, job, runtime, log=lambda *_: None)
    # steps start at 0, 32, 64, 96 images seen: the last two are in the GAN phase
    assert [p["disc_active"] for p in out["curve"]] == [0.0, 0.0, 1.0, 1.0]
    assert ["d_loss" in p and "g_loss" in p for p in out["curve"]] == [False, False, True, True]
    assert all(np.isfinite(p["d_loss"]) for p in out["curve"][2:])
    ck = tmp_path / "checkpoint"
    model_keys = set(load_file(str(ck / "model.safetensors")))
    assert model_keys == set(job.model.state_dict()) and not any("main." in k for k in model_keys)
    saved_disc = load_file(str(ck / "discriminator.safetensors"))
    assert set(saved_disc) == set(job.discriminator.state_dict())

    fresh = tokenizer_job(cfg)
    assert not torch.equal(fresh.discriminator.main[0].weight, saved_disc["main.0.weight"])
    opt, opt_d = make_optimizers(fresh, cfg.train)
    state, _ = load_checkpoint(str(ck), fresh, None, opt, opt_d)
    assert state["nimg"] == 128 and opt_d.param_groups[0]["lr"] == 1.0e-3
    assert all(torch.equal(fresh.discriminator.state_dict()[k], v) for k, v in saved_disc.items())
    saved_opt = torch.load(ck / "optimizer_disc.pt", weights_only=True)
    exp_avg = opt_d.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.abs().sum() > 0 and torch.equal(exp_avg, saved_opt["state"][0]["exp_avg"])

    logs = []
    longer = cfg_for(160)
    out = fit(longer, tokenizer_job(longer), runtime, log=logs.append)
    assert any("resumed at 128" in line for line in logs)
    assert out["curve"][-1]["nimg"] == 160 and out["curve"][-1]["disc_active"] == 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_run_finishes_from_its_checkpoint(ray_session, tmp_path):
    """The plugin generator ``crashing`` SIGKILLs its Train worker in the forward after the
    checkpoint at 64 images (two 32-image steps); with ray.max_failures=1 Ray Train restarts
    the worker group, which resumes from that checkpoint (not from zero) and finishes the
    128 images."""
    import ray

    from latentforge.platform.train import run_trainer

    crashing = Path(__file__).parent / "families" / "crashing.py"  # the plugin
    marker = tmp_path / "crashed.json"
    cfg = load_experiment(
        SMOKE,
        [
            f"run_dir={tmp_path}",
            f"plugins=[{crashing}]",
            "generator.name=crashing",
            "generator.crash_after_calls=2",
            f"generator.crash_marker={marker}",
            "train.generator_images=128",
            "train.generator_batch_size=32",
            "train.checkpoint_every_images=32",
            "train.log_every_images=32",
            "ray.num_workers=1",
            "ray.max_failures=1",
        ],
    )
    data = latents()
    dataset = ray.data.from_items(
        [{"latent": z, "label": y} for z, y in zip(data["latent"], data["label"], strict=True)]
    )
    ckpt = run_trainer(cfg, "generator", "faulty", dataset, STATS)

    assert json.loads(marker.read_text())["calls"] == 2  # the worker really died there
    with ckpt.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        curve = json.loads((Path(d) / "curve.json").read_text())
    assert state["nimg"] == 128
    assert state["resumed_at"] == [64]  # the second attempt started from the checkpoint
    assert [p["nimg"] for p in curve] == [32, 64, 96, 128]


def test_imagenet_reproduction_uses_the_official_settings():
    # LightningDiT-XL/1 on VA-VAE f16d32, 800 epochs, the 1.35-FID sampling settings
    # (research notes, lightningdit.md: configs/reproductions/..._800ep_cfg.yaml, train.py)
    cfg = load_experiment(ROOT / "experiments/imagenet256/lightningdit_xl1_vavae_f16d32.yaml")
    s, t, tr = cfg.sample, cfg.train, cfg.generator.transport
    assert cfg.generator.config == "LightningDiT-XL/1"
    assert (s.sampler, s.steps, s.cfg_scale, s.cfg_channels, s.timestep_shift) == (
        "euler",
        249,  # 250 grid points
        6.7,
        3,  # the official first-3-channels guidance, to reproduce its numbers
        0.3,
    )
    assert tuple(s.cfg_interval) == (0.125, 1.0)
    assert (tr.path, tr.prediction, tr.t_sampling, tr.cos_loss_weight) == (
        "linear",
        "velocity",
        "lognorm",
        1.0,
    )
    assert (t.generator_lr, t.generator_betas, t.weight_decay, t.warmup_images) == (
        2e-4,
        [0.9, 0.95],
        0.0,
        0,
    )
    assert (t.grad_clip, t.generator_batch_size, t.ema_decay) == (0.0, 1024, 0.9999)
    assert t.generator_images == 1024 * 1_000_000  # 1M steps


def test_generator_betas_reach_the_optimiser():
    from latentforge.training.loop import make_optimizers

    for overrides, betas in (
        ([], (0.9, 0.99)),
        (["train.generator_betas=[0.9,0.95]"], (0.9, 0.95)),
    ):
        cfg = load_experiment(SMOKE, overrides)
        opt, _ = make_optimizers(generator_job(cfg, STATS), cfg.train)
        assert opt.param_groups[0]["betas"] == betas


def test_published_generator_loads_the_official_layout_without_extraction(tmp_path):
    """train.generator_images=0 with generator.weights (an official LightningDiT file:
    {"model", "ema", "opt"}, DDP "module." keys) and generator.latent_stats (its
    latents_stats.pt): the stage stores the EMA weights as they are, and needs no latents."""
    from safetensors.torch import save_file

    from latentforge.config import ConfigError
    from latentforge.models import build_generator, build_tokenizer, latent_shape_of, state_dict_of
    from latentforge.platform.pipeline import Pipeline

    vae = state_dict_of(build_tokenizer(load_experiment(SMOKE)))
    vae = {k: v for k, v in vae.items() if not k.startswith("linear_proj.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    stats_file = tmp_path / "latents_stats.pt"
    torch.save(
        {"mean": torch.full((1, 4, 1, 1), 0.5), "std": torch.full((1, 4, 1, 1), 2.0)}, stats_file
    )
    base = [
        f"run_dir={tmp_path / 'run'}",
        "train.tokenizer_images=0",
        f"tokenizer.weights={tmp_path / 'vae.safetensors'}",
        "train.generator_images=0",
        f"generator.latent_stats={stats_file}",
    ]
    shape = latent_shape_of(load_experiment(SMOKE, base))
    assert shape == (4, 8, 8)
    trained = state_dict_of(build_generator(load_experiment(SMOKE, base), {"latent_shape": shape}))
    ema = {k: v + 0.01 for k, v in trained.items()}
    official = {"model": trained, "ema": {f"module.{k}": v for k, v in ema.items()}, "opt": {}}
    torch.save(official, tmp_path / "official.pt")
    cfg = load_experiment(SMOKE, [*base, f"generator.weights={tmp_path / 'official.pt'}"])
    p = Pipeline(cfg, log=lambda *_: None)
    p.run(("tokenizer", "generator"))
    assert not p.is_done("extract")
    stored = load_file(str(p.stage_dir("generator") / "ema.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in ema.items())
    stats = p.stats()
    assert stats["mean"] == [0.5] * 4 and stats["std"] == [2.0] * 4
    assert stats["latent_shape"] == [4, 8, 8]
    other = load_experiment(
        SMOKE,
        [
            *base,
            "run_dir=" + str(tmp_path / "other"),
            f"generator.weights={tmp_path / 'official.pt'}",
            "generator.config=small",
        ],
    )
    with pytest.raises(ConfigError, match="not a checkpoint of this generator config"):
        Pipeline(other, log=lambda *_: None).run(("tokenizer", "generator"))


def test_wait_for_release_does_not_stall_on_other_trials_groups(monkeypatch):
    import itertools

    import latentforge.platform.train as train_mod

    live = [{"a", "ours"}, {"a", "ours"}, {"a"}]  # our group goes on the third look
    monkeypatch.setattr(
        train_mod, "_live_groups", lambda: live.pop(0) if len(live) > 1 else live[0]
    )
    monkeypatch.setattr(train_mod.time, "sleep", lambda s: None)
    train_mod.wait_for_release({"a"})
    assert live == [{"a"}]
    # two concurrent trials' groups appeared; neither goes: bounded by shared_s, not 120 s
    clock = itertools.count(0, 5)
    monkeypatch.setattr(train_mod.time, "time", lambda: next(clock))
    monkeypatch.setattr(train_mod, "_live_groups", lambda: {"a", "ours", "theirs"})
    train_mod.wait_for_release({"a"}, timeout_s=120, shared_s=15)
    assert next(clock) <= 30


def test_train_workers_ask_for_the_configured_gpu_type():
    from latentforge.platform.train import scaling

    xl = load_experiment(ROOT / "experiments/imagenet256/lightningdit_xl1_vavae_f16d32.yaml")
    assert scaling(xl) == {
        "num_workers": 8,
        "use_gpu": True,
        "resources_per_worker": {"CPU": 1.0, "GPU": 1},
        "accelerator_type": "A100",
    }
    cpu = load_experiment(SMOKE, ["ray.num_workers=2"])
    assert scaling(cpu) == {
        "num_workers": 2,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 1.0},
    }
    with pytest.raises(ConfigError, match="ray.use_gpu=true"):
        scaling(load_experiment(SMOKE, ["ray.accelerator_type=A100"]))


def test_progress_lines_say_where_training_is():
    from torch import nn

    from latentforge.progress import format_seconds
    from latentforge.training.loop import Job, progress_line

    job = Job("generator", nn.Linear(1, 1), nn.Linear(1, 1), 1000, 10, 0.1, 0.9)
    point = {"nimg": 250, "loss": 0.5, "images_per_s": 48.0}
    line = progress_line(job, point, start_nimg=0, elapsed=5.0)  # 50 img/s since the start
    assert line.startswith("[generator] 250/1000 images (25%) 48 img/s ETA 15s  loss=0.5")
    assert [format_seconds(s) for s in (3, 229, 11000)] == ["3s", "3m49s", "3h03m"]
