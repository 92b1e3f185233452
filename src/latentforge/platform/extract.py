"""Latent extraction: a Ray Data actor pool encodes the image set into latent shards.

read -> preprocess (ADM crop, in the source) -> encode (actor pool; the tokenizer is
loaded once per actor) -> parquet shards -> per-channel statistics. Latent normalisation
is data of the latent dataset: the generator job and the sampler read ``stats.json``;
models never bake it in.

Layout of ``out_dir`` (a local path or a pyarrow filesystem URI such as ``s3://``)::

    shards/shard-<name>.parquet   id, label, latent, latent_flip, [vfm]; rows sorted by id
    shards/shard-<name>.json      the shard's done marker: rows, id range, sha256, sums
    parts/<name>/<digest>.parquet encoded rows not yet gathered into their shard
    encoded.json                  the encoding pass over the source finished
    manifest.json, stats.json     written last: the extraction is complete

Sharding depends on source ids only, never on Ray's blocks or tasks: an id's *group* and
*ordinal* (:func:`parse_id`) put it in shard ``(group, ordinal // extract.shard_rows)``,
so ``shapes`` image k is in shard ``k // S``. LatentEncoder actors write each batch's rows as
atomic *part* files named by the hash of their ids. One Ray task per shard gathers its
parts, sorts them by id, writes the shard atomically and then its marker: as soon as an
id range holds all its rows, the other shards after the pass. A rerun skips shards with
a marker and ids already in parts, so a killed extraction resumes; the source leaves
those ids out before reading (image folders) or decoding them. The statistics come
from the markers' float64 sums in shard order. The encoder runs at one fixed batch shape
(the last batch zero-padded) and memory layout: kernels are chosen by shape, so this
keeps every latent a function of its image alone and a resumed extraction byte-identical
to an uninterrupted one (same hardware, library versions, batch size and threads).
Progress and images/s are logged every ``LOG_EVERY_S`` seconds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from latentforge.config import ConfigError, ExperimentConfig, from_dict, to_dict

if TYPE_CHECKING:  # torch is imported where used: shard tasks start without it (faster)
    import torch

TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}
FORMAT = 1  # manifest format version
LOG_EVERY_S = 10.0  # progress log interval


# --------------------------------------------------------------------------- shard keys


def parse_id(source_id: str) -> tuple[str, int | None]:
    """(group, ordinal) of a source id (see ``platform/data.py`` for the id of each source).

    ``shapes`` ``"17"`` -> ("", 17); parquet ``"<file>#17"`` -> (file, 17); webdataset
    ``"<tar>#<key>"`` -> (tar, None); imagefolder ``"<root>/<class>/<image>"`` ->
    (its folder, None). Without an ordinal the whole group is one shard.
    """
    head, sep, tail = source_id.rpartition("#")
    if sep and tail.isdecimal():
        return head, int(tail)
    if source_id.isdecimal():
        return "", int(source_id)
    if sep:
        return head, None
    return source_id.rpartition("/")[0], None


def shard_of(source_id: str, rows: int) -> str:
    """Name of the shard holding ``source_id``: ``000003`` (ids [3S, 4S)) or, for ids in a
    named group, ``<hash of the group>-000003``."""
    group, ordinal = parse_id(source_id)
    index = 0 if ordinal is None else ordinal // rows
    if not group:
        return f"{index:06d}"
    return f"{hashlib.blake2b(group.encode(), digest_size=6).hexdigest()}-{index:06d}"


def id_order(source_id: str) -> tuple[int, str]:
    """Sort key of ids within a shard: by ordinal, else by the id's text."""
    ordinal = parse_id(source_id)[1]
    return (-1 if ordinal is None else ordinal, source_id)


# --------------------------------------------------------------------------- storage


@dataclass
class Store:
    """Files under one root on a pyarrow filesystem; every write is tmp file + rename."""

    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, where: str | Path) -> Store:
        from latentforge.platform.data import open_fs

        fs, root, _ = open_fs(str(where), "extract output")
        return cls(fs, root.rstrip("/"))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write(self, rel: str, data: bytes) -> None:
        """Atomic on local and POSIX filesystems: readers see the old file or the whole new one."""
        parent, _, name = self.path(rel).rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{parent}/{name}")

    def write_json(self, rel: str, value: Any) -> None:
        self.write(rel, json.dumps(value, indent=1).encode())

    def files(self, rel: str, suffix: str = "", recursive: bool = False) -> list[str]:
        """Sorted root-relative paths of the visible files under ``rel`` ending in ``suffix``."""
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=recursive))
        n = len(self.root) + 1
        return sorted(
            i.path[n:]
            for i in infos
            if i.is_file and i.path.endswith(suffix) and not i.base_name.startswith(".")
        )

    def remove_tmp(self) -> None:
        """Delete tmp files of writes that were killed before their rename."""
        if not self.exists(""):
            return
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        for i in infos:
            if i.is_file and i.base_name.startswith(".") and ".tmp-" in i.base_name:
                self.fs.delete_file(i.path)

    def remove_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))


def to_table(arrays: dict[str, np.ndarray]) -> pa.Table:
    """Columns ``id``, ``label`` and tensor columns (Ray's tensor extension type, so
    ``ray.data.read_parquet`` returns (C, H, W) arrays per row), in a fixed order."""
    from ray.data.extensions import ArrowTensorArray

    columns = {"id": pa.array(arrays["id"].astype(str)), "label": pa.array(arrays["label"])}
    for name in ("latent", "latent_flip", "vfm", "vfm_cls"):
        if name in arrays:
            columns[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(arrays[name]))
    return pa.table(columns)


def parquet_bytes(table: pa.Table) -> bytes:
    """One deterministic parquet file: same table in, same bytes out."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.combine_chunks(), sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy()


# --------------------------------------------------------------------------- encoding


def write_parts(store: Store, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Write encoded rows as one part file per shard they belong to; the file is named by
    the hash of its ids, so a retried task rewrites the same file. Returns a summary."""
    ids = arrays["id"].astype(str)
    shards = np.array([shard_of(i, rows) for i in ids])
    names, counts, ranged = sorted(set(shards.tolist())), [], []
    for name in names:
        idx = np.flatnonzero(shards == name)
        digest = hashlib.blake2b("\n".join(sorted(ids[idx])).encode(), digest_size=10)
        part = {k: v[idx] for k, v in arrays.items()}
        store.write(f"parts/{name}/{digest.hexdigest()}.parquet", parquet_bytes(to_table(part)))
        counts.append(len(idx))
        ranged.append(parse_id(ids[idx[0]])[1] is not None)
    return _summary(names, counts, ranged)


def _summary(names: list[str], rows: list[int], ranged: list[bool]) -> dict[str, np.ndarray]:
    """LatentEncoder output: rows written per shard; ``ranged``: the shard is an id range, so
    it is complete once it holds ``shard_rows`` rows."""
    return {
        "shard": np.array(names, dtype=object),
        "rows": np.array(rows, dtype=np.int64),
        "ranged": np.array(ranged, dtype=bool),
    }


class LatentEncoder:
    """Ray Data callable class: one tokenizer per actor; encodes image batches (and their
    horizontal flips) at a fixed batch shape and writes them as part files."""

    def __init__(self, experiment: dict, weights: str, store: Store, hook=None):
        import torch

        cfg = from_dict(experiment)
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        self.device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":  # no autotuned (run-dependent) convolution algorithms
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        from latentforge.models import load_tokenizer

        self.model = load_tokenizer(cfg, weights, self.device)
        self.dtype = TORCH_DTYPES[cfg.extract.dtype]
        self.bf16 = cfg.extract.dtype == "bfloat16"
        self.batch_size = cfg.extract.batch_size
        self.flip = cfg.extract.flip
        self.rows = cfg.extract.shard_rows
        self.store, self.hook, self.parts = store, hook, 0
        self.vfm = None
        if cfg.extract.vfm:
            from latentforge.tokenizers.vfm import load_vfm

            ec = cfg.extract
            self.vfm = load_vfm(ec.vfm, resize=ec.vfm_resize, weights=ec.vfm_weights)
            self.vfm = self.vfm.to(self.device)

    def fixed_shape(self, fn: Callable, x: torch.Tensor) -> np.ndarray:
        """``fn`` over ``x`` in chunks of exactly ``batch_size`` images (the last one
        zero-padded) in one memory layout (kernels are chosen by shape *and* strides), so an
        output never depends on how Ray batched its image."""
        import torch

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
        """uint8 (B, H, W, 3) -> ``latent`` and ``latent_flip`` (B, C, h, w) [+ ``vfm``]."""
        import torch

        from latentforge.images import images_to_float

        with torch.inference_mode():
            return self._encode(images_to_float(torch.from_numpy(np.ascontiguousarray(images))))

    def stored(self, latents: np.ndarray) -> np.ndarray:
        """Latents at the configured storage precision (bf16: rounded, kept as float32)."""
        if self.bf16:
            import torch

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
                import torch

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
            return _summary([], [], [])
        arrays = self.encode(batch["image"])
        arrays["label"] = batch["label"].astype(np.int64)
        arrays["id"] = batch["id"]
        summary = write_parts(self.store, arrays, self.rows)
        self.parts += len(summary["rows"])
        if self.hook is not None:
            self.hook("parts", self.parts)
        return summary


@dataclass(frozen=True)
class AlreadyEncoded:
    """Whether a source id is done: in a finished shard or in a written part. The source
    applies it before reading or decoding (``load_images(skip=...)``)."""

    done_shards: frozenset
    done_ids: frozenset
    rows: int

    def __call__(self, source_id: str) -> bool:
        return source_id in self.done_ids or shard_of(source_id, self.rows) in self.done_shards


# --------------------------------------------------------------------------- shards


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


def _read_parts(store: Store, name: str) -> pa.Table:
    import ray.data.extensions  # noqa: F401 - registers the tensor type the parts are stored as

    tables = [
        pq.read_table(pa.BufferReader(store.read_bytes(p))) for p in store.files(f"parts/{name}")
    ]
    if not tables:
        raise FileNotFoundError(f"no parts of shard {name} in {store.root}")
    table = pa.concat_tables(tables)
    ids = table.column("id").to_pylist()
    first: dict[str, int] = {}  # a part rewritten by a killed run's straggler: keep one copy
    for i, source_id in enumerate(ids):
        first.setdefault(source_id, i)
    order = sorted(first.values(), key=lambda i: id_order(ids[i]))
    return table.take(pa.array(order, pa.int64()))


def finalize_shard(store: Store, name: str, rows: int) -> dict:
    """Gather shard ``name``'s parts, sort its rows by id, write the shard atomically, then
    its marker (with float64 per-channel sums for the statistics); drop the parts."""
    marker = f"shards/shard-{name}.json"
    if store.exists(marker):  # another task got there first
        return store.read_json(marker)
    try:
        table = _read_parts(store, name)
    except FileNotFoundError:
        if store.exists(marker):
            return store.read_json(marker)
        raise
    data = parquet_bytes(table)
    file = f"shards/shard-{name}.parquet"
    store.write(file, data)
    ids = table.column("id").to_pylist()
    group, ordinal = parse_id(ids[0])
    index = 0 if ordinal is None else ordinal // rows
    sums = [_partial_sums({"latent": tensor_column(table, "latent")})]
    if "latent_flip" in table.column_names:  # the generator trains on both
        sums.append(_partial_sums({"latent": tensor_column(table, "latent_flip")}))
    info = {
        "name": name,
        "file": file,
        "group": group,
        "index": index,
        "rows": len(ids),
        "first_id": ids[0],
        "last_id": ids[-1],
        "id_range": None if ordinal is None else [index * rows, (index + 1) * rows],
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "latent_shape": [int(v) for v in sums[0]["shape"][0]],
        "n": int(sum(int(s["n"][0]) for s in sums)),
        "sum": np.sum([s["s"][0] for s in sums], axis=0).tolist(),
        "sumsq": np.sum([s["ss"][0] for s in sums], axis=0).tolist(),
    }
    if "vfm" in table.column_names:
        info["vfm_shape"] = list(table.schema.field("vfm").type.shape)
    if "vfm_cls" in table.column_names:
        info["vfm_cls_dim"] = int(table.schema.field("vfm_cls").type.shape[0])
    store.write_json(marker, info)
    store.remove_dir(f"parts/{name}")
    return info


def _markers(store: Store) -> dict[str, dict]:
    markers = [store.read_json(p) for p in store.files("shards", ".json")]
    return {m["name"]: m for m in markers}


def _parts(store: Store, done: dict[str, dict]) -> dict[str, set[str]]:
    """Ids already encoded in parts, by shard; parts of finished shards are leftovers
    of a killed run and are removed."""
    ids: dict[str, set[str]] = {}
    for name in {p.split("/")[1] for p in store.files("parts", ".parquet", recursive=True)}:
        if name in done:
            store.remove_dir(f"parts/{name}")
            continue
        for p in store.files(f"parts/{name}", ".parquet"):
            table = pq.read_table(pa.BufferReader(store.read_bytes(p)), columns=["id"])
            ids.setdefault(name, set()).update(table.column("id").to_pylist())
    return ids


# --------------------------------------------------------------------------- extraction


def _check(cfg: ExperimentConfig) -> None:
    ec = cfg.extract
    for key in ("batch_size", "shard_rows", "actors"):
        if getattr(ec, key) < 1:
            raise ConfigError(f"extract.{key}: must be positive, got {getattr(ec, key)}")


def _encode_pass(cfg, weights: str, store: Store, done: dict, log, hook, tasks) -> tuple:
    """Stream the source through the encoder actors, starting the shard task of each id
    range as soon as it is complete: (the source's skip counts, timing)."""
    import ray

    from latentforge.platform.data import load_images

    ec = cfg.extract
    encoded = _parts(store, done)
    part_ids = frozenset().union(*encoded.values())
    counts = {name: len(ids) for name, ids in encoded.items()}
    before = sum(m["rows"] for m in done.values()) + len(part_ids)
    skip = None
    if done or part_ids:
        log(f"[extract] resuming: {len(done)} shards done, {before} images encoded")
        skip = AlreadyEncoded(frozenset(done), part_ids, ec.shard_rows)
    source = load_images(cfg.data, "train", skip=skip)
    ds = source.dataset.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "experiment": to_dict(cfg),
            "weights": weights,
            "store": store,
            "hook": hook,
        },
        batch_size=ec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ec.actors),
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
            if ranged and counts[name] == ec.shard_rows:
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
        done = self.before + self.images
        of = f"/{self.total} ({100 * done / max(self.total, 1):.0f}%)" if self.total else ""
        return f"[extract] {done}{of} images encoded, {self.rate():.1f} images/s"

    def finish(self) -> None:
        self.log(self.line() + f" ({self.images} in {self.seconds():.1f} s)")


class ShardTasks:
    """The shard tasks (:func:`finalize_shard`) in flight, one per shard; ``hook("shards",
    n)`` after each finished one."""

    def __init__(self, store: Store, rows: int, hook=None):
        import ray

        self.task = ray.remote(finalize_shard).options(num_cpus=1)
        self.store, self.rows, self.hook = store, rows, hook
        self.started: set[str] = set()
        self.pending: list = []
        self.finished = 0

    def start(self, name: str) -> None:
        if name not in self.started:
            self.started.add(name)
            self.pending.append(self.task.remote(self.store, name, self.rows))

    def poll(self, wait: bool = False) -> None:
        """Collect finished tasks (raising their errors); with ``wait``, all of them."""
        import ray

        while self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            ray.get(ready)
            self.finished += 1
            if self.hook is not None:
                self.hook("shards", self.finished)

    def cancel(self) -> None:
        """Stop the tasks in flight (a failed run): their half-written files are tmp files."""
        import ray

        for ref in self.pending:
            ray.cancel(ref, force=True)
        ray.wait(self.pending, num_returns=len(self.pending), timeout=30)
        self.pending = []


def shard_stats(markers: list[dict]) -> dict[str, Any]:
    """Per-channel mean/std from the shards' float64 sums, combined in shard order."""
    n = sum(m["n"] for m in markers)
    s = np.sum([m["sum"] for m in markers], axis=0)
    ss = np.sum([m["sumsq"] for m in markers], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 1e-12))
    return {"samples": n, "mean": mean.tolist(), "std": std.tolist()}


def extract(
    cfg: ExperimentConfig,
    tokenizer_weights: str | Path,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    hook: Callable[[str, int], None] | None = None,
) -> dict:
    """Encode the training split into shards under ``out_dir`` (a path or URI); write the
    manifest and ``stats.json``. Rerunning resumes an interrupted extraction and returns
    at once when it is complete. ``hook(event, count)`` is called in the encoder actors
    after each batch's parts (``"parts"``, the actor's count) and on the driver after each
    shard (``"shards"``) is written; tests raise from it to simulate a kill.
    Returns the statistics plus this run's timings."""
    _check(cfg)
    store = Store.open(out_dir)
    if store.exists("manifest.json") and store.exists("stats.json"):
        log(f"[extract] complete: {store.path('manifest.json')}")
        return store.read_json("stats.json")
    t0 = time.time()
    store.remove_tmp()
    done = _markers(store)
    tasks, timing = ShardTasks(store, cfg.extract.shard_rows, hook), {}
    try:
        if not store.exists("encoded.json"):  # else a previous run finished the pass
            weights = str(Path(tokenizer_weights).resolve())
            skips, timing = _encode_pass(cfg, weights, store, done, log, hook, tasks)
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


def write_manifest(cfg: ExperimentConfig, store: Store, encoded: dict) -> dict:
    """``manifest.json`` (shards in (group, index) order) and ``stats.json`` from the
    shard markers: both are functions of the shards' contents only."""
    markers = sorted(_markers(store).values(), key=lambda m: (m["group"], m["index"]))
    if not markers:
        raise RuntimeError(f"extraction wrote no shards to {store.root}: is the source empty?")
    ec = cfg.extract
    keys = ("name", "file", "rows", "first_id", "last_id", "id_range", "sha256", "bytes")
    columns = ["id", "label", "latent"] + (["latent_flip"] if ec.flip else [])
    manifest = {
        "format": FORMAT,
        "shard_rows": ec.shard_rows,
        "flip": ec.flip,
        "dtype": ec.dtype,
        "columns": columns + (["vfm"] if ec.vfm else []),
        "latent_shape": markers[0]["latent_shape"],
        "count": sum(m["rows"] for m in markers),
        "shards": [{k: m[k] for k in keys} for m in markers],
    }
    stats = {
        "latent_shape": markers[0]["latent_shape"],
        "count": manifest["count"],  # images; ``samples``: values per channel (x2 with flips)
        **shard_stats(markers),
        "flip": ec.flip,
        "seed": getattr(cfg.data, "seed", None),  # extraction itself draws no random numbers
        "num_shards": len(markers),
    }
    if ec.vfm:
        stats["vfm"] = ec.vfm
        stats["vfm_shape"] = markers[0]["vfm_shape"]
        if "vfm_cls_dim" in markers[0]:
            stats["vfm_cls_dim"] = markers[0]["vfm_cls_dim"]
    stats["num_skipped"] = encoded["num_skipped"]
    stats["skipped_ids"] = encoded["skipped_ids"]
    store.write_json("manifest.json", manifest)
    store.write_json("stats.json", stats)
    return stats


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
    import ray

    from latentforge.platform.data import shuffled

    store = Store.open(out_dir)
    columns, shards = _latent_files(store, vfm, cls)
    if shards is None:  # the layout before manifests: a parquet directory
        return ray.data.read_parquet(store.path("shards"), filesystem=store.fs, columns=columns)
    paths = [store.path(s["file"]) for s in shards]
    return ray.data.read_parquet(shuffled(paths, seed), filesystem=store.fs, columns=columns)


def latent_nbytes(out_dir: str | Path, vfm: bool = False, cls: bool = False) -> int | None:
    """In-memory size of :func:`latent_dataset`'s rows, from the row count and the tensor
    shapes in the first shard's schema (None for the layout before manifests)."""
    import ray.data  # noqa: F401  (registers the tensor type the schema names)

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
