"""The benchmark scripts run and write their JSON (tiny settings; no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

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
    cmd += ["--official", str(repo), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert [r["implementation"] for r in result["rows"]] == ["latentforge", "official"]
    for r in result["rows"]:
        assert r["step_s"] > 0 and r["flops_per_step"] > 0
    # both rows run the same architecture, so they count the same FLOPs
    assert result["rows"][0]["flops_per_step"] == result["rows"][1]["flops_per_step"]
    assert result["speedup_vs_official"] > 0


def test_fd_benchmark_agrees_with_scipy(tmp_path):
    out = tmp_path / "fd.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fd.py"), "--dim", "32", "--n", "20", "200"]
    subprocess.run([*cmd, "--repeats", "1", "--out", str(out)], check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [20, 200]
    assert all(r["relative_difference"] < 1e-6 and r["ours_s"] > 0 for r in rows)
