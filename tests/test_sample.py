"""Class-conditional generation (generators/generate.py) and the sample grid, without Ray."""

import numpy as np
import pytest
import torch

import latentforge.generators.generate as sample_mod
from latentforge.config import load_experiment
from latentforge.images import grid_rows
from latentforge.models import build_generator, build_tokenizer
from tests.test_config import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"
STATS = {"latent_shape": [4, 8, 8], "mean": [0.1] * 4, "std": [2.0] * 4}


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
def test_sampling_runs_on_the_models_device(monkeypatch):
    # ray.use_gpu puts both models on CUDA; the meta device stands in for it here: every
    # tensor the sampler makes (noise, labels, latent statistics) must follow the models,
    # and a CPU one meeting them raises, as it does on a GPU
    cfg = load_experiment(SMOKE, ["sample.sampler=euler_maruyama"])
    with torch.device("meta"):
        generator, tokenizer = build_generator(cfg, STATS), build_tokenizer(cfg)
    seen = []

    def to_uint8(images):
        seen.append(images.device.type)
        return np.zeros((images.shape[0], *images.shape[2:], 3), np.uint8)

    monkeypatch.setattr(sample_mod, "to_uint8", to_uint8)
    seeds, labels = np.arange(20), np.arange(20) % 10
    out = sample_mod.sample_images(
        cfg, generator, tokenizer, STATS, seeds, labels, log=lambda *_: None
    )
    assert seen == ["meta", "meta"] and out.shape == (20, 32, 32, 3)


# per-channel statistics, none of them 0 / 1, so that a missing or swapped term shows
STATS_NORMALISED = {
    "latent_shape": [4, 8, 8],
    "mean": [0.5, -1.0, 0.25, 2.0],
    "std": [2.0, 0.5, 1.0, 3.0],
}


class DecodeSpy(torch.nn.Module):
    """A tokenizer that records what it is asked to decode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def decode(self, z):
        self.seen.append(z.clone())
        return torch.zeros(z.shape[0], 3, 32, 32)


def test_samples_are_decoded_at_the_data_scale_of_the_latents():
    """Sampling runs in normalised latent space; the tokenizer decodes z * std + mean (per
    channel). A freshly built LightningDiT predicts zero velocity (zero-initialised output
    layer), so its sample is the initial noise of each sample's seed
    sample.seed * 1_000_000 + i (module docstring), drawn here with torch's generator."""
    cfg = load_experiment(SMOKE, ["sample.seed=3", "sample.cfg_scale=4.0"])
    generator = build_generator(cfg, STATS_NORMALISED).eval()
    tokenizer = DecodeSpy()
    n = 20
    seeds = sample_mod.sample_seeds(cfg, n)
    assert seeds.tolist() == [3_000_000 + i for i in range(n)]
    sample_mod.sample_images(
        cfg, generator, tokenizer, STATS_NORMALISED, seeds, np.arange(n) % 10, log=lambda *_: None
    )
    noise = torch.stack(
        [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    mean = torch.tensor(STATS_NORMALISED["mean"]).view(1, 4, 1, 1)
    std = torch.tensor(STATS_NORMALISED["std"]).view(1, 4, 1, 1)
    decoded = torch.cat(tokenizer.seen)
    assert torch.allclose(decoded, noise * std + mean, atol=1e-6)


class TimeSpyGenerator(torch.nn.Module):
    """Zero velocity; records the time of every evaluation."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # sets the device
        self.times = []

    def forward(self, x, t, y):
        self.times.append(t[0].item())
        return torch.zeros_like(x)


def test_sample_timestep_shift_reaches_the_sampler():
    """sample.timestep_shift s: the sampler evaluates the model on the shifted grid
    t = s u / (1 + (s - 1) u), u = 0, 1/3, 2/3 for 3 Euler steps (LightningDiT's shift)."""
    cfg = load_experiment(
        SMOKE, ["sample.timestep_shift=0.3", "sample.steps=3", "sample.cfg_scale=1.0"]
    )
    spy = TimeSpyGenerator()
    sample_mod.sample_images(
        cfg, spy, DecodeSpy(), STATS, np.arange(16), np.arange(16) % 10, log=lambda *_: None
    )
    expected = [0.3 * u / (1 - 0.7 * u) for u in (0, 1 / 3, 2 / 3)]
    assert spy.times == pytest.approx(expected, abs=1e-7)


def test_grid_rows_show_every_class_or_a_spread_of_them():
    from latentforge.generators.samplers import balanced_labels

    demo = grid_rows(balanced_labels(1000, 10).numpy(), 100, 10)
    assert [len(r) for r in demo] == [10] * 10  # every class, one row each
    labels = balanced_labels(2000, 1000).numpy()
    rows = grid_rows(labels, 100, 1000)  # ImageNet: not 1000 rows of one image
    assert [len(r) for r in rows] == [2] * 10  # 2 samples per class exist here
    shown = [int(labels[r[0]]) for r in rows]
    assert shown[0] == 0 and shown[-1] == 999 and shown == sorted(set(shown))
    assert all(labels[i] == labels[r[0]] for r in rows for i in r)
    smoke = grid_rows(balanced_labels(40, 4).numpy(), 20, 4)
    assert [len(r) for r in smoke] == [5, 5, 5, 5]


def test_tokenizer_calls_are_bounded_in_pixels():
    assert sample_mod.tokenizer_batch(32, 256) == 256  # the demo: one call per chunk
    assert sample_mod.tokenizer_batch(256, 256) == 16
    assert sample_mod.tokenizer_batch(512, 256) == 4
    assert sample_mod.tokenizer_batch(4096, 8) == 1


def test_cuda_sampling_uses_tf32_as_the_official_inference():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        sample_mod.official_precision("cpu")
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        sample_mod.official_precision("cuda")
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
