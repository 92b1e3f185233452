"""The benchmark scripts run and write their JSON (tiny settings; no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stands in for a checkout of the official repository: same constructor keywords, our module.
FAKE_OFFICIAL = """
from latentforge.generators.lightningdit import DiTArch, LightningDiT as _Ours


def LightningDiT(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 num_classes, learn_sigma, **flags):
    arch = DiTArch(depth=depth, hidden=hidden_size, heads=num_heads, patch=patch_size,
                   learn_sigma=learn_sigma, **flags)
    return _Ours(arch, (in_channels, input_size, input_size), num_classes)
"""


def test_generator_step_benchmark(tmp_path):
    repo = tmp_path / "official"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "__init__.py").write_text("")
    (repo / "models" / "lightningdit.py").write_text(FAKE_OFFICIAL)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generator_step.py"), "--config", "tiny"]
    cmd += ["--latent", "4,8,8", "--batch", "2", "--repeats", "1", "--threads", "1"]
    cmd += ["--official", str(repo), "--out", str(out), "--peak-tflops", "0.5"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert [r["implementation"] for r in result["rows"]] == ["latentforge", "official"]
    for r in result["rows"]:
        assert r["step_s"] > 0 and r["flops_per_step"] > 0
        assert 0 < r["dense_share"] <= 1 and r["speedup_bound_same_kernels"] >= 1
        tflops = r["flops_per_step"] / r["step_s"] / 1e12
        assert r["mfu"] == pytest.approx(tflops / 0.5)
        assert r["speedup_bound_at_peak"] == pytest.approx(0.5 / tflops)
        assert r["dense_tflops"] == pytest.approx(tflops / r["dense_share"])
        assert r["dense_fraction_of_peak"] == pytest.approx(r["dense_tflops"] / 0.5)
    # both rows run the same architecture, so they count the same FLOPs
    assert result["rows"][0]["flops_per_step"] == result["rows"][1]["flops_per_step"]
    assert result["speedup_vs_official"] > 0


# Stands in for hustvl/LightningDiT's tokenizer/autoencoder.py: its constructors, our modules.
FAKE_OFFICIAL_VAE = """
import torch
from latentforge.tokenizers import ldm_blocks, vavae


def _arch(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, **_):
    levels = tuple(i for i in range(len(ch_mult)) if resolution // 2**i in attn_resolutions)
    return vavae.AEArch(ch, tuple(ch_mult), num_res_blocks, levels, z_channels)


def Encoder(**kw):
    return ldm_blocks.ConvEncoder(_arch(**kw))


def Decoder(**kw):
    return ldm_blocks.ConvDecoder(_arch(**kw))


class Posterior:
    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def sample(self):
        return self.mean + torch.randn_like(self.mean) * (0.5 * self.logvar).exp()


class AutoencoderKL(vavae.VAVAE):
    def __init__(self, embed_dim, ch_mult):
        arch = vavae.AEArch(8, tuple(ch_mult), 1, (), embed_dim)  # replaced by the caller
        super().__init__(arch, vavae.VAVAEConfig(vfm=None))

    def encode(self, x):
        return Posterior(*self.moments(x))
"""


def test_tokenizer_step_benchmark(tmp_path):
    repo = tmp_path / "official"
    (repo / "tokenizer").mkdir(parents=True)
    (repo / "tokenizer" / "__init__.py").write_text("")
    (repo / "tokenizer" / "autoencoder.py").write_text(FAKE_OFFICIAL_VAE)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tokenizer_step.py"), "--config", "f16d32"]
    cmd += ["--resolution", "32", "--batch", "1", "--repeats", "1", "--threads", "1"]
    cmd += ["--official", str(repo), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    rows = [(r["implementation"], r["call"]) for r in result["rows"]]
    assert rows == [(i, c) for i in ("latentforge", "official") for c in ("encode", "decode")]
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in result["rows"])
    assert set(result["speedup_vs_official"]) == {"encode", "decode"}


def test_tokenizer_step_benchmark_siglipvae(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tokenizer_step.py"), "--family"]
    cmd += ["siglipvae", "--config", "tiny", "--resolution", "32", "--batch", "1"]
    cmd += ["--repeats", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["implementation"], r["call"]) for r in rows] == [
        ("latentforge", "encode"),
        ("latentforge", "decode"),
    ]
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in rows)


def test_fd_benchmark_agrees_with_scipy(tmp_path):
    out = tmp_path / "fd.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fd.py"), "--dim", "32", "--n", "20", "200"]
    subprocess.run([*cmd, "--repeats", "1", "--out", str(out)], check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [20, 200]
    assert all(r["relative_difference"] < 1e-6 and r["ours_s"] > 0 for r in rows)


def test_sweep_efficiency_summary():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep_efficiency import summarize

    def row(point, fd, images, stopped=False):
        return {"point": point, "metrics": {"fd": fd, "generator_images": images},
                "stopped_early": stopped}  # fmt: skip

    fifo = {"rows": [row("a", 3.0, 400), row("b", 1.0, 400)], "seconds": 10.0, "budget": 400}
    asha = {"rows": [row("a", 5.0, 100, True), row("b", 1.2, 400)], "seconds": 6.0, "budget": 400}
    out = summarize(fifo, asha, "fd", "min")
    assert out["generator_compute_ratio"] == 500 / 800 and out["same_best"]
    assert out["asha_stopped_early"] == 1 and out["fifo_best"] == "b"


def test_extract_benchmark(tmp_path):
    out = tmp_path / "extract.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "extract.py"), "--tokenizer", "tiny"]
    cmd += ["--images", "64", "--batch", "16", "--shard-rows", "32", "--out", str(out)]
    cmd += ["--sources", "memory"]  # the pipeline tests extract from the shapes source
    cmd += ["--no-warmup"]  # a check of the script, not a measurement
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["encoder"]["images_per_s"] > 0
    assert list(result["ray_extraction"]) == ["memory"]
    runs = result["ray_extraction"]["memory"]
    assert runs["full"]["images"] == 64 and runs["full"]["shards"] == 2
    assert runs["small"]["images"] == 8 and "overhead_marginal" in runs


def test_tokenizer_memory_benchmark(tmp_path):
    """A frozen-encoder family's training in-process: peak memory, parameter bytes, and the
    EMA copy sharing the frozen networks (one copy per process)."""
    out = tmp_path / "mem.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tokenizer_memory.py")]
    cmd += [str(ROOT / "experiments" / "shapes" / "svg.yaml")]
    cmd += ["tokenizer.perceptual=vfm", "tokenizer.disc_weight=0.5"]  # SVG's published terms
    cmd += ["--images", "16", "--batch", "8"]
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["tokenizer"] == "svg shapes" and result["ema_shares_frozen"] is True
    assert result["frozen_networks"] == ["perceptual", "vfm"]
    assert result["frozen_mib_with_ema"] == result["frozen_mib"] > 0
    assert result["peak_rss_mib"] >= result["rss_after_build_mib"] > result["rss_after_imports_mib"]
    assert result["trainable_mib"] > 0 and result["discriminator_mib"] > 0


def test_vf_linear_probe_benchmark(tmp_path):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vf_linear_probe.py"), "--images", "64"]
    cmd += ["--probe-images", "60", "--holdout", "30", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["vf_weight"] for r in rows] == [0.1, 0.0]
    assert all(0.0 <= r["linear_probe_accuracy"] <= 1.0 and r["psnr_db"] > 0 for r in rows)


# Stands in for a checkout of bytetriper/RAE: DiTwDDTHead's constructor keywords, our module.
FAKE_RAE = """
from latentforge.generators.ditdh import DiTDH, DiTDHArch


def DiTwDDTHead(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                num_classes, **_):
    arch = DiTDHArch(depth=tuple(depth), hidden=tuple(hidden_size), heads=tuple(num_heads),
                     patch=patch_size, mlp_ratio=mlp_ratio)
    return DiTDH(arch, (in_channels, input_size, input_size), num_classes)
"""


def test_generator_step_benchmark_ditdh(tmp_path):
    models = tmp_path / "official" / "src" / "stage2" / "models"
    models.mkdir(parents=True)
    (models.parent / "__init__.py").write_text("")
    (models / "__init__.py").write_text("")
    (models / "DDT.py").write_text(FAKE_RAE)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generator_step.py"), "--family", "ditdh"]
    cmd += ["--config", "tiny", "--latent", "8,4,4", "--batch", "2", "--repeats", "1"]
    cmd += ["--threads", "1", "--official", str(tmp_path / "official"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert (result["family"], result["config"]) == ("ditdh", "tiny")
    assert [r["implementation"] for r in result["rows"]] == ["latentforge", "official"]
    assert result["rows"][0]["flops_per_step"] == result["rows"][1]["flops_per_step"] > 0


# Stands in for bytetriper/RAE's src/stage1/decoders: its constructor and call, our decoder.
FAKE_OFFICIAL_RAE = """
from types import SimpleNamespace

from latentforge.tokenizers import rae


class ViTMAEConfig(SimpleNamespace):
    pass


class GeneralDecoder(rae.GeneralDecoder):
    def __init__(self, config, num_patches):
        arch = rae.RAEArch("", config.hidden_size, 1, config.decoder_hidden_size,
                           config.decoder_num_hidden_layers, config.decoder_num_attention_heads,
                           config.decoder_intermediate_size, config.patch_size)
        super().__init__(arch, round(num_patches**0.5), config.hidden_size)

    def forward(self, tokens, drop_cls_token=False):
        return SimpleNamespace(logits=super().forward(tokens))
"""


def test_tokenizer_step_benchmark_rae(tmp_path):
    pkg = tmp_path / "official" / "src" / "stage1" / "decoders"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .utils import GeneralDecoder, ViTMAEConfig\n")
    (pkg / "utils.py").write_text(FAKE_OFFICIAL_RAE)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tokenizer_step.py"), "--family", "rae"]
    cmd += ["--config", "tiny", "--resolution", "32", "--batch", "1", "--repeats", "1"]
    cmd += ["--threads", "1", "--official", str(tmp_path / "official"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    rows = [(r["implementation"], r["call"]) for r in result["rows"]]
    assert rows == [("latentforge", "encode"), ("latentforge", "decode"), ("official", "decode")]
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in result["rows"])
    assert set(result["speedup_vs_official"]) == {"decode"}


# Stands in for shiml20/SVG's autoencoder/ldm/modules/diffusionmodules/model.py: the LDM
# Decoder's constructor keywords, our decoder (the same keys).
FAKE_OFFICIAL_SVG = """
from latentforge.tokenizers.ldm_blocks import AEArch, ConvDecoder


class Decoder(ConvDecoder):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                 in_channels, resolution, z_channels):
        levels = tuple(i for i in range(len(ch_mult)) if resolution // 2**i in attn_resolutions)
        super().__init__(AEArch(ch, tuple(ch_mult), num_res_blocks, levels, z_channels))
"""


def test_tokenizer_step_benchmark_svg(tmp_path, monkeypatch):
    """SVG's case in-process, on a small config with the official decoder's GroupNorm(32)
    and mid attention (the `shapes` decoder has neither, and --official refuses it)."""
    import dataclasses

    from latentforge.tokenizers import svg
    from latentforge.tokenizers.ldm_blocks import AEArch

    pkg = tmp_path / "official" / "autoencoder" / "ldm" / "modules" / "diffusionmodules"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "model.py").write_text(FAKE_OFFICIAL_SVG)
    decoder = AEArch(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), z_channels=136)
    arch = dataclasses.replace(svg.CONFIGS["shapes"], decoder=decoder)
    monkeypatch.setitem(svg.CONFIGS, "bench", arch)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import tokenizer_step

    out = tmp_path / "bench.json"
    argv = ["tokenizer_step.py", "--family", "svg", "--config", "bench", "--resolution", "32"]
    argv += ["--batch", "2", "--repeats", "1", "--threads", "1"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--official", str(tmp_path / "official"), "--out", str(out)]
    )
    try:
        tokenizer_step.main()
    finally:  # the fake official package leaves with its test
        for name in [m for m in sys.modules if m == "ldm" or m.startswith("ldm.")]:
            del sys.modules[name]
    result = json.loads(out.read_text())
    rows = [(r["implementation"], r["call"]) for r in result["rows"]]
    assert rows == [("latentforge", "encode"), ("latentforge", "decode"), ("official", "decode")]
    assert set(result["speedup_vs_official"]) == {"decode"} and result["family"] == "svg"
    monkeypatch.setattr(sys, "argv", [*argv[:4], "shapes", *argv[5:], "--official", "x"])
    with pytest.raises(SystemExit, match="GroupNorm"):
        tokenizer_step.main()


@pytest.mark.parametrize("family,config", [("softvq", "tiny"), ("maetok", "tiny-maetok")])
def test_tokenizer_step_benchmark_token1d(tmp_path, monkeypatch, family, config):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import tokenizer_step

    out = tmp_path / "bench.json"
    argv = ["tokenizer_step.py", "--family", family, "--config", config, "--resolution", "32"]
    argv += ["--batch", "2", "--repeats", "1", "--threads", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    tokenizer_step.main()
    result = json.loads(out.read_text())
    assert (result["family"], result["config"]) == (family, config)
    assert [(r["implementation"], r["call"]) for r in result["rows"]] == [
        ("latentforge", "encode"),
        ("latentforge", "decode"),
    ]
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in result["rows"])
