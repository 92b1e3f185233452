"""Class-conditional sampling on Ray: per-sample seeds, class-balanced labels.

Sample ``i`` uses label ``balanced_labels(N)[i]`` and noise from seed
``sample.seed * 1_000_000 + i`` only, so the images do not depend on how many tasks or
what batch size produced them. Output: ``samples.npz`` in the ADM layout (``arr_0``
uint8 N x H x W x 3, plus ``labels``) and a class-sorted ``grid.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from latentforge.config import ExperimentConfig, from_dict, to_dict
from latentforge.metrics.inception import write_adm_npz

MICRO_BATCH = 16  # the network always sees this many samples: bit-identical across splits


def sample_seeds(cfg: ExperimentConfig, n: int) -> np.ndarray:
    return cfg.sample.seed * 1_000_000 + np.arange(n, dtype=np.int64)


def load_generator(cfg: ExperimentConfig, weights: str | Path, stats: dict, device="cpu"):
    from latentforge.platform.train import build_generator

    model = build_generator(cfg, stats)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def sample_images(
    cfg: ExperimentConfig,
    generator,
    tokenizer,
    stats: dict,
    seeds: np.ndarray,
    labels: np.ndarray,
    log=print,
) -> np.ndarray:
    """Sample latents for (seed, label) pairs, de-normalise, decode; uint8 (N, H, W, 3).

    Runs on the generator's device; the noise is drawn on the CPU from each sample's seed
    (the same numbers on any device) and moved there."""
    from latentforge.generators.samplers import JointClassToken, noise_for_seeds, sample
    from latentforge.platform.train import build_transport

    sc = cfg.sample
    transport = build_transport(cfg)
    latent_shape = tuple(stats["latent_shape"])
    per_channel = (1, -1) + (1,) * (len(latent_shape) - 1)
    device = next(generator.parameters()).device
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device).view(per_channel)
    std = torch.tensor(stats["std"], dtype=torch.float32, device=device).view(per_channel)
    field, noise_shape = generator, latent_shape
    reg_dim = getattr(generator, "reg_dim", 0)
    if reg_dim:  # REG: the class token is sampled jointly; only the latent is decoded
        field = JointClassToken(generator, latent_shape, reg_dim)
        noise_shape = (field.numel + reg_dim,)
    out = []
    step = max(MICRO_BATCH, sc.batch_size // MICRO_BATCH * MICRO_BATCH)
    for i in range(0, len(seeds), step):
        s, y = seeds[i : i + step], labels[i : i + step]
        chunk_seeds = [int(v) for v in s]
        noise = noise_for_seeds(chunk_seeds, noise_shape, device)
        z, nfe = sample(
            field,
            transport,
            noise,
            torch.tensor(y, dtype=torch.long, device=device),
            steps=sc.steps,
            method=sc.sampler,
            cfg_scale=sc.cfg_scale,
            cfg_interval=tuple(sc.cfg_interval),
            cfg_channels=sc.cfg_channels,
            timestep_shift=sc.timestep_shift,
            null_class=cfg.data.num_classes,
            noise_seeds=chunk_seeds,  # the SDE's per-step noise, per sample
            micro_batch=MICRO_BATCH,
        )
        z = field.split(z)[0] if reg_dim else z
        images = tokenizer.decode(z * std + mean)
        out.append(to_uint8(images))
        log(f"[sample] {i + len(s)}/{len(seeds)} images ({nfe} NFE per sample)")
    return np.concatenate(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _sample_chunk(experiment: dict, paths: dict, stats: dict, seeds, labels) -> np.ndarray:
    from latentforge.platform.extract import load_tokenizer

    cfg = from_dict(experiment)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
    gen = load_generator(cfg, paths["generator"], stats, device)
    tok = load_tokenizer(cfg, paths["tokenizer"], device)
    return sample_images(cfg, gen, tok, stats, seeds, labels)


def run_sampling(cfg: ExperimentConfig, paths: dict, stats: dict, out_dir: str | Path) -> dict:
    """Sample ``cfg.sample.num_images`` images over ``cfg.ray.num_workers`` Ray tasks."""
    import ray

    from latentforge.generators.samplers import balanced_labels

    n = cfg.sample.num_images
    seeds = sample_seeds(cfg, n)
    labels = balanced_labels(n, cfg.data.num_classes).numpy()
    workers = max(1, min(cfg.ray.num_workers, n))
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(_sample_chunk).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if cfg.ray.use_gpu else 0,
        # never captured by an enclosing placement group (a Tune trial's)
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    per = -(-n // (workers * MICRO_BATCH)) * MICRO_BATCH  # split on micro-batch multiples
    bounds = np.minimum(np.arange(workers + 1) * per, n)
    refs = [
        task.remote(to_dict(cfg), paths, stats, seeds[a:b], labels[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    images = np.concatenate(ray.get(refs))
    out_dir = Path(out_dir)
    write_adm_npz(out_dir / "samples.npz", images, labels=labels, seeds=seeds)
    save_grid(images, labels, out_dir / "grid.png", cfg.sample.grid_images, cfg.data.num_classes)
    meta = {"num_images": int(n), "shape": list(images.shape)}
    (out_dir / "samples.json").write_text(json.dumps(meta))
    return meta


def save_grid(images, labels, path, max_images: int, num_classes: int) -> None:
    """Class-sorted grid: one row per class (up to ``max_images`` images in all)."""
    from PIL import Image

    per_class = max(1, max_images // num_classes)
    rows = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) == 0:
            continue
        row = list(images[idx])
        row += [np.zeros_like(images[0])] * (per_class - len(row))
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).save(path)


def grid_of(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one array."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = np.zeros((rows * cols - n, h, w, c), dtype=images.dtype)
    x = np.concatenate([images, pad]).reshape(rows, cols, h, w, c)
    return x.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
