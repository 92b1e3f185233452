"""Latent extraction: a Ray Data actor pool encodes the image set into latent shards.

read -> preprocess (ADM crop, in the source) -> encode (actor pool; the tokenizer is
loaded once per actor) -> parquet shards (``latent`` tensor column, ``label``, ``id``)
-> per-channel statistics (``stats.json``). Latent normalisation is data of the latent
dataset: the generator job and the sampler read ``stats.json``; models never bake it in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from latentforge.config import ExperimentConfig, from_dict, to_dict

TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


def load_tokenizer(cfg: ExperimentConfig, weights: str | Path, device="cpu") -> torch.nn.Module:
    """Build the configured tokenizer and load its trained weights (strict)."""
    from latentforge.platform.train import build_tokenizer

    model = build_tokenizer(cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval().requires_grad_(False)


class Encoder:
    """Ray Data callable class: one tokenizer per actor, encodes image batches."""

    def __init__(self, experiment: dict, weights: str, dtype: str):
        cfg = from_dict(experiment)
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        self.device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_tokenizer(cfg, weights, self.device)
        self.dtype = TORCH_DTYPES[dtype]
        self.vfm = None
        if cfg.extract.vfm:
            from latentforge.tokenizers.vfm import load_vfm

            self.vfm = load_vfm(cfg.extract.vfm).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from latentforge.platform.train import images_to_float

        images = images_to_float(torch.from_numpy(np.ascontiguousarray(batch["image"])))
        latents = self.model.encode(images.to(self.device))
        out = {
            "latent": latents.float().cpu().numpy().astype(self.dtype),
            "label": batch["label"].astype(np.int64),
            "id": batch["id"],
        }
        if self.vfm is not None:  # REPA targets: the VFM's patch grid of the clean image
            feats = self.vfm(images.to(self.device)).patch[-1]
            out["vfm"] = feats.float().cpu().numpy().astype(np.float16)
        return out


def extract(cfg: ExperimentConfig, tokenizer_weights: str | Path, out_dir: str | Path) -> dict:
    """Encode the training split into ``out_dir/shards`` and write ``out_dir/stats.json``."""
    import ray

    from latentforge.platform.data import load_images

    out_dir = Path(out_dir).resolve()
    source = load_images(cfg.data, "train")
    ds = source.dataset.map_batches(
        Encoder,
        fn_constructor_kwargs={
            "experiment": to_dict(cfg),
            "weights": str(Path(tokenizer_weights).resolve()),
            "dtype": cfg.extract.dtype,
        },
        batch_size=cfg.extract.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.extract.actors),
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if cfg.ray.use_gpu else 0,
    )
    shards = out_dir / "shards"
    ds.write_parquet(str(shards), min_rows_per_file=cfg.extract.shard_rows)
    stats = latent_stats(str(shards))
    if cfg.extract.vfm:
        row = ray.data.read_parquet(str(shards), columns=["vfm"]).take(1)[0]
        stats["vfm"] = cfg.extract.vfm
        stats["vfm_shape"] = [int(v) for v in np.asarray(row["vfm"]).shape]
    stats["num_skipped"] = source.num_skipped()
    stats["skipped_ids"] = source.skipped_ids()[:100]
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def _partial_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    z = np.asarray(batch["latent"], dtype=np.float64)  # (B, C, H, W)
    axes = (0, *range(2, z.ndim))  # per channel: (B, C, H, W) or 1-D tokens (B, C, N)
    return {
        "n": np.array([z.shape[0] * z[0].size // z.shape[1]]),
        "s": z.sum(axis=axes)[None],
        "ss": (z**2).sum(axis=axes)[None],
        "images": np.array([z.shape[0]]),
        "shape": np.array([list(z.shape[1:])]),
    }


def latent_stats(shards: str) -> dict[str, Any]:
    """Per-channel mean/std over all latents (float64 sums over Ray Data blocks)."""
    import ray

    parts = ray.data.read_parquet(shards, columns=["latent", "label"]).map_batches(
        _partial_sums, batch_size=4096, batch_format="numpy"
    )
    rows = parts.take_all()
    n = sum(int(r["n"]) for r in rows)
    s = np.sum([r["s"] for r in rows], axis=0)
    ss = np.sum([r["ss"] for r in rows], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 1e-12))
    count = sum(int(r["images"]) for r in rows)
    return {
        "latent_shape": [int(v) for v in rows[0]["shape"]],
        "count": count,
        "mean": mean.tolist(),
        "std": std.tolist(),
    }


def latent_dataset(out_dir: str | Path, vfm: bool = False):
    """The extracted latents as a Ray Dataset (``latent``, ``label``; ``vfm`` features)."""
    import ray

    columns = ["latent", "label", "vfm"] if vfm else ["latent", "label"]
    return ray.data.read_parquet(str(Path(out_dir, "shards").resolve()), columns=columns)
