"""Forward+backward time of a LightningDiT or DiT^DH step, JSON out.

Default case: LightningDiT-B/1 (release flags), batch 8, 16x16x32 latents (VA-VAE f16d32 at
256 px), fp32, 2 threads; median of 5 timed steps after 2 warm-up steps. Reports seconds per
step, images/s and achieved FLOP/s (FLOPs of one forward+backward counted by
``torch.utils.flop_counter``). On CPU also the share of the step's time in dense math
(GEMMs, attention, convolutions; torch.profiler): no implementation of the same model on
the same kernels can beat this one by more than ``1 / dense_share``.

With ``--official PATH`` (a checkout of hustvl/LightningDiT; nothing is downloaded) the same
step is timed on the official ``models.lightningdit.LightningDiT`` with the same weights,
and the speed-up is reported. On CUDA, ``--device cuda --dtype bfloat16 --config
LightningDiT-XL/1`` gives images/s and MFU against ``--peak-tflops``; on CPU, with the
peak, also how close the dense kernels run to it and the speed-up a step doing nothing
but its dense math at the peak would have (no implementation can be faster).

``--family ditdh`` times DiT^DH (default config ``DiTDH-S``); its ``--official`` is a
checkout of bytetriper/RAE, whose ``src/stage2/models/DDT.py`` ``DiTwDDTHead`` gets the same
weights (square latents only, as the official unpatchify assumes). ``--family sit`` times
SiT on 1-D tokens (default config ``SiT-B/1``, ``--latent C,N``; no ``--official``).

    python benchmarks/generator_step.py --out runs/bench/generator_step.json
    python benchmarks/generator_step.py --official ../LightningDiT
    python benchmarks/generator_step.py --family ditdh --latent 768,16,16 --official ../RAE
    python benchmarks/generator_step.py --family sit --config SiT-XL/1 --latent 12,128
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from timing import emit, median_seconds
from torch.utils.flop_counter import FlopCounterMode

from latentforge.generators import ditdh, sit
from latentforge.generators.lightningdit import CONFIGS, LightningDiT

DEFAULT_CONFIG = {"lightningdit": "LightningDiT-B/1", "ditdh": "DiTDH-S", "sit": "SiT-B/1"}
FAMILIES = {"ditdh": (ditdh.CONFIGS, ditdh.DiTDH), "sit": (sit.CONFIGS, sit.SiT)}


def official_model(repo: Path, arch, latent: tuple[int, int, int], classes: int):
    """The official module with the same architecture (imported from the user's checkout)."""
    # the official rmsnorm module imports fairscale's model-parallel layers, unused here
    for name in (
        "fairscale",
        "fairscale.nn",
        "fairscale.nn.model_parallel",
        "fairscale.nn.model_parallel.initialize",
        "fairscale.nn.model_parallel.layers",
    ):
        sys.modules.setdefault(name, types.ModuleType(name))
    layers = sys.modules["fairscale.nn.model_parallel.layers"]
    for cls in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(layers, cls, getattr(layers, cls, object))
    sys.path.insert(0, str(repo))
    from models.lightningdit import LightningDiT as Official

    return Official(
        input_size=latent[1],
        patch_size=arch.patch,
        in_channels=latent[0],
        hidden_size=arch.hidden,
        depth=arch.depth,
        num_heads=arch.heads,
        num_classes=classes,
        learn_sigma=arch.learn_sigma,
        use_qknorm=arch.use_qknorm,
        use_swiglu=arch.use_swiglu,
        use_rope=arch.use_rope,
        use_rmsnorm=arch.use_rmsnorm,
        wo_shift=arch.wo_shift,
    )


def official_ditdh(repo: Path, arch: ditdh.DiTDHArch, latent: tuple[int, int, int], classes: int):
    """RAE's ``DiTwDDTHead`` with the same architecture (from the user's checkout)."""
    sys.path.insert(0, str(repo / "src"))
    from stage2.models.DDT import DiTwDDTHead

    return DiTwDDTHead(
        input_size=latent[1],
        patch_size=arch.patch,
        in_channels=latent[0],
        hidden_size=list(arch.hidden),
        depth=list(arch.depth),
        num_heads=list(arch.heads),
        mlp_ratio=arch.mlp_ratio,
        num_classes=classes,
    )


def build_models(family: str, config: str, latent: tuple[int, ...], official: Path | None):
    """Our model of ``family`` / ``config`` and, with a checkout, the official one with the
    same weights (same keys: loaded strictly)."""
    configs, make = FAMILIES.get(family, (CONFIGS, LightningDiT))
    if config not in configs:
        raise SystemExit(f"--config {config}: not a {family} config ({', '.join(configs)})")
    arch = configs[config]
    ours = make(arch, latent, 1000)
    if official is None:
        return ours, None
    if family == "sit":
        raise SystemExit("--official: not available for sit")
    build = official_ditdh if family == "ditdh" else official_model
    theirs = build(official, arch, latent, 1000)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def time_step(model, x, t, y, repeats: int, dtype) -> tuple[float, float]:
    """Median seconds of forward+backward, and FLOPs of one such step."""
    device = x.device

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()  # counted, and the first warm-up step
    return median_seconds(step, repeats, warmup=1), float(counter.get_total_flops())


# Ops that do the dense math (GEMMs, fused attention, convolutions), forward and backward.
DENSE_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_convolution",
)


def dense_share(model, x, t, y, dtype) -> float:
    """Share of one forward+backward's self CPU time spent in :data:`DENSE_OPS`. Any
    implementation of the same architecture runs the same dense math, so ``1 / share`` bounds
    the speed-up it can have over this one on the same kernels (everything else at zero)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS)
    return dense / total if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="lightningdit", choices=sorted(DEFAULT_CONFIG))
    ap.add_argument(
        "--config",
        help="a named config of the family (default: "
        + ", ".join(f"{k} for {f}" for f, k in DEFAULT_CONFIG.items())
        + ")",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", default="32,16,16", help="C,H,W (sit: C,N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's peak at --dtype, for MFU (e.g. 2 Zen 4 cores at 2.6 GHz, fp32: "
        "2 x 2.6e9 x 32 FLOP/cycle = 0.166)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument(
        "--official",
        type=Path,
        help="checkout of hustvl/LightningDiT (ditdh: bytetriper/RAE) to compare",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/generator_step.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent = tuple(int(v) for v in args.latent.split(","))
    config = args.config or DEFAULT_CONFIG[args.family]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    ours, official = build_models(args.family, config, latent, args.official)
    ours = ours.to(device).train()
    x = torch.randn(args.batch, *latent, device=device)
    t = torch.rand(args.batch, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def row(name: str, model) -> dict:
        sec, flops = time_step(model, x, t, y, args.repeats, dtype)
        out = {
            "implementation": name,
            "step_s": sec,
            "images_per_s": args.batch / sec,
            "flops_per_step": flops,
            "achieved_tflops": flops / sec / 1e12,
        }
        if args.peak_tflops:
            out["mfu"] = out["achieved_tflops"] / args.peak_tflops
            # a step doing only its dense math, at the peak rate: no implementation is faster
            out["speedup_bound_at_peak"] = sec / (flops / (args.peak_tflops * 1e12))
        if device.type == "cpu":
            out["dense_share"] = dense_share(model, x, t, y, dtype)
            out["speedup_bound_same_kernels"] = 1 / max(out["dense_share"], 1e-9)
            out["dense_tflops"] = flops / (out["dense_share"] * sec) / 1e12
            if args.peak_tflops:
                out["dense_fraction_of_peak"] = out["dense_tflops"] / args.peak_tflops
        return out

    model = torch.compile(ours) if args.compile else ours
    results = {
        "family": args.family,
        "config": config,
        "compiled": args.compile,
        "batch": args.batch,
        "latent": list(latent),
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rows": [row("latentforge", model)],
    }
    if official is not None:
        results["rows"].append(row("official", official.to(device).train()))
        results["speedup_vs_official"] = results["rows"][1]["step_s"] / results["rows"][0]["step_s"]
    emit(results, args.out)


if __name__ == "__main__":
    main()
