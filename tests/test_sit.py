"""SiT on 1-D token latents (MAETok's and SoftVQ-VAE's generator): parity with the official
code through a stored fixture, published-weights loading, the time convention, the
published SDE sampler, a training step and the dimension-dependent shift.

The fixture ``tests/fixtures/sit.safetensors`` holds a tiny official ``SiT(vae_1d=True)``
(Hhhhhhao/continuous_tokenizer ``modelling/sit.py``) with random non-zero weights (and a
second one with qk-norm), its inputs and its outputs in the official layout and convention
(tokens (B, N, C); t = 0 data, t = 1 noise; output noise - data), and the outputs of the
official ``euler_sampler`` / ``euler_maruyama_sampler`` (``modelling/samplers.py``) with
CFG 1.75 on t <= 0.7 and the SDE's per-step noise.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.config import load_experiment
from latentforge.generators.generate import sampler_options
from latentforge.generators.samplers import (
    Guided,
    SamplerOptions,
    SeedStreams,
    fixed_steps,
    sample,
    time_grid,
)
from latentforge.generators.sit import (
    CONFIGS,
    SiT,
    SiTArch,
    SiTConfig,
    build_sit,
    load_published,
    resolve_arch,
    sincos_1d,
)
from latentforge.generators.transport import Transport, TransportConfig
from latentforge.registry import GENERATORS
from latentforge.training.loop import generator_job
from latentforge.training.objectives import GeneratorObjective

FIXTURE = Path(__file__).parent / "fixtures" / "sit.safetensors"
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) official tokens <-> (B, C, N) channels first."""
    return x.transpose(1, 2).contiguous()


def fixture_model(prefix: str = ""):
    """(our model built from the fixture's kwargs, official weights, tensors, kwargs)."""
    with safe_open(str(FIXTURE), "pt") as f:
        kw = json.loads(f.metadata()["qk_kwargs" if prefix else "kwargs"])
    tensors = load_file(str(FIXTURE))
    head = f"{prefix}weight."
    weights = {k.removeprefix(head): v.float() for k, v in tensors.items() if k.startswith(head)}
    arch = SiTArch(kw["depth"], kw["hidden_size"], kw["num_heads"], kw["mlp_ratio"])
    shape = (kw["in_channels"], kw["input_size"])
    model = SiT(arch, shape, kw["num_classes"], qk_norm=kw["qk_norm"]).eval()
    return model, weights, tensors, kw


@pytest.mark.parametrize("prefix", ["", "qk."])
def test_official_weights_load_strictly_and_outputs_match(prefix):
    """Our forward on (B, C, N) at t = 1 - t_official is minus the official output,
    transposed; the official-convention network equals it directly (1e-5)."""
    model, weights, t, _ = fixture_model(prefix)
    model.load_state_dict(weights, strict=True)
    x, t_off, y = t["input.x"], t["input.t"], t["input.y"]
    with torch.no_grad():
        ours = model(tokens_first(x), 1 - t_off, y)
        raw = model.sit_forward(x, t_off, y)
    ref = t[f"{prefix}output"]
    assert ours.shape == (3, 6, 12) and raw.shape == ref.shape
    assert (ours + tokens_first(ref)).abs().max().item() <= 1e-5
    assert (raw - ref).abs().max().item() <= 1e-5
    assert ref.abs().mean() > 0.1  # the fixture exercises every layer


def test_position_table_is_the_official_interleaved_one():
    """Even dimensions sin, odd cos (not DiT's two halves), equal to the official table."""
    model, weights, _, kw = fixture_model()
    table = sincos_1d(kw["hidden_size"], kw["input_size"])
    assert torch.allclose(table, weights["pos_embed"][0], atol=1e-6)
    assert torch.equal(model.state_dict()["pos_embed"][0], table)
    assert table[3, 0] == pytest.approx(math.sin(3)) and table[3, 1] == pytest.approx(math.cos(3))
    assert set(model.state_dict()) == set(weights)


class Replay(SeedStreams):
    """The official sampler's per-step noise, in its order (for the SDE parity test)."""

    def __init__(self, noise: torch.Tensor):
        self.steps = iter(noise)

    def randn(self, shape, device, dtype):
        return tokens_first(next(self.steps)).to(device=device, dtype=dtype)


def test_official_samplers_match_with_the_published_settings():
    """The official Euler ODE and Euler-Maruyama SDE (CFG 1.75 while t_official <= 0.7, null
    label 1000 = num_classes, SDE diffusion 2 t_official, last step 0.04 without noise) equal
    ours with cfg_interval [0.3, 1], sde_diffusion 2, sde_last_step 0.04 (the SDE fed the
    official's per-step noise)."""
    model, weights, t, kw = fixture_model()
    model.load_state_dict(weights, strict=True)
    transport = Transport(TransportConfig())
    x0, y = tokens_first(t["sampler.x0"]), t["sampler.y"]
    kw_cfg = dict(cfg_scale=1.75, cfg_interval=(0.3, 1.0), null_class=kw["num_classes"])
    ode, nfe = sample(model, transport, x0, y, steps=5, method="euler", **kw_cfg)
    assert nfe == 2 + 2 + 2 + 1 + 1  # guided at t = 0.4, 0.6, 0.8 (t_official 0.6, 0.4, 0.2)
    assert (ode - tokens_first(t["ode.output"])).abs().max().item() <= 1e-4
    opts = SamplerOptions(
        steps=6, method="euler_maruyama", cfg_scale=1.75, cfg_interval=(0.3, 1.0),
        sde_diffusion=2.0, sde_last_step=0.04,
    )  # fmt: skip
    field = Guided(model, transport, y, kw["num_classes"], 1.75, (0.3, 1.0), None)
    with torch.no_grad():
        sde = fixed_steps(field, transport, x0, opts, Replay(t["sde.noise"]))
    assert (sde - tokens_first(t["sde.output"])).abs().max().item() <= 1e-4
    assert t["sde.output"].abs().mean() > 0.1


def test_sde_time_grid_with_a_last_step():
    grid = time_grid(6, 1.0, "cpu", (0.0, 1.0), last_step=0.04)
    want = torch.cat([torch.linspace(0, 0.96, 6, dtype=torch.float64), torch.ones(1).double()])
    assert torch.allclose(grid, want, atol=1e-12)
    assert torch.equal(time_grid(4, 1.0, "cpu"), torch.linspace(0, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sde_last_step"):
        time_grid(1, 1.0, "cpu", last_step=0.04)


def test_time_convention_and_velocity_sign():
    """The official network sees t_official = 1 - t and tokens (B, N, C); a network that
    predicts the official target (noise - data) gives the platform's target (data - noise)."""
    torch.manual_seed(0)
    model = build_sit(SiTConfig(config="tiny"), (6, 12), 10)
    x1, x0 = torch.randn(2, 6, 12), torch.randn(2, 6, 12)  # data, noise
    seen = {}

    def official(x, t_off, y):
        seen["t"], seen["shape"] = t_off, tuple(x.shape)
        return tokens_first(x0 - x1)  # REPA's velocity: noise - data, tokens first

    model.sit_forward = official
    t = torch.tensor([0.2, 0.9])
    out = model(0.5 * x1 + 0.5 * x0, t, torch.tensor([1, 2]))
    assert torch.allclose(seen["t"], 1 - t) and seen["shape"] == (2, 12, 6)
    assert torch.allclose(out, Transport(TransportConfig()).target(x0, x1, t))


def test_zero_output_at_init_and_time_reaches_the_output():
    torch.manual_seed(0)
    model = build_sit(SiTConfig(config="tiny"), (6, 12), 10)
    y = torch.tensor([0, 3])
    assert model(torch.randn(2, 6, 12), torch.rand(2), y).abs().max() == 0
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight)
    x = torch.randn(2, 6, 12)
    a, b = model(x, torch.full((2,), 0.3), y), model(x, torch.full((2,), 0.7), y)
    assert (a - b).abs().max() > 1e-3


def test_named_configs_registry_and_checks():
    with torch.device("meta"):
        xl = SiT(CONFIGS["SiT-XL/1"], (12, 128), 1000)
    n = sum(p.numel() for p in xl.parameters() if p.requires_grad) / 1e6
    assert n == pytest.approx(674.8, abs=0.1)  # SiT-XL: 675M (Ma et al. 2024)
    assert (CONFIGS["SiT-B/1"].depth, CONFIGS["SiT-B/1"].hidden) == (12, 768)
    assert GENERATORS.get("sit").config_cls is SiTConfig
    cfg = load_experiment(SMOKE, ["generator.name=sit", "generator.config=tiny"])
    assert isinstance(cfg.generator, SiTConfig) and not cfg.generator.qk_norm
    with pytest.raises(KeyError, match="SiT-XL/1"):
        resolve_arch(SiTConfig(config="SiT-XXL/1"))
    with pytest.raises(ValueError, match="repa_weight"):
        resolve_arch(SiTConfig(transport=TransportConfig(repa_weight=0.5)))
    with pytest.raises(ValueError, match=r"1-D token latents \(C, N\).*lightningdit"):
        build_sit(SiTConfig(config="tiny"), (4, 8, 8), 10)


def hub_folder(folder: Path, weights: dict, kw: dict) -> Path:
    """The layout of a Hugging Face SiT repo (PyTorchModelHubMixin): config.json with the
    constructor's arguments and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(kw))
    return folder


def test_published_layouts_load_and_others_fail_naming_what_differs(tmp_path):
    """A hub folder (or its model.safetensors), the official training checkpoint (its
    ``ema``, beside an argparse Namespace) and compile prefixes load; a missing file names
    the hub repo; another size names the keys and expected shapes; a config.json with other
    heads (which shape no weight) is refused; a qk-norm mismatch says so."""
    model, weights, t, kw = fixture_model()
    x, t_off, y = t["input.x"], t["input.t"], t["input.y"]
    hub = hub_folder(tmp_path / "hub", weights, kw)
    noisy = {k: v + 1 for k, v in weights.items()}
    ckpt = {"model": noisy, "ema": weights, "args": argparse.Namespace(qk_norm=False)}
    torch.save({**ckpt, "steps": 4}, tmp_path / "0400000.pt")
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, tmp_path / "compiled.pt")
    for path in (hub, hub / "model.safetensors", tmp_path / "0400000.pt", tmp_path / "compiled.pt"):
        fresh = fixture_model()[0]
        load_published(fresh, str(path))
        with torch.no_grad():
            assert (fresh.sit_forward(x, t_off, y) - t["output"]).abs().max() <= 1e-5, path
    with pytest.raises(FileNotFoundError, match="MAETok/sit-xl_maetok-b-128"):
        load_published(model, str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="none of model.safetensors"):
        load_published(model, str(tmp_path / "empty"))
    other = build_sit(SiTConfig(config="shapes"), (6, 12), 1000).state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other shapes \[\('pos_embed', \(1, 12, 192\), "
                       r"\(1, 12, 32\)\).*\(key, file, expected\)"):  # fmt: skip
        load_published(model, str(tmp_path / "other.pt"))
    hub_folder(tmp_path / "heads", weights, {**kw, "num_heads": 4})
    with pytest.raises(ValueError, match=r"config.json has num_heads 4 \(expected 2\)"):
        load_published(model, str(tmp_path / "heads"))
    qk_weights = fixture_model("qk.")[1]
    with pytest.raises(ValueError, match="unexpected.*q_norm.*generator.qk_norm is false"):
        load_published(model, str(hub_folder(tmp_path / "qk", qk_weights, kw)))


def test_platform_builds_and_loads_published_weights_through_the_registry(tmp_path):
    from latentforge.models import build_generator, load_published_generator

    _, weights, t, kw = fixture_model()
    hub = hub_folder(tmp_path / "sit-xl", weights, kw)
    overrides = ["generator.name=sit", "generator.config=tiny", f"generator.weights={hub}"]
    cfg = load_experiment(SMOKE, [*overrides, f"data.num_classes={kw['num_classes']}"])
    model = build_generator(cfg, {"latent_shape": [kw["in_channels"], kw["input_size"]]})
    load_published_generator(model.eval(), cfg)
    with torch.no_grad():
        out = model(tokens_first(t["input.x"]), 1 - t["input.t"], t["input.y"])
    assert (out + tokens_first(t["output"])).abs().max().item() <= 1e-5


def test_training_steps_on_token_latents_lower_the_loss():
    """The platform's objective trains SiT on (B, C, N) latents through the transport:
    every trainable parameter gets a gradient and the loss falls on a fixed batch."""
    torch.manual_seed(0)
    model = build_sit(SiTConfig(config="tiny"), (6, 12), 10)
    transport = Transport(TransportConfig(cos_loss_weight=0.0))
    objective = GeneratorObjective(model, transport, torch.zeros(1, 6, 1), torch.ones(1, 6, 1))
    batch = {"latent": torch.randn(16, 6, 12) * 2 + 1, "label": torch.arange(16) % 10}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        loss = objective(batch, 0, generator=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 3:
            silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not silent
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not model.pos_embed.requires_grad  # the fixed table


def test_sde_sampling_with_the_published_settings_from_the_config():
    """``sample:`` carries the published SDE (250 steps in the experiment file; 8 here),
    guidance 1.75 on [0.3, 1], diffusion 2 sigma and the 0.04 last step; the result does not
    depend on the batch split (per-sample seeds)."""
    keys = ["sampler=euler_maruyama", "steps=8", "cfg_scale=1.75", "cfg_interval=[0.3,1.0]"]
    keys += ["sde_diffusion=2.0", "sde_last_step=0.04"]
    overrides = ["generator.name=sit", "generator.config=tiny", "data.num_classes=10"]
    cfg = load_experiment(SMOKE, overrides + [f"sample.{k}" for k in keys])
    options = sampler_options(cfg, (6, 12), log=lambda _: None)
    assert (options["sde_diffusion"], options["sde_last_step"]) == (2.0, 0.04)
    torch.manual_seed(0)
    model = build_sit(cfg.generator, (6, 12), 10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.requires_grad else None
    noise, y = torch.randn(4, 6, 12), torch.tensor([1, 2, 3, 4])
    whole, nfe = sample(model, noise=noise, y=y, noise_seeds=[0, 1, 2, 3], **options)
    split = [sample(model, noise=noise[i : i + 2], y=y[i : i + 2], noise_seeds=[i, i + 1],
                    **options)[0] for i in (0, 2)]  # fmt: skip
    # our t = 0, .137, .274, .411, .549, .686, .823, .96: guided from 0.411 on
    assert nfe == 3 + 2 * 5 and torch.isfinite(whole).all()
    assert torch.allclose(whole, torch.cat(split), atol=1e-5)
    plain, _ = sample(model, noise=noise, y=y, noise_seeds=[0, 1, 2, 3], **{**options,
                      "sde_diffusion": 1.0})  # fmt: skip
    assert (plain - whole).abs().max() > 1e-3


def test_auto_shift_for_token_latents():
    """``train_shift: auto`` resolves from C * N numbers (RAE's sqrt(D / 4096), as our
    1 / s): 12 x 128 latents (1536 numbers) train with a shift of sqrt(4096 / 1536)."""
    cfg = load_experiment(
        SMOKE,
        ["generator.name=sit", "generator.config=tiny", "generator.transport.train_shift=auto"],
    )
    stats = {"latent_shape": [12, 128], "mean": [0.0] * 12, "std": [1.0] * 12}
    job = generator_job(cfg, stats)
    assert job.objective.transport.train_shift == pytest.approx(math.sqrt(4096 / 1536))
    assert "train_shift auto -> 1.6330 for latents (12, 128)" in job.notes[0]
    loss = job.objective({"latent": torch.randn(4, 12, 128), "label": torch.arange(4)}, 0)
    assert torch.isfinite(loss["loss"])


def test_generator_step_benchmark_times_sit(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generator_step.py"), "--family", "sit"]
    cmd += ["--config", "tiny", "--latent", "6,12", "--batch", "2", "--repeats", "1"]
    subprocess.run([*cmd, "--threads", "1", "--out", str(out)], check=True, timeout=300)
    result = json.loads(out.read_text())
    assert (result["family"], result["config"], result["latent"]) == ("sit", "tiny", [6, 12])
    assert result["rows"][0]["flops_per_step"] > 0


def test_imagenet_file_dry_runs_with_the_published_sampler(tmp_path, capsys):
    """experiments/imagenet256/sit_xl1_maetok_b128.yaml: SiT-XL/1 on the published MAETok
    tokens; the CLI dry run plans every stage once its files exist (and with the published
    SiT instead of training), and names the hub repo of a missing SiT file."""
    from latentforge.cli import main
    from latentforge.models import read_latent_stats

    path = ROOT / "experiments" / "imagenet256" / "sit_xl1_maetok_b128.yaml"
    (tmp_path / "data" / "n01").mkdir(parents=True)
    (tmp_path / "model.safetensors").touch()
    (tmp_path / "sit.safetensors").touch()
    (tmp_path / "config.json").write_text(json.dumps({"vq_mean": 0.25, "vq_std": 2.0}))
    files = [
        f"run_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        f"tokenizer.weights={tmp_path / 'model.safetensors'}",
        f"generator.latent_stats={tmp_path / 'config.json'}",
    ]
    published = [*files, "train.generator_images=0"]
    for extra in ([], [f"generator.weights={tmp_path / 'sit.safetensors'}"]):
        assert main(["run", str(path), *(published + extra if extra else files), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert all(f"{stage} " in out for stage in ("generator", "sample", "evaluate"))
    absent = f"generator.weights={tmp_path / 'absent.safetensors'}"
    assert main(["run", str(path), *published, absent, "--dry-run"]) == 2
    assert "MAETok/sit-xl_maetok-b-128" in capsys.readouterr().err
    cfg = load_experiment(path, files)
    sc = cfg.sample
    assert (cfg.generator.config, cfg.generator.transport.cos_loss_weight) == ("SiT-XL/1", 0.0)
    assert (sc.sampler, sc.steps, sc.sde_diffusion, sc.sde_last_step) == (
        "euler_maruyama", 250, 2.0, 0.04
    )  # fmt: skip
    assert (sc.cfg_scale, sc.cfg_interval) == (1.75, [0.3, 1.0])
    stats = read_latent_stats(tmp_path / "config.json", (12, 128))  # the scalar vq_mean / vq_std
    assert stats == {"mean": [0.25] * 12, "std": [2.0] * 12}


def test_sde_keys_enter_the_sample_hash_only_when_set():
    """The SDE's new keys at their defaults keep earlier sample hashes valid; set, they
    change the sample stage (and what follows it), not the generator."""
    from latentforge.platform.pipeline import stage_hashes

    base = stage_hashes(load_experiment(SMOKE))
    assert stage_hashes(load_experiment(SMOKE, ["sample.sde_diffusion=1.0"])) == base
    for key in ("sample.sde_diffusion=2.0", "sample.sde_last_step=0.04"):
        new = stage_hashes(load_experiment(SMOKE, [key]))
        assert new["generator"] == base["generator"] and new["sample"] != base["sample"], key
