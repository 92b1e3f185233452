"""DiT^DH (RAE's wide-head DiT): parity with the official code through a stored fixture,
published-weights loading, the time convention, guidance and a training step.

The fixture ``tests/fixtures/ditdh.safetensors`` holds a tiny official ``DiTwDDTHead``
(bytetriper/RAE ``src/stage2/models/DDT.py``) with random non-zero weights, its inputs and
its outputs in RAE's convention (t = 0 data, t = 1 noise, output noise - data).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from latentforge.config import ConfigError, load_experiment, to_dict
from latentforge.generators.ditdh import (
    CONFIGS,
    DiTDH,
    DiTDHArch,
    DiTDHConfig,
    build_ditdh,
    load_published,
    resolve_arch,
)
from latentforge.generators.generate import sample_images
from latentforge.generators.samplers import Guided, sample, time_grid
from latentforge.generators.transport import Transport, TransportConfig, resolve_shift, shift_t
from latentforge.registry import GENERATORS
from latentforge.training.loop import generator_job
from latentforge.training.objectives import GeneratorObjective

FIXTURE = Path(__file__).parent / "fixtures" / "ditdh.safetensors"
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def fixture_model():
    """(our model built from the fixture's kwargs, official weights, tensors, kwargs)."""
    with safe_open(str(FIXTURE), "pt") as f:
        kw = json.loads(f.metadata()["kwargs"])
    tensors = load_file(str(FIXTURE))
    weights = {
        k.removeprefix("weight."): v.float() for k, v in tensors.items() if k.startswith("weight.")
    }
    arch = DiTDHArch(
        depth=tuple(kw["depth"]),
        hidden=tuple(kw["hidden_size"]),
        heads=tuple(kw["num_heads"]),
        patch=kw["patch_size"],
        mlp_ratio=kw["mlp_ratio"],
    )
    s = kw["input_size"]
    model = DiTDH(arch, (kw["in_channels"], s, s), kw["num_classes"]).eval()
    return model, weights, tensors, kw


def test_official_weights_load_strictly_and_outputs_match():
    """Our forward (t = 1 data, velocity data - noise) at 1 - t equals minus the official
    output; the raw network equals it directly."""
    model, weights, t, _ = fixture_model()
    model.load_state_dict(weights, strict=True)
    x, t_rae, y = t["input.x"], t["input.t"], t["input.y"]
    with torch.no_grad():
        ours = model(x, 1 - t_rae, y)
        raw = model.rae_forward(x, t_rae, y)
    assert ours.shape == t["output"].shape
    assert (ours + t["output"]).abs().max().item() <= 1e-5
    assert (raw - t["output"]).abs().max().item() <= 1e-5
    assert t["output"].abs().mean() > 0.1  # the fixture exercises every layer


def test_fixed_tables_equal_the_official_ones():
    """pos_embed (trunk only) and both RoPE tables as our model builds them equal the
    official ones (stored as fp16: equal to fp16 precision)."""
    model, weights, _, _ = fixture_model()
    ours = model.state_dict()
    for key in ("pos_embed", "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin"):
        assert torch.allclose(ours[key], weights[key], atol=1e-3), key
    for key in ("dec_feat_rope.freqs_cos", "dec_feat_rope.freqs_sin"):
        assert torch.allclose(ours[key], weights[key], atol=1e-3), key
    assert set(ours) == set(weights)


def test_guidance_matches_official_cfg():
    """The platform's guidance (all channels, null class = num_classes) at our t = 1 - 0.6
    gives minus the official ``forward_with_cfg`` at RAE's t = 0.6 (to 1e-5 per unit of
    the factor 2 s - 1 by which guidance amplifies the network's rounding)."""
    model, weights, t, kw = fixture_model()
    model.load_state_dict(weights, strict=True)
    transport = Transport(TransportConfig(prediction="velocity"))
    scale = float(t["cfg.scale"])
    field = Guided(model, transport, t["cfg.y"], kw["num_classes"], scale, (0.0, 1.0), None)
    with torch.no_grad():
        ours = field(t["input.x"], 1 - float(t["cfg.t"]))
    assert (ours + t["output.cfg"]).abs().max().item() <= 1e-5 * (2 * scale - 1)


def test_every_named_config_builds_and_xl_has_the_published_size():
    for name, arch in CONFIGS.items():
        with torch.device("meta"):
            model = DiTDH(arch, (768, 16, 16), 1000)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        if name == "DiTDH-XL":
            assert n == pytest.approx(839, abs=0.5)  # RAE: DiT^DH-XL, 839M
    assert CONFIGS["DiTDH-XL"] == DiTDHArch(depth=(28, 2), hidden=(1152, 2048), heads=(16, 16))
    assert CONFIGS["DiTDH-S"].hidden == (384, 2048) and CONFIGS["DiTDH-S"].depth == (12, 2)


def test_zero_output_at_init_non_square_and_1d_latents():
    torch.manual_seed(0)
    y = torch.tensor([0, 3])
    for shape in ((8, 4, 6), (8, 12)):
        model = build_ditdh(DiTDHConfig(config="tiny"), shape, 10)
        out = model(torch.randn(2, *shape), torch.rand(2), y)
        assert out.shape == (2, *shape) and out.abs().max() == 0
        torch.nn.init.normal_(model.final_layer.linear.weight)  # now the head matters
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
        x = torch.randn(2, *shape)
        a = model(x, torch.full((2,), 0.3), y)
        b = model(x, torch.full((2,), 0.7), y)
        assert (a - b).abs().max() > 1e-3  # time reaches the output


def test_registry_and_experiment_config():
    assert GENERATORS.get("ditdh").config_cls is DiTDHConfig
    cfg = load_experiment(SMOKE, ["generator.name=ditdh", "generator.config=tiny"])
    assert isinstance(cfg.generator, DiTDHConfig) and cfg.generator.config == "tiny"
    with pytest.raises(KeyError, match="DiTDH-XL"):
        resolve_arch(DiTDHConfig(config="DiTDH-XXL"))
    with pytest.raises(ValueError, match="repa_weight"):
        resolve_arch(DiTDHConfig(transport=TransportConfig(repa_weight=0.5)))


def test_published_checkpoint_layouts_and_errors(tmp_path):
    """A bare state_dict, a training checkpoint (its ``ema`` is loaded, as RAE's sampler
    does) and DDP / compile prefixes load; a missing file names the hub file; another size
    names the mismatched keys and the expected shapes."""
    model, weights, t, _ = fixture_model()
    x, t_rae, y = t["input.x"], t["input.t"], t["input.y"]
    torch.save(weights, tmp_path / "bare.pt")
    noisy = {k: v + 1 for k, v in weights.items()}
    torch.save({"model": noisy, "ema": weights, "step": 3}, tmp_path / "train.pt")
    torch.save({f"module._orig_mod.{k}": v for k, v in weights.items()}, tmp_path / "ddp.pt")
    for name in ("bare.pt", "train.pt", "ddp.pt"):
        fresh = fixture_model()[0]
        load_published(fresh, str(tmp_path / name))
        with torch.no_grad():
            assert (fresh.rae_forward(x, t_rae, y) - t["output"]).abs().max() <= 1e-5, name
    with pytest.raises(FileNotFoundError, match="nyu-visionx/RAE-collections.*stage2_model.pt"):
        load_published(model, str(tmp_path / "absent.pt"))
    torch.save({"model": weights, "step": 3}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="without 'ema'"):
        load_published(model, str(tmp_path / "no_ema.pt"))
    other = build_ditdh(DiTDHConfig(config="shapes"), (8, 4, 4), 10).state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other shapes \[\('pos_embed', \(1, 16, 192\), "
                       r"\(1, 16, 32\)\).*\(key, file, expected\)"):  # fmt: skip
        load_published(model, str(tmp_path / "other.pt"))


def test_platform_builds_and_loads_published_weights_through_the_registry(tmp_path):
    """``generator.name: ditdh`` with ``generator.weights``: the platform's builder and
    published-weights loader (models.py) reach this family."""
    from latentforge.models import build_generator, load_published_generator

    _, weights, t, kw = fixture_model()
    torch.save({"ema": weights}, tmp_path / "stage2_model.pt")
    overrides = ["generator.name=ditdh", "generator.config=tiny"]
    overrides += [f"generator.weights={tmp_path / 'stage2_model.pt'}"]
    overrides += [f"data.num_classes={kw['num_classes']}"]
    cfg = load_experiment(SMOKE, overrides)
    s = kw["input_size"]
    model = build_generator(cfg, {"latent_shape": [kw["in_channels"], s, s]}).eval()
    load_published_generator(model, cfg)
    with torch.no_grad():
        out = model(t["input.x"], 1 - t["input.t"], t["input.y"])
    assert (out + t["output"]).abs().max().item() <= 1e-5


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_ditdh(DiTDHConfig(config="tiny", grad_checkpointing=flag), (8, 4, 4), 10)
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
        model(x, torch.tensor([0.2, 0.7]), torch.tensor([1, 2])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_steps_lower_the_loss_through_the_objective():
    """The platform's objective (normalised latents, transport loss) trains DiT^DH: every
    trainable parameter gets a gradient and the loss falls on a fixed batch."""
    torch.manual_seed(0)
    model = build_ditdh(DiTDHConfig(config="tiny"), (8, 4, 4), 10)
    transport = Transport(TransportConfig(cos_loss_weight=0.0))
    objective = GeneratorObjective(model, transport, torch.zeros(1, 8, 1, 1), torch.ones(1))
    batch = {"latent": torch.randn(16, 8, 4, 4) * 2 + 1, "label": torch.arange(16) % 10}
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
    assert "W" not in dict(model.t_embedder.named_parameters())  # frozen frequencies


def test_sampling_with_guidance():
    """The platform's sampler runs DiT^DH; guidance costs one more pass per step."""
    torch.manual_seed(0)
    model = build_ditdh(DiTDHConfig(config="tiny"), (8, 4, 4), 10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.requires_grad else None
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight)
    tr = Transport(TransportConfig())
    noise, y = torch.randn(3, 8, 4, 4), torch.tensor([1, 2, 3])
    kw = dict(steps=4, null_class=10)
    a, nfe = sample(model, tr, noise, y, cfg_scale=1.0, **kw)
    b, nfe_guided = sample(model, tr, noise, y, cfg_scale=3.0, **kw)
    assert (nfe, nfe_guided) == (4, 8)
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-4


# ------------------------------------------------------------ dimension-dependent shift


def rae_shift(t: torch.Tensor, s: float) -> torch.Tensor:
    """RAE's shift in its own convention (t = 1 noise): s t / (1 + (s - 1) t)."""
    return s * t / (1 + (s - 1) * t)


def test_auto_shift_is_raes_formula_in_our_convention():
    """RAE: s = sqrt(C H W / 4096) (sqrt(768 * 256 / 4096) = 6.93 for DINOv2-B); ours is
    1 / s, and 1-D tokens count C * N numbers."""
    s = math.sqrt(768 * 16 * 16 / 4096)
    assert s == pytest.approx(6.9282, abs=1e-4)
    assert resolve_shift("auto", (768, 16, 16)) == pytest.approx(1 / s)
    assert resolve_shift("auto", (32, 128)) == pytest.approx(1.0)  # 4096 numbers
    # a 32 x 32 grid of 768 channels: s = sqrt(786432 / 4096) = 13.86
    assert resolve_shift("auto", (768, 32, 32)) == pytest.approx(1 / math.sqrt(768 * 1024 / 4096))
    assert resolve_shift(0.3, None) == 0.3 and resolve_shift(2, None) == 2.0
    with pytest.raises(ValueError, match="latent shape"):
        Transport(TransportConfig(train_shift="auto"))


def test_auto_shifted_grids_equal_raes_after_the_convention_change():
    """RAE's Euler grid (t_rae = 1 - linspace(0, 0.999, 50), shifted by s; t = 1 noise) is
    1 - ours on the same base points; our sampler's grid (to t = 1 exactly) equals RAE's
    formula on linspace(0, 1); training times of the same uniforms agree too."""
    shape = (768, 16, 16)
    s, ours = math.sqrt(768 * 256 / 4096), resolve_shift("auto", shape)
    base = torch.linspace(0, 0.999, 50, dtype=torch.float64)
    assert torch.allclose(shift_t(base, ours), 1 - rae_shift(1 - base, s), atol=1e-12)
    grid = time_grid(49, ours, "cpu")
    full = 1 - rae_shift(1 - torch.linspace(0, 1, 50, dtype=torch.float64), s)
    assert torch.allclose(grid, full, atol=1e-12)
    assert grid[25] < 0.2  # most steps near noise (t = 0 here), as s > 1 does in RAE
    tr = Transport(TransportConfig(t_sampling="uniform", train_shift="auto"), shape)
    t = tr.sample_t(1000, "cpu", torch.Generator().manual_seed(0)).double()
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0)).double()
    assert torch.allclose(t, 1 - rae_shift(1 - u, s), atol=1e-6)


def test_auto_shift_in_the_config_is_resolved_not_written_back():
    """``auto`` loads into both keys, stays ``auto`` in the config, is resolved from the
    latent shape by the training job (and logged) and by sampling; a wrong word is refused."""
    cfg = load_experiment(
        SMOKE,
        ["generator.transport.train_shift=auto", "sample.timestep_shift=auto", "sample.steps=3"],
    )
    assert cfg.generator.transport.train_shift == "auto" and cfg.sample.timestep_shift == "auto"
    assert to_dict(cfg)["sample"]["timestep_shift"] == "auto"
    stats = {"latent_shape": [8, 8, 8], "mean": [0.0] * 8, "std": [1.0] * 8}
    job = generator_job(cfg, stats)
    assert job.objective.transport.train_shift == pytest.approx(1 / math.sqrt(0.125))
    assert job.notes and "train_shift auto -> 2.8284" in job.notes[0]
    assert load_experiment(SMOKE, ["sample.timestep_shift=2"]).sample.timestep_shift == 2
    with pytest.raises(ConfigError, match="timestep_shift"):
        load_experiment(SMOKE, ["sample.timestep_shift=fast"])


def test_auto_sampling_shift_reaches_the_sampler():
    """sample.timestep_shift=auto: the sampler evaluates the grid shifted by 1 / sqrt(D / 4096)
    and says what it resolved to."""
    cfg = load_experiment(SMOKE, ["sample.timestep_shift=auto", "sample.steps=3",
                                  "sample.cfg_scale=1.0"])  # fmt: skip
    times, lines = [], []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y):
            times.append(t[0].item())
            return torch.zeros_like(x)

    class Decoder:
        def decode(self, z):
            return torch.zeros(z.shape[0], 3, 32, 32)

    stats = {"latent_shape": [64, 16, 16], "mean": [0.0] * 64, "std": [1.0] * 64}  # D = 16384
    sample_images(cfg, Spy(), Decoder(), stats, np.arange(16), np.arange(16) % 10, lines.append)
    assert times == pytest.approx([shift_t(torch.tensor(u), 0.5).item() for u in (0, 1 / 3, 2 / 3)])
    assert any("timestep_shift auto -> 0.5000" in line for line in lines)


def test_rae_imagenet_file_dry_runs_with_autoguidance(tmp_path, capsys):
    """experiments/imagenet256/rae_ditdh_xl_dinov2_b.yaml: DiT^DH-XL on the published RAE
    latents, RAE's shift and autoguidance by DiT^DH-S; the CLI dry run plans every stage
    once its files exist, and names what is missing otherwise."""
    from latentforge.cli import main
    from latentforge.config import load_experiment
    from latentforge.models import guide_config

    path = ROOT / "experiments" / "imagenet256" / "rae_ditdh_xl_dinov2_b.yaml"
    (tmp_path / "data" / "n01").mkdir(parents=True)
    for name in ("model.pt", "stat.pt", "guide.pt"):
        (tmp_path / name).touch()
    files = [
        f"run_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        f"tokenizer.weights={tmp_path / 'model.pt'}",
        f"generator.latent_stats={tmp_path / 'stat.pt'}",
        f"sample.guide_weights={tmp_path / 'guide.pt'}",
    ]
    assert main(["run", str(path), *files, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{stage} " in out for stage in ("extract", "generator", "sample", "evaluate"))
    assert main(["run", str(path), *files[:4], "--dry-run"]) == 2
    assert "sample.guide_weights" in capsys.readouterr().err
    cfg = load_experiment(path, files)
    assert (cfg.generator.config, guide_config(cfg).generator.config) == ("DiTDH-XL", "DiTDH-S")
    assert cfg.generator.transport.train_shift == cfg.sample.timestep_shift == "auto"
    assert (cfg.sample.cfg_scale, cfg.sample.steps) == (1.42, 50)
