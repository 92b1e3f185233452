"""Latent extraction throughput: the Ray Data pipeline against the encoder alone (JSON out).

Both encode the same ``shapes`` images with the same tokenizer, batch size, flip latents
and threads per encoder:

- ``encoder``: the extraction's own ``Encoder.encode`` on images rendered beforehand and
  held in memory (no Ray, no files);
- ``ray``: ``platform.extract.extract`` end to end, fresh output directory: the source,
  the encoder actor pool, part files, shards, manifest and statistics; run for
  ``--images`` and for an eighth of it. The difference of the two is the *marginal* rate
  (start-up excluded: Ray Data planning, actor start, model loading, shard-task start),
  which is what a large extraction runs at. Two sources: ``shapes`` renders the images in
  Ray tasks as it goes (as ``latentforge run`` does), ``memory`` serves the baseline's
  pre-rendered images from the object store (the pipeline's own overhead alone).

``overhead = 1 - ray / encoder`` images/s, marginal and end to end (the issue's target:
at most 10%). Ray gets ``--cpus`` CPUs; each actor encodes with ``--threads`` threads, as
the baseline does.

    python benchmarks/extract.py --images 8192 --batch 256 --out runs/bench/extract.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from latentforge.config import load_experiment, to_dict
from latentforge.models import build_tokenizer, state_dict_of
from latentforge.platform import data as data_module
from latentforge.platform.extract import LatentEncoder as Encoder
from latentforge.platform.extract import Store, extract
from latentforge.shapes import render_shapes

ROOT = Path(__file__).resolve().parents[1]


def encoder_alone(cfg, weights: Path, images: np.ndarray, repeats: int) -> dict:
    """The Encoder of the extraction on in-memory images, batch by batch (best of repeats)."""
    encoder = Encoder(to_dict(cfg), str(weights), Store.open(tempfile.gettempdir()))
    bs = cfg.extract.batch_size
    encoder.encode(images[:bs])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), bs):
            encoder.encode(images[i : i + bs])
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "images_per_s": len(images) / best}


class MemorySource:
    """Stands in for ``data.load_images``: the pre-rendered images, from the object store."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __call__(self, data, split="train", skip=None):
        import ray

        from latentforge.platform.data import ImageSource

        n = data.num_images  # the first n images, ids "0".."n-1" as the shapes source has them
        ds = ray.data.range(n, override_num_blocks=max(1, n // 512)).map_batches(
            _lookup,
            fn_kwargs={"images": self.images, "labels": self.labels, "skip": skip},
            batch_size=None,
        )
        return ImageSource(ds, data.num_classes)


def _lookup(batch: dict, images: np.ndarray, labels: np.ndarray, skip=None) -> dict:
    from latentforge.platform.data import drop_skipped

    idx = drop_skipped(batch["id"], skip)  # as every source: finished ids are left out
    return {"image": images[idx], "label": labels[idx], "id": idx.astype(str).astype(object)}


def measure(
    cfg, weights: Path, work: Path, repeats: int, encoder_rate: float, warmup: bool = True
) -> dict:
    """Extraction at ``cfg.data.num_images`` and an eighth of it: marginal rate, overheads
    (after a warm-up extraction unless ``warmup`` is False: a check, not a measurement)."""
    small = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, num_images=max(1, cfg.data.num_images // 8))
    )
    if warmup:
        ray_extraction(small, weights, work, 1)  # worker processes, page cache
    full = ray_extraction(cfg, weights, work, repeats)
    start = ray_extraction(small, weights, work, repeats)
    marginal = (full["images"] - start["images"]) / max(full["seconds"] - start["seconds"], 1e-9)
    return {
        "full": full,
        "small": start,
        "marginal_images_per_s": marginal,
        "overhead_marginal": 1 - marginal / encoder_rate,
        "overhead_end_to_end": 1 - full["images_per_s"] / encoder_rate,
    }


def ray_extraction(cfg, weights: Path, work: Path, repeats: int) -> dict:
    """``extract`` into a fresh directory (the fastest of ``repeats`` runs)."""
    runs = []
    for r in range(repeats):
        out = work / f"latents-{r}"
        t0 = time.perf_counter()
        info = extract(cfg, weights, out, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        runs.append(
            {
                "images": info["count"],
                "seconds": seconds,
                "images_per_s": info["count"] / seconds,
                "encode_seconds": info["encode_seconds"],
                "finalize_seconds": info["finalize_seconds"],
                "shards": info["num_shards"],
            }
        )
        shutil.rmtree(out)
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="shapes-f4d4", help="VA-VAE config name")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per encoder")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up extraction (a quick check)"
    )
    ap.add_argument(
        "--sources", default="shapes,memory", help="comma-separated: shapes, memory (see above)"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/extract.json"))
    args = ap.parse_args()

    import ray

    overrides = [
        f"tokenizer.config={args.tokenizer}",
        f"data.resolution={args.resolution}",
        f"data.num_images={args.images}",
        f"extract.batch_size={args.batch}",
        f"extract.shard_rows={args.shard_rows}",
        f"extract.actors={args.actors}",
        f"extract.flip={not args.no_flip}",
        f"ray.cpus_per_worker={args.threads}",
    ]
    cfg = load_experiment(ROOT / "experiments" / "quickstart.yaml", overrides)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = work / "tokenizer.safetensors"
        torch.manual_seed(0)
        save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
        images, labels = render_shapes(range(args.images), args.resolution, cfg.data.seed)
        alone = encoder_alone(cfg, weights, images, args.repeats)
        rate = alone["images_per_s"]
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        sources = {}
        try:
            for source in args.sources.split(","):
                if source not in ("shapes", "memory"):
                    raise SystemExit(f"--sources: unknown source {source!r} (shapes, memory)")
                if source == "memory":
                    data_module.load_images = MemorySource(images, labels)
                sources[source] = measure(
                    cfg, weights, work, args.repeats, rate, not args.no_warmup
                )
        finally:
            ray.shutdown()
    report = {
        "benchmark": "extract",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "ray": ray.__version__,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg()[0],
        "encoder": alone,
        "ray_extraction": sources,
    }
    text = json.dumps(report, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
