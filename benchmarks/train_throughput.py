"""Training throughput of the embedded default's models on this machine (JSON out).

Measures forward+backward+optimizer images/s for the VA-VAE configs (with and without the
VF loss to the embedded shapes ViT) and the LightningDiT configs used by the quickstart,
at the given thread count. These numbers set the quickstart's image budgets.

    python benchmarks/train_throughput.py --threads 2 --out runs/bench/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from timing import median_seconds

from latentforge.generators.lightningdit import LightningDiTConfig, build_lightningdit
from latentforge.generators.transport import Transport, TransportConfig
from latentforge.tokenizers.vavae import VAVAEConfig, build_vavae


def time_steps(step, repeats: int) -> float:
    return median_seconds(step, repeats, warmup=2)


def tokenizer_case(config: str, resolution: int, batch: int, vfm: str | None, repeats: int) -> dict:
    model = build_vavae(VAVAEConfig(config=config, vfm=vfm), resolution).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1

    def step():
        loss = model.loss(x, 0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = time_steps(step, repeats)
    return {
        "model": f"vavae/{config}",
        "resolution": resolution,
        "vfm": vfm,
        "batch": batch,
        "step_s": sec,
        "images_per_s": batch / sec,
    }


def generator_case(config: str, latent: tuple[int, int, int], batch: int, repeats: int) -> dict:
    model = build_lightningdit(LightningDiTConfig(config=config), latent, 10).train()
    transport = Transport(TransportConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, *latent), torch.arange(batch) % 10

    def step():
        loss = transport.loss(model, x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = time_steps(step, repeats)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"lightningdit/{config}",
        "latent": list(latent),
        "params": params,
        "batch": batch,
        "step_s": sec,
        "images_per_s": batch / sec,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench/train_throughput.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    results = [
        tokenizer_case("shapes-f4d4", 32, 64, None, args.repeats),
        tokenizer_case("shapes-f4d4", 32, 64, "local:shapes-vit", args.repeats),
        tokenizer_case("shapes-f8d8", 64, 32, None, args.repeats),
        generator_case("small", (4, 8, 8), 128, args.repeats),
        generator_case("small", (16, 8, 8), 128, args.repeats),
    ]
    report = {
        "benchmark": "train_throughput",
        "threads": args.threads,
        "torch": torch.__version__,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg()[0],
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
