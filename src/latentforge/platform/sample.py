"""Class-conditional sampling on Ray: per-sample seeds, class-balanced labels.

Sample ``i`` uses label ``balanced_labels(N)[i]`` and noise from seed
``sample.seed * 1_000_000 + i`` only, so the images do not depend on how many tasks or
what batch size produced them. Each task writes its chunk of images under ``chunks/`` in
the stage directory as soon as it is done (a rerun after a crash or a lost node samples
only the missing chunks); the driver then streams them into ``samples.npz`` in the ADM
layout (``arr_0`` uint8 N x H x W x 3, plus ``labels``), never holding all of them, and
draws a class-sorted ``grid.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from latentforge.config import ExperimentConfig, from_dict, to_dict
from latentforge.metrics.inception import write_adm_npz_parts

MICRO_BATCH = 16  # the network always sees this many samples: bit-identical across splits
CHUNK_IMAGES = 2048  # at most this many images per task and chunk file (~400 MB at 256 px)
TOKENIZER_PIXELS = 16 * 256 * 256  # pixels per decode call: 16 images at 256 px


def tokenizer_batch(resolution: int, cap: int) -> int:
    """Images per tokenizer call outside training: at most ``cap`` and
    :data:`TOKENIZER_PIXELS` pixels, so that activations stay bounded at any resolution
    (a VA-VAE decoder at 256 px holds ~0.1 GB of fp32 activations per image)."""
    return max(1, min(cap, TOKENIZER_PIXELS // resolution**2))


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
        per_call = tokenizer_batch(cfg.data.resolution, len(z))
        for j in range(0, len(z), per_call):
            out.append(to_uint8(tokenizer.decode(z[j : j + per_call] * std + mean)))
        log(f"[sample] {i + len(s)}/{len(seeds)} images ({nfe} NFE per sample)")
    return np.concatenate(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def official_precision(device: str) -> None:
    """On CUDA, fp32 weights with TF32 matmuls and convolutions, as LightningDiT's
    inference.py samples (about 8x the fp32 rate of an A100); nothing on CPU."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _sample_chunk(experiment: dict, paths: dict, stats: dict, seeds, labels, file: str) -> str:
    """Sample one chunk and write it to ``file`` (atomically: a file there is complete)."""
    from latentforge.platform.extract import load_tokenizer

    cfg = from_dict(experiment)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
    official_precision(device)
    gen = load_generator(cfg, paths["generator"], stats, device)
    tok = load_tokenizer(cfg, paths["tokenizer"], device)
    images = sample_images(cfg, gen, tok, stats, seeds, labels)
    tmp = f"{file}.tmp-{uuid.uuid4().hex[:12]}"  # unique across nodes
    with open(tmp, "wb") as f:
        np.save(f, images)
    os.replace(tmp, file)
    return file


def chunk_ok(file: Path, rows: int) -> bool:
    """Whether ``file`` is a finished chunk of ``rows`` uint8 images (else it is sampled
    again; chunks are written by rename, so a partial one is not expected, but a file of
    another length would shift every later image against its label)."""
    try:
        chunk = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return chunk.dtype == np.uint8 and chunk.ndim == 4 and len(chunk) == rows


def chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """Index ranges of the sampling tasks: an equal share per worker, cut on micro-batch
    multiples and into chunks of at most :data:`CHUNK_IMAGES`."""
    per = -(-n // (workers * MICRO_BATCH)) * MICRO_BATCH
    per = min(per, max(MICRO_BATCH, CHUNK_IMAGES // MICRO_BATCH * MICRO_BATCH))
    return [(a, min(a + per, n)) for a in range(0, n, per)]


def run_sampling(cfg: ExperimentConfig, paths: dict, stats: dict, out_dir: str | Path) -> dict:
    """Sample ``cfg.sample.num_images`` images in Ray tasks (``cfg.ray.num_workers`` at a
    time at most), reusing the chunks an interrupted run of the same stage finished."""
    import ray

    from latentforge.generators.samplers import balanced_labels

    out_dir = Path(out_dir)
    n = cfg.sample.num_images
    seeds = sample_seeds(cfg, n)
    labels = balanced_labels(n, cfg.data.num_classes).numpy()
    workers = max(1, min(cfg.ray.num_workers, n))
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # a GPU task's process exits after it: no CUDA memory or TF32 setting left behind for
    # the next task or Train job (num_gpus in .options, unlike in @ray.remote, keeps it)
    remote = ray.remote(max_calls=1) if cfg.ray.use_gpu else ray.remote
    task = remote(_sample_chunk).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if cfg.ray.use_gpu else 0,
        # never captured by an enclosing placement group (a Tune trial's)
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    chunks = out_dir / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    files, pending = [], []
    for a, b in chunk_bounds(n, workers):
        file = chunks / f"{a:09d}-{b:09d}.npy"
        files.append(file)
        if not chunk_ok(file, b - a):
            pending.append((file, a, b))
    if len(pending) < len(files):
        print(f"[sample] {len(files) - len(pending)} of {len(files)} chunks already sampled")
    running = []
    for file, a, b in pending:  # at most ``workers`` tasks (and model copies) at a time
        if len(running) >= workers:
            done, running = ray.wait(running, num_returns=1)
            ray.get(done)
        running.append(task.remote(to_dict(cfg), paths, stats, seeds[a:b], labels[a:b], str(file)))
    ray.get(running)
    shape = write_adm_npz_parts(out_dir / "samples.npz", files, labels=labels, seeds=seeds)
    rows = grid_rows(labels, cfg.sample.grid_images, cfg.data.num_classes)
    save_grid(gather(files, [i for row in rows for i in row]), [len(r) for r in rows], out_dir)
    shutil.rmtree(chunks)  # samples.npz holds them all now
    meta = {"num_images": int(n), "shape": list(shape)}
    (out_dir / "samples.json").write_text(json.dumps(meta))
    return meta


def gather(files: list[Path], index: list[int]) -> np.ndarray:
    """Rows ``index`` of the images stored in order across the chunk ``files``."""
    parts = [np.load(f, mmap_mode="r") for f in files]
    starts = np.cumsum([0] + [len(p) for p in parts])
    rows = []
    for i in index:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        rows.append(np.array(parts[k][i - starts[k]]))
    return np.stack(rows)


def grid_rows(labels: np.ndarray, max_images: int, num_classes: int) -> list[list[int]]:
    """Sample indices of the class-sorted grid, one row per class and up to ``max_images``
    in all: every class when each gets two images or more, else ~sqrt(max_images) classes
    spread over the label range (ImageNet: 10 classes x 10 at ``grid_images=100``)."""
    per_class = max_images // num_classes
    classes = list(range(num_classes))
    if per_class < 2:
        shown = max(1, min(num_classes, round(math.sqrt(max_images))))
        classes = sorted({int(c) for c in np.linspace(0, num_classes - 1, shown).round()})
        per_class = max(1, max_images // len(classes))
    rows = [np.flatnonzero(labels == c)[:per_class].tolist() for c in classes]
    return [r for r in rows if r]


def save_grid(images: np.ndarray, row_lengths: list[int], out_dir: Path) -> None:
    """``grid.png``: ``images`` in rows of ``row_lengths``, padded to the longest row."""
    from PIL import Image

    width = max(row_lengths)
    rows, start = [], 0
    for length in row_lengths:
        row = list(images[start : start + length]) + [np.zeros_like(images[0])] * (width - length)
        rows.append(np.concatenate(row, axis=1))
        start += length
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_dir / "grid.png")


def grid_of(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one array."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = np.zeros((rows * cols - n, h, w, c), dtype=images.dtype)
    x = np.concatenate([images, pad]).reshape(rows, cols, h, w, c)
    return x.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
