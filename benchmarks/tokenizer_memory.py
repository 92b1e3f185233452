"""Peak memory of a tokenizer's training in one process, and what its frozen networks cost,
JSON out.

Builds the training job of an experiment file (the tokenizer with its loss networks and
discriminator, as a Ray Train worker builds it) and runs the platform's training loop
(:func:`latentforge.training.loop.fit`, in-process, no Ray) for ``--images`` images of the
embedded ``shapes`` data. Reports the process's resident memory after the imports, after the
build and at its peak (``ru_maxrss``), the bytes of trainable and frozen parameters, and
whether the EMA copy (``copy.deepcopy`` as the loop makes it) shares the frozen networks
(frozen encoder, perceptual and discriminator ViTs held in ``_frozen``) instead of holding a
copy of its own: one copy of each frozen tensor per process.

    python benchmarks/tokenizer_memory.py experiments/shapes/rae.yaml --out runs/bench/mem.json
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import tempfile
from pathlib import Path

import torch
from timing import emit

from latentforge.config import load_experiment
from latentforge.shapes import render_shapes
from latentforge.training.loop import fit, tokenizer_job
from latentforge.training.runtime import LocalRuntime

MIB = 2**20


def rss_mib() -> float:
    """Current resident memory of this process (Linux /proc), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def frozen_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of the networks a tokenizer holds outside its module tree."""
    nets = [m for m in (model.__dict__.get("_frozen") or {}).values() if m is not None]
    return [t for m in nets for t in (*m.parameters(), *m.buffers())]


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the experiment")
    ap.add_argument("--images", type=int, default=256, help="images to train on")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = [
        f"train.tokenizer_images={args.images}",
        f"train.tokenizer_batch_size={args.batch}",
        f"train.log_every_images={args.images}",
        f"train.checkpoint_every_images={args.images}",
        *args.overrides,
    ]
    cfg = load_experiment(args.experiment, over)
    images, labels = render_shapes(range(args.images), cfg.data.resolution, cfg.data.seed)
    after_imports = rss_mib()
    job = tokenizer_job(cfg)
    model = job.model
    _ = model.vfm if hasattr(model, "vfm") else None  # a lazily loaded encoder, loaded now
    after_build = rss_mib()
    ema = copy.deepcopy(model)
    frozen, frozen_ema = frozen_tensors(model), frozen_tensors(ema)
    shared = len(frozen) == len(frozen_ema) and all(
        a.data_ptr() == b.data_ptr() for a, b in zip(frozen, frozen_ema, strict=True)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    disc = [p for p in job.discriminator.parameters()] if job.discriminator is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        runtime = LocalRuntime({"image": images, "label": labels}, tmp)
        fit(cfg, job, runtime, log=lambda *_: None)
    emit(
        {
            "benchmark": "tokenizer_memory",
            "experiment": str(args.experiment),
            "tokenizer": f"{cfg.tokenizer.name} {cfg.tokenizer.config}",
            "images": args.images,
            "batch": args.batch,
            "threads": args.threads,
            "rss_after_imports_mib": after_imports,
            "rss_after_build_mib": after_build,
            "peak_rss_mib": peak_rss_mib(),
            "trainable_mib": nbytes(trainable) / MIB,
            "discriminator_mib": nbytes(disc) / MIB,
            "frozen_mib": nbytes(frozen) / MIB,
            "frozen_networks": sorted(k for k, v in model._frozen.items() if v is not None),
            "ema_shares_frozen": shared,
            "frozen_mib_with_ema": nbytes(frozen + frozen_ema) / MIB,
            "torch": torch.__version__,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
