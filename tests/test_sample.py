"""Sampling in a worker (platform/sample.py), without Ray."""

import numpy as np
import pytest
import torch

import latentforge.platform.sample as sample_mod
from latentforge.config import load_experiment
from latentforge.platform.train import build_generator, build_tokenizer
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
