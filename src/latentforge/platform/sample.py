"""Class-conditional sampling on Ray: each task samples a chunk of the run's images
(:mod:`latentforge.generators.generate`: per-sample seeds and labels, so the images do not
depend on how many tasks produced them) and writes it under ``chunks/`` in the stage
directory as soon as it is done; a rerun after a crash or a lost node samples only the
missing chunks. The driver then streams them into ``samples.npz`` in the ADM layout
(``arr_0`` uint8 N x H x W x 3, plus ``labels``), never holding all of them, and draws a
class-sorted ``grid.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import ray

from latentforge.config import ExperimentConfig, to_dict
from latentforge.generators.generate import (
    MICRO_BATCH,
    official_precision,
    sample_images,
    sample_seeds,
)
from latentforge.generators.samplers import balanced_labels
from latentforge.images import grid_rows, save_grid
from latentforge.metrics.inception import write_adm_npz_parts
from latentforge.models import load_generator, load_guide, load_tokenizer, num_classes_of
from latentforge.platform.workers import stage_task, worker_setup

CHUNK_IMAGES = 2048  # at most this many images per task and chunk file (~400 MB at 256 px)


def _sample_chunk(experiment: dict, paths: dict, stats: dict, seeds, labels, file: str) -> str:
    """Sample one chunk and write it to ``file`` (atomically: a file there is complete)."""
    cfg, device = worker_setup(experiment)
    official_precision(device)
    gen = load_generator(cfg, paths["generator"], stats, device)
    guide = load_guide(cfg, stats, device) if cfg.sample.guide_weights else None
    tok = load_tokenizer(cfg, paths["tokenizer"], device)
    images = sample_images(cfg, gen, tok, stats, seeds, labels, guide=guide)
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
    out_dir = Path(out_dir)
    n = cfg.sample.num_images
    seeds = sample_seeds(cfg, n)
    labels = balanced_labels(n, num_classes_of(cfg)).numpy()
    workers = max(1, min(cfg.ray.num_workers, n))
    task = stage_task(_sample_chunk, cfg)
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
    rows = grid_rows(labels, cfg.sample.grid_images, num_classes_of(cfg))
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
