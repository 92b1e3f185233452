"""Latent extraction: a Ray Data actor pool encodes the image set into latent shards.

read -> preprocess (ADM crop, in the source) -> encode (actor pool; the tokenizer is
loaded once per actor) -> parquet shards -> latent statistics. Latent normalisation is
data of the latent dataset: the generator job and the sampler read ``stats.json``, whose
mean / std are per channel, per element or one scalar as the tokenizer family declares
(:func:`latentforge.models.normalization_of`); models never bake it in. Latents are
(C, H, W) grids or (C, N) 1-D tokens.

The files and their layout are :mod:`latentforge.platform.shards`'s. LatentEncoder actors
write each batch's rows as atomic part files. One Ray task per shard gathers its parts,
sorts them by id, writes the shard atomically and then its marker: as soon as an id range
holds all its rows, the other shards after the pass. A rerun skips shards with a marker
and ids already in parts, so a killed extraction resumes; the source leaves those ids out
before reading (image folders) or decoding them. The statistics come from the markers'
float64 sums in shard order. The encoder runs at one fixed batch shape (the last batch
zero-padded) and memory layout: kernels are chosen by shape, so this keeps every latent a
function of its image alone and a resumed extraction byte-identical to an uninterrupted
one (same hardware, library versions, batch size and threads). Progress and images/s are
logged every ``LOG_EVERY_S`` seconds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data  # registers the tensor type the shard schemas name
import torch

from latentforge.config import ConfigError, ExperimentConfig, to_dict
from latentforge.images import images_to_float
from latentforge.models import load_tokenizer, normalization_of
from latentforge.platform.data import load_images, shuffled
from latentforge.platform.shards import (
    AlreadyEncoded,
    Store,
    check_markers,
    encoded_ids,
    finalize_shard,
    parts_summary,
    read_markers,
    write_manifest,
    write_parts,
)
from latentforge.platform.workers import worker_setup
from latentforge.progress import format_seconds
from latentforge.tokenizers.vfm import load_vfm

TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}
LOG_EVERY_S = 10.0  # progress log interval


class LatentEncoder:
    """Ray Data callable class: one tokenizer per actor; encodes image batches (and their
    horizontal flips) at a fixed batch shape and writes them as part files."""

    def __init__(self, experiment: dict, weights: str, store: Store):
        cfg, self.device = worker_setup(experiment)
        if self.device == "cuda":  # no autotuned (run-dependent) convolution algorithms
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.model = load_tokenizer(cfg, weights, self.device)
        self.dtype = TORCH_DTYPES[cfg.extract.dtype]
        self.bf16 = cfg.extract.dtype == "bfloat16"
        self.batch_size = cfg.extract.batch_size
        self.flip = cfg.extract.flip
        self.rows = cfg.extract.shard_rows
        self.store = store
        self.vfm = None
        if cfg.extract.vfm:
            options = cfg.extract
            self.vfm = load_vfm(options.vfm, resize=options.vfm_resize, weights=options.vfm_weights)
            self.vfm = self.vfm.to(self.device)

    def fixed_shape(self, fn: Callable, x: torch.Tensor) -> np.ndarray:
        """``fn`` over ``x`` in chunks of exactly ``batch_size`` images (the last one
        zero-padded) in one memory layout (kernels are chosen by shape *and* strides), so an
        output never depends on how Ray batched its image."""
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
            chunk = chunk.to(self.device, memory_format=torch.contiguous_format)
            out.append(fn(chunk)[:n].float().cpu().numpy())
        return np.concatenate(out)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, H, W, 3) -> ``latent`` and ``latent_flip`` (B, *latent_shape) [+ ``vfm``,
        ``vfm_cls``]."""
        with torch.inference_mode():
            return self._encode(images_to_float(torch.from_numpy(np.ascontiguousarray(images))))

    def stored(self, latents: np.ndarray) -> np.ndarray:
        """Latents at the configured storage precision (bf16: rounded, kept as float32)."""
        if self.bf16:
            return torch.from_numpy(latents).to(torch.bfloat16).float().numpy()
        return latents.astype(self.dtype)

    def _encode(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        out = {"latent": self.stored(self.fixed_shape(self.model.encode, x))}
        if self.flip:  # LightningDiT's augmentation: the latent of the mirrored image
            out["latent_flip"] = self.stored(self.fixed_shape(self.model.encode, x.flip(-1)))
        if self.vfm is not None:
            # REPA targets: the VFM's patch grid of the clean image; REG's: its class token
            shapes = {}

            def features(v):
                o = self.vfm(v)
                shapes["patch"] = tuple(o.patch[-1].shape[1:])
                parts = [o.patch[-1].flatten(1)] + ([o.cls] if o.cls is not None else [])
                return torch.cat(parts, dim=1)

            both = self.fixed_shape(features, x)
            n = int(np.prod(shapes["patch"]))
            out["vfm"] = both[:, :n].reshape(-1, *shapes["patch"]).astype(np.float16)
            if both.shape[1] > n:
                out["vfm_cls"] = both[:, n:].astype(np.float16)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["id"]) == 0:
            return parts_summary([], [], [])
        arrays = self.encode(batch["image"])
        arrays["label"] = batch["label"].astype(np.int64)
        arrays["id"] = batch["id"]
        return write_parts(self.store, arrays, self.rows)


# --------------------------------------------------------------------------- extraction


def _check(cfg: ExperimentConfig) -> None:
    options = cfg.extract
    for key in ("batch_size", "shard_rows", "actors"):
        if getattr(options, key) < 1:
            raise ConfigError(f"extract.{key}: must be positive, got {getattr(options, key)}")


def _encode_pass(cfg, weights: str, store: Store, done: dict, log, tasks) -> tuple:
    """Stream the source through the encoder actors, starting the shard task of each id
    range as soon as it is complete: (the source's skip counts, timing)."""
    options = cfg.extract
    encoded = encoded_ids(store, done)
    part_ids = frozenset().union(*encoded.values())
    counts = {name: len(ids) for name, ids in encoded.items()}
    before = sum(m["rows"] for m in done.values()) + len(part_ids)
    skip = None
    if done or part_ids:
        log(f"[extract] resuming: {len(done)} shards done, {before} images encoded")
        skip = AlreadyEncoded(frozenset(done), part_ids, options.shard_rows)
    source = load_images(cfg.data, "train", skip=skip)
    ds = source.dataset.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"experiment": to_dict(cfg), "weights": weights, "store": store},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if cfg.ray.use_gpu else 0,
        # Ray Data's default (a crashed actor is replaced), stated: ops whose remote args
        # differ are not fused, so on CPUs the source's decoding runs in tasks beside the
        # encoder actors instead of taking turns with the encoder inside them
        max_restarts=-1,
    )
    progress = Progress(log, before, getattr(cfg.data, "num_images", None))

    def on_batch(batch: dict[str, np.ndarray]) -> None:
        progress.add(batch["rows"])
        for name, n, ranged in zip(batch["shard"], batch["rows"], batch["ranged"], strict=True):
            counts[name] = counts.get(name, 0) + int(n)
            if ranged and counts[name] == options.shard_rows:
                tasks.start(name)
        tasks.poll()

    if failure := _consume(ds, on_batch):
        del ds
        gc.collect()  # the failed executor's reference cycles: release its actors now
        raise ExtractionError(f"the encoding pass failed (rerun to resume): {failure}")
    progress.finish()
    skips = {"num_skipped": source.num_skipped(), "skipped_ids": source.skipped_ids()[:100]}
    timing = {"encoded": progress.images, "encode_seconds": progress.seconds()}
    timing["images_per_s"] = progress.rate()
    return skips, timing


class ExtractionError(RuntimeError):
    """The encoding pass failed; what it wrote is kept, and a rerun resumes from it."""


def _consume(ds, on_batch: Callable[[dict], None]) -> str | None:
    """Run the encoding pass; on failure return the error's text instead of raising it.
    The error's traceback holds the pass's executor and actor pool (and their CPUs or
    GPUs) for as long as anything keeps the error (Ray Data logs it), which would block a
    retry in the same process; the traceback is dropped."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            on_batch(batch)
    except Exception as e:  # noqa: BLE001 - re-raised by the caller without its traceback
        e.__traceback__ = e.__context__ = e.__cause__ = None
        return f"{type(e).__name__}: {e}"
    return None


class Progress:
    """Logs images encoded and images/s every ``LOG_EVERY_S`` seconds and at the end."""

    def __init__(self, log: Callable[[str], None], before: int, total: int | None):
        self.log, self.before, self.total = log, before, total
        self.images = self.parts = 0
        self.t0 = self.last = time.time()

    def seconds(self) -> float:
        return time.time() - self.t0

    def rate(self) -> float:
        return self.images / max(self.seconds(), 1e-9)

    def add(self, rows: np.ndarray) -> None:
        """One output batch of the encoder: the rows of each part it wrote."""
        self.images += int(rows.sum())
        self.parts += len(rows)
        if time.time() - self.last >= LOG_EVERY_S:
            self.last = time.time()
            self.log(self.line())

    def line(self) -> str:
        done, rate = self.before + self.images, self.rate()
        of = f"/{self.total} ({100 * done / max(self.total, 1):.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0 and done < self.total:
            eta = f" ETA {format_seconds((self.total - done) / rate)}"
        return f"[extract] {done}{of} images encoded, {rate:.1f} images/s{eta}"

    def finish(self) -> None:
        self.log(self.line() + f" ({self.images} in {self.seconds():.1f} s)")


class ShardTasks:
    """The shard tasks (:func:`~latentforge.platform.shards.finalize_shard`, statistics in
    ``normalization``) in flight, one per shard, and the count of finished ones."""

    def __init__(self, store: Store, rows: int, normalization: str):
        self.task = ray.remote(finalize_shard).options(num_cpus=1)
        self.store, self.rows, self.normalization = store, rows, normalization
        self.started: set[str] = set()
        self.pending: list = []
        self.finished = 0

    def start(self, name: str) -> None:
        if name not in self.started:
            self.started.add(name)
            task = self.task.remote(self.store, name, self.rows, self.normalization)
            self.pending.append(task)

    def poll(self, wait: bool = False) -> None:
        """Collect finished tasks (raising their errors); with ``wait``, all of them."""
        while self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            self.collect(ready[0])

    def collect(self, ref) -> dict:
        """A finished shard task's marker (raising its error); counts the shard."""
        marker = ray.get(ref)
        self.finished += 1
        return marker

    def cancel(self) -> None:
        """Stop the tasks in flight (a failed run): their half-written files are tmp files."""
        for ref in self.pending:
            ray.cancel(ref, force=True)
        ray.wait(self.pending, num_returns=len(self.pending), timeout=30)
        self.pending = []


def extract(
    cfg: ExperimentConfig,
    tokenizer_weights: str | Path,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Encode the training split into shards under ``out_dir`` (a path or URI); write the
    manifest and ``stats.json`` (mean / std in the tokenizer family's normalisation).
    Rerunning resumes an interrupted extraction (killed while encoding or while writing
    shards) and returns at once when it is complete. Returns the statistics plus this
    run's timings."""
    _check(cfg)
    store = Store.open(out_dir)
    if store.exists("manifest.json") and store.exists("stats.json"):
        log(f"[extract] complete: {store.path('manifest.json')}")
        return store.read_json("stats.json")
    t0 = time.time()
    store.remove_tmp()
    done = read_markers(store)
    normalization = normalization_of(cfg)
    check_markers(done.values(), normalization, store.root)
    tasks, timing = ShardTasks(store, cfg.extract.shard_rows, normalization), {}
    try:
        if not store.exists("encoded.json"):  # else a previous run finished the pass
            weights = str(Path(tokenizer_weights).resolve())
            skips, timing = _encode_pass(cfg, weights, store, done, log, tasks)
            store.write_json("encoded.json", skips)
        t1 = time.time()
        for name in sorted({p.split("/")[1] for p in store.files("parts", ".parquet", True)}):
            if name not in done:
                tasks.start(name)
        tasks.poll(wait=True)
    except BaseException:
        tasks.cancel()
        raise
    store.remove_dir("parts")
    timing["finalize_seconds"] = time.time() - t1
    log(f"[extract] {tasks.finished} shards written")
    stats = write_manifest(cfg, store, store.read_json("encoded.json"))
    store.fs.delete_file(store.path("encoded.json"))
    log(f"[extract] {stats['count']} images in {stats['num_shards']} shards -> {store.root}")
    return {**stats, **timing, "seconds": time.time() - t0}


def _latent_files(store: Store, vfm: bool, cls: bool) -> tuple[list[str], list[dict] | None]:
    """(columns, the manifest's shard entries in order; None for the layout before
    manifests)."""
    columns = ["latent", "label"] + (["vfm"] if vfm else []) + (["vfm_cls"] if cls else [])
    if not store.exists("manifest.json"):
        return columns, None
    manifest = store.read_json("manifest.json")
    if manifest["flip"]:
        columns.append("latent_flip")
    return columns, manifest["shards"]


def latent_dataset(out_dir: str | Path, vfm: bool = False, cls: bool = False, seed=None):
    """The extracted latents as a Ray Dataset: ``latent``, ``label`` (+ ``latent_flip``
    when extracted with flips; ``vfm`` patch features and the ``vfm_cls`` class token on
    request), shards in manifest order or, with a ``seed``, permuted by it."""
    store = Store.open(out_dir)
    columns, shards = _latent_files(store, vfm, cls)
    if shards is None:  # the layout before manifests: a parquet directory
        return ray.data.read_parquet(store.path("shards"), filesystem=store.fs, columns=columns)
    paths = [store.path(s["file"]) for s in shards]
    return ray.data.read_parquet(shuffled(paths, seed), filesystem=store.fs, columns=columns)


def latent_nbytes(out_dir: str | Path, vfm: bool = False, cls: bool = False) -> int | None:
    """In-memory size of :func:`latent_dataset`'s rows, from the row count and the tensor
    shapes in the first shard's schema (None for the layout before manifests)."""

    store = Store.open(out_dir)
    columns, shards = _latent_files(store, vfm, cls)
    if shards is None:
        return None
    rows = sum(s["rows"] for s in shards)
    with store.fs.open_input_file(store.path(shards[0]["file"])) as f:
        schema = pq.read_schema(f)
    per_row = 0
    for name in columns:
        kind = schema.field(name).type
        if hasattr(kind, "shape"):  # a tensor per row: its values and a list offset
            width = kind.storage_type.value_type.bit_width // 8
            per_row += int(np.prod(kind.shape)) * width + 8
        else:
            per_row += kind.bit_width // 8
    return rows * per_row
