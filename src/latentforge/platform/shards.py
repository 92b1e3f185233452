"""The files of a latent dataset: id-keyed shards, their markers, the manifest and the
latent statistics. :mod:`latentforge.platform.extract` writes them; the generator stage
reads them.

Layout of an extraction's directory (a local path or a pyarrow filesystem URI such as
``s3://``)::

    shards/shard-<name>.parquet   id, label, latent, latent_flip, [vfm]; rows sorted by id
    shards/shard-<name>.json      the shard's done marker: rows, id range, sha256, sums
    parts/<name>/<digest>.parquet encoded rows not yet gathered into their shard
    encoded.json                  the encoding pass over the source finished
    manifest.json, stats.json     written last: the extraction is complete

Sharding depends on source ids only, never on Ray's blocks or tasks: an id's *group* and
*ordinal* (:func:`parse_id`) put it in shard ``(group, ordinal // extract.shard_rows)``,
so ``shapes`` image k is in shard ``k // S``. Encoded rows are written as atomic *part*
files named by the hash of their ids (:func:`write_parts`); :func:`finalize_shard` gathers
a shard's parts, sorts them by id, writes the shard and then its marker, which holds the
float64 sums of the latent statistics in the tokenizer family's normalisation
(:func:`stat_axes`). ``stats.json`` combines the markers' sums in shard order.

Nothing here imports torch: shard tasks start without it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from latentforge.config import ExperimentConfig

FORMAT = 1  # manifest format version


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


@dataclass(frozen=True)
class AlreadyEncoded:
    """Whether a source id is done: in a finished shard or in a written part. The source
    applies it before reading or decoding (``load_images(skip=...)``)."""

    done_shards: frozenset
    done_ids: frozenset
    rows: int

    def __call__(self, source_id: str) -> bool:
        return source_id in self.done_ids or shard_of(source_id, self.rows) in self.done_shards


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

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """A parquet file (only ``columns`` when given)."""
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

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
    ``ray.data.read_parquet`` returns a (C, H, W) or (C, N) array per row), in a fixed
    order."""
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


# --------------------------------------------------------------------------- parts


def write_parts(store: Store, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Write encoded rows as one part file per shard they belong to; the file is named by
    the hash of its ids, so a retried task rewrites the same file. Returns a
    :func:`parts_summary`."""
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
    return parts_summary(names, counts, ranged)


def parts_summary(names: list[str], rows: list[int], ranged: list[bool]) -> dict[str, np.ndarray]:
    """What an encoder batch wrote: rows per shard; ``ranged``: the shard is an id range,
    so it is complete once it holds ``shard_rows`` rows."""
    return {
        "shard": np.array(names, dtype=object),
        "rows": np.array(rows, dtype=np.int64),
        "ranged": np.array(ranged, dtype=bool),
    }


def encoded_ids(store: Store, done: dict[str, dict]) -> dict[str, set[str]]:
    """Ids already encoded in parts, by shard; parts of finished shards are leftovers
    of a killed run and are removed."""
    ids: dict[str, set[str]] = {}
    for name in {p.split("/")[1] for p in store.files("parts", ".parquet", recursive=True)}:
        if name in done:
            store.remove_dir(f"parts/{name}")
            continue
        for p in store.files(f"parts/{name}", ".parquet"):
            table = store.read_table(p, columns=["id"])
            ids.setdefault(name, set()).update(table.column("id").to_pylist())
    return ids


def _read_parts(store: Store, name: str) -> pa.Table:
    import ray.data.extensions  # noqa: F401 - registers the tensor type the parts are stored as

    tables = [store.read_table(p) for p in store.files(f"parts/{name}")]
    if not tables:
        raise FileNotFoundError(f"no parts of shard {name} in {store.root}")
    table = pa.concat_tables(tables)
    ids = table.column("id").to_pylist()
    first: dict[str, int] = {}  # a part rewritten by a killed run's straggler: keep one copy
    for i, source_id in enumerate(ids):
        first.setdefault(source_id, i)
    order = sorted(first.values(), key=lambda i: id_order(ids[i]))
    return table.take(pa.array(order, pa.int64()))


# --------------------------------------------------------------------------- statistics


def stat_axes(normalization: str, ndim: int) -> tuple[int, ...]:
    """The axes of a batch of latents (B, *latent_shape) that a latent statistic reduces
    over: ``channel``, all but the channel axis 1 ((B, C, H, W) or 1-D tokens (B, C, N));
    ``element``, the batch axis (a mean/std per position of the latent); ``scalar``, all."""
    if normalization == "channel":
        return (0, *range(2, ndim))
    if normalization == "element":
        return (0,)
    if normalization == "scalar":
        return tuple(range(ndim))
    raise ValueError(f"unknown latent normalization {normalization!r}")


def latent_sums(latents: np.ndarray, normalization: str = "channel") -> dict[str, Any]:
    """float64 sums of a batch of latents (B, *latent_shape) for the statistics: ``n``
    values per statistic, ``sum`` and ``sumsq`` shaped (C,) per channel, ``latent_shape``
    per element, (1,) for a scalar, and the latent ``shape``."""
    z = np.asarray(latents, dtype=np.float64)
    axes = stat_axes(normalization, z.ndim)
    s = np.atleast_1d(z.sum(axis=axes))
    ss = np.atleast_1d((z**2).sum(axis=axes))
    return {"n": z.size // s.size, "sum": s, "sumsq": ss, "shape": [int(v) for v in z.shape[1:]]}


def shard_stats(markers: list[dict]) -> dict[str, Any]:
    """mean / std (nested lists shaped as the markers' sums) from the shards' float64
    sums, combined in shard order; ``samples``: values per statistic."""
    n = sum(m["n"] for m in markers)
    s = np.sum([m["sum"] for m in markers], axis=0)
    ss = np.sum([m["sumsq"] for m in markers], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 1e-12))
    return {"samples": n, "mean": mean.tolist(), "std": std.tolist()}


def marker_normalization(marker: dict) -> str:
    """The normalisation a marker's sums are in (markers of per-channel sums name none)."""
    return marker.get("normalization", "channel")


# --------------------------------------------------------------------------- shards


def finalize_shard(store: Store, name: str, rows: int, normalization: str = "channel") -> dict:
    """Gather shard ``name``'s parts, sort its rows by id, write the shard atomically, then
    its marker (with the float64 sums of the statistics in ``normalization``, over the
    latents and their flips); drop the parts."""
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
    info = shard_info(table, name, file, rows)
    info |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    info |= marker_sums(table, normalization)
    if "vfm" in table.column_names:
        info["vfm_shape"] = list(table.schema.field("vfm").type.shape)
    if "vfm_cls" in table.column_names:
        info["vfm_cls_dim"] = int(table.schema.field("vfm_cls").type.shape[0])
    store.write_json(marker, info)
    store.remove_dir(f"parts/{name}")
    return info


def shard_info(table: pa.Table, name: str, file: str, rows: int) -> dict:
    """A shard's name, file, group, index, rows and id range."""
    ids = table.column("id").to_pylist()
    group, ordinal = parse_id(ids[0])
    index = 0 if ordinal is None else ordinal // rows
    return {
        "name": name,
        "file": file,
        "group": group,
        "index": index,
        "rows": len(ids),
        "first_id": ids[0],
        "last_id": ids[-1],
        "id_range": None if ordinal is None else [index * rows, (index + 1) * rows],
    }


def marker_sums(table: pa.Table, normalization: str) -> dict:
    """The latent shape and statistics sums of a shard's latents (and flips, on which the
    generator trains too); the normalisation is named unless it is per channel."""
    sums = [latent_sums(tensor_column(table, "latent"), normalization)]
    if "latent_flip" in table.column_names:
        sums.append(latent_sums(tensor_column(table, "latent_flip"), normalization))
    out = {
        "latent_shape": sums[0]["shape"],
        "n": int(sum(s["n"] for s in sums)),
        "sum": np.sum([s["sum"] for s in sums], axis=0).tolist(),
        "sumsq": np.sum([s["sumsq"] for s in sums], axis=0).tolist(),
    }
    return out if normalization == "channel" else out | {"normalization": normalization}


def read_markers(store: Store) -> dict[str, dict]:
    markers = [store.read_json(p) for p in store.files("shards", ".json")]
    return {m["name"]: m for m in markers}


def check_markers(markers: Iterable[dict], normalization: str, root: str) -> None:
    """Finished shards hold sums in ``normalization``, else a ``RuntimeError``: the
    tokenizer family's normalisation changed since they were written."""
    found = {marker_normalization(m) for m in markers} - {normalization}
    if found:
        raise RuntimeError(
            f"the shards in {root} hold {', '.join(sorted(found))} latent statistics, the "
            f"tokenizer family declares {normalization!r}: delete {root} to extract again"
        )


MARKER_KEYS = ("name", "file", "rows", "first_id", "last_id", "id_range", "sha256", "bytes")


def write_manifest(cfg: ExperimentConfig, store: Store, encoded: dict) -> dict:
    """``manifest.json`` (shards in (group, index) order) and ``stats.json`` from the
    shard markers: both are functions of the shards' contents only."""
    markers = sorted(read_markers(store).values(), key=lambda m: (m["group"], m["index"]))
    if not markers:
        raise RuntimeError(f"extraction wrote no shards to {store.root}: is the source empty?")
    normalization = marker_normalization(markers[0])
    check_markers(markers, normalization, store.root)
    options = cfg.extract
    columns = ["id", "label", "latent"] + (["latent_flip"] if options.flip else [])
    manifest = {
        "format": FORMAT,
        "shard_rows": options.shard_rows,
        "flip": options.flip,
        "dtype": options.dtype,
        "columns": columns + (["vfm"] if options.vfm else []),
        "latent_shape": markers[0]["latent_shape"],
        "count": sum(m["rows"] for m in markers),
        "shards": [{k: m[k] for k in MARKER_KEYS} for m in markers],
    }
    stats = {
        "latent_shape": markers[0]["latent_shape"],
        "count": manifest["count"],  # images; ``samples``: values per statistic (x2 with flips)
        **shard_stats(markers),
        "flip": options.flip,
        "seed": getattr(cfg.data, "seed", None),  # extraction itself draws no random numbers
        "num_shards": len(markers),
    }
    if normalization != "channel":  # per channel: as stats.json has always been
        stats["normalization"] = normalization
    if options.vfm:
        stats["vfm"] = options.vfm
        stats["vfm_shape"] = markers[0]["vfm_shape"]
        if "vfm_cls_dim" in markers[0]:
            stats["vfm_cls_dim"] = markers[0]["vfm_cls_dim"]
    stats["num_skipped"] = encoded["num_skipped"]
    stats["skipped_ids"] = encoded["skipped_ids"]
    store.write_json("manifest.json", manifest)
    store.write_json("stats.json", stats)
    return stats
