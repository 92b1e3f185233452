"""Ray Data image sources: ``shapes`` (embedded), ``imagefolder``, ``webdataset``, ``parquet``.

Every source yields rows ``{"image": uint8 (R, R, 3), "label": int64, "id": str}`` at the
configured resolution R, preprocessed with the ADM centre crop (:mod:`.decode`).

File sources list their files on the driver (pyarrow filesystems, so paths may be local or
``s3://`` / ``gs://`` URIs) and read and decode them inside ``map_batches``. An unreadable
file, an undecodable image or a missing/invalid label is logged, skipped and counted
(:meth:`ImageSource.num_skipped`), never a crash. Without a ``holdout_path`` the held-out
split is a deterministic hash split of each image's location-independent key.
"""

from __future__ import annotations

import fnmatch
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from latentforge.config import ConfigError
from latentforge.data import (
    FileData,
    ImageFolderData,
    ParquetData,
    ShapesData,
    WebDatasetData,
)
from latentforge.platform.decode import (
    ROWS_PER_BATCH,
    ImageSource,
    Record,
    RecordDecoder,
    SkipCounter,
    Split,
    hashed_order,
    in_holdout,
)
from latentforge.shapes import HOLDOUT_OFFSET, NUM_CLASSES, render_shapes

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset member suffixes
FILES_PER_BLOCK = 256  # image files per read task (imagefolder)


# ----------------------------------------------------------------------- shapes


def drop_skipped(ids: np.ndarray, skip: Callable[[str], bool] | None) -> np.ndarray:
    """``ids`` without those ``skip`` (``load_images``' predicate on the id text) is true for;
    for sources whose ids exist before their images (rendered or looked up)."""
    if skip is None:
        return ids
    return ids[np.asarray([not skip(str(i)) for i in ids], dtype=bool)]


def _render_batch(
    batch: dict[str, np.ndarray], offset: int, skip=None, **layout
) -> dict[str, np.ndarray]:
    # rendering is this source's decoding: what is done is left out before it
    idx = drop_skipped(batch["id"].astype(np.int64) + offset, skip)
    images, labels = render_shapes(idx, **layout)
    return {"image": images, "label": labels, "id": idx.astype(str).astype(object)}


def build_shapes(
    cfg: ShapesData, split: Split = "train", skip=None, subset=None, seed=None
) -> ImageSource:
    """Images ``range(num_images)`` (train) or ``HOLDOUT_OFFSET + range(holdout_images)``;
    a ``subset`` is the first images (labels cycle through the classes: balanced, so there
    is no listing to shuffle and ``seed`` is unused)."""
    if not 2 <= cfg.num_classes <= NUM_CLASSES:
        raise ConfigError(f"data.num_classes: must be in [2, {NUM_CLASSES}], got {cfg.num_classes}")
    if len(cfg.scale) != 2:
        raise ConfigError(f"data.scale: a [min, max] radius range, got {list(cfg.scale)}")
    n = cfg.num_images if split == "train" else cfg.holdout_images
    n = n if subset is None else min(n, subset)
    offset = 0 if split == "train" else HOLDOUT_OFFSET
    layout = {
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "num_classes": cfg.num_classes,
        "scale": tuple(cfg.scale),
        "jitter": cfg.position_jitter,
    }
    try:
        render_shapes([], **layout)  # a bad layout fails here, not inside a Ray task
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // 500))).map_batches(
        _render_batch,
        fn_kwargs={"offset": offset, "skip": skip, **layout},
        batch_size=500,
        batch_format="numpy",
    )
    return ImageSource(ds, cfg.num_classes, rows=n)


# ----------------------------------------------------------------------- listing files

_GLOB = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b{x,y}`` -> a0bx, a0by, ..., a2by (zero padding kept, as in webdataset)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        options = [m.group(0)]  # a literal brace pair
    return [head + o + rest for o in options for rest in expand_braces(tail)]


def open_fs(path: str, what: str = "data.path") -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, display prefix); local paths are made absolute."""
    if "://" not in path:
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()), ""
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise ConfigError(f"{what} {path!r}: cannot open ({e})") from None
    return fs, inner, path.split("://", 1)[0] + "://"


def _visible(path: str) -> bool:
    return not path.rsplit("/", 1)[-1].startswith(".")


def _list_one(path: str, suffixes: tuple[str, ...], what: str):
    m = _GLOB.search(path)
    if m is None:
        fs, inner, prefix = open_fs(path, what)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"{what} {path!r} does not exist")
        if info.type == pafs.FileType.File:
            return fs, prefix, [inner]
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        files = [i.path for i in infos if i.is_file and i.path.lower().endswith(suffixes)]
        return fs, prefix, [f for f in files if _visible(f)]
    cut = path.rfind("/", 0, m.start())
    base, rest = (path[:cut] or "/", path[cut + 1 :]) if cut >= 0 else (".", path)
    fs, inner, prefix = open_fs(base, what)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise ConfigError(f"{what} {path!r}: directory {base!r} does not exist")
    pattern = inner.rstrip("/") + "/" + rest
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive="/" in rest))
    files = [i.path for i in infos if i.is_file and fnmatch.fnmatchcase(i.path, pattern)]
    return fs, prefix, [f for f in files if _visible(f)]


def list_files(
    path: str, suffixes: tuple[str, ...], what: str = "data.path"
) -> tuple[pafs.FileSystem, str, list[str]]:
    """Files named by ``path`` (a file, a directory listed recursively for ``suffixes``, or
    a glob/brace pattern): (filesystem, display prefix such as ``s3://``, sorted paths)."""
    if not path:
        raise ConfigError(f"{what} is empty: set it to the dataset's directory or URI")
    fs, prefix, files = None, "", []
    for one in expand_braces(path):
        fs, prefix, found = _list_one(one, suffixes, what)
        files += found
    if not files:
        raise ConfigError(f"{what} {path!r} holds no {'/'.join(suffixes)} files")
    return fs, prefix, sorted(set(files))


def _check_file_cfg(cfg: FileData, split: Split) -> tuple[str, str, float | None]:
    """(path to read, config key naming it, hash-split fraction or None) for a split."""
    if not cfg.path:
        raise ConfigError("data.path is empty: set it to the dataset's directory or URI")
    if cfg.resolution < 1:
        raise ConfigError(f"data.resolution: must be positive, got {cfg.resolution}")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction: must be in [0, 1), got {cfg.holdout_fraction}")
    if cfg.holdout_path:
        if split == "holdout":
            return cfg.holdout_path, "data.holdout_path", None
        return cfg.path, "data.path", None
    if split == "holdout" and cfg.holdout_fraction == 0.0:
        raise ConfigError("the holdout split is empty: set data.holdout_path or holdout_fraction")
    return cfg.path, "data.path", cfg.holdout_fraction


def _paths_dataset(paths: list[str], per_block: int, seed: int | None = None) -> ray.data.Dataset:
    """A dataset of ``{"path": str}`` rows, ``per_block`` paths per block (= read task);
    with a ``seed``, the listing is permuted first (:func:`shuffled`)."""
    paths = shuffled(paths, seed)
    chunks = [paths[i : i + per_block] for i in range(0, len(paths), per_block)] or [[]]
    return ray.data.from_arrow([pa.table({"path": pa.array(c, pa.string())}) for c in chunks])


def shuffled(items: list, seed: int | None) -> list:
    """``items`` permuted by ``seed`` (None: as they are). Training sources are listed in this
    order: a streamed epoch then reads files (or shards) from across the classes rather
    than folder by folder, and each read task holds a mix of classes."""
    if seed is None:
        return items
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def _reader(fs: pafs.FileSystem, path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return read


# ----------------------------------------------------------------------- imagefolder


def _folder_batch(batch, decoder: RecordDecoder, fs, prefix: str, root: str, classes: dict):
    records = []
    for path in batch["path"]:
        path = str(path)
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        folder = rel.split("/", 1)[0] if "/" in rel else None
        label = classes.get(folder) if folder is not None else None
        records.append(Record(prefix + path, rel, _reader(fs, path), label))
    yield from decoder.decode(records)


def class_folders(path: str) -> tuple[str, list[str]]:
    """(absolute root, sorted class folder names) of an image-folder tree."""
    fs, root, _ = open_fs(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ConfigError(f"data.path {path!r} is not an existing directory")
    infos = fs.get_file_info(pafs.FileSelector(root))
    dirs = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    return root, sorted(d for d in dirs if _visible(d))


def build_imagefolder(
    cfg: ImageFolderData, split: Split = "train", skip=None, subset=None, seed=None
) -> ImageSource:
    """``root/<class>/...`` images; the split's hash filter runs on the listing, and so does a
    ``subset``: that many files, chosen by hash (:func:`hashed_order`) across all classes."""
    path, what, fraction = _check_file_cfg(cfg, split)
    _, names = class_folders(cfg.path)  # both splits index the training folder's classes
    num_classes = len(names) if cfg.num_classes is None else cfg.num_classes
    if not names or num_classes < len(names):
        raise ConfigError(
            f"data.path {cfg.path!r}: {len(names)} class folders, num_classes={num_classes}"
        )
    suffixes = tuple(("." + e.lower().lstrip(".")) for e in cfg.extensions)
    fs, prefix, files = list_files(path, suffixes, what)
    root = open_fs(path, what)[1]
    if fraction is not None:  # hash of the root-relative path: the split survives a move
        held = split == "holdout"
        files = [f for f in files if in_holdout(f[len(root) + 1 :], fraction) == held]
    if subset is not None:
        files = sorted(hashed_order(files, lambda f: f[len(root) + 1 :])[:subset])
    counter = SkipCounter.remote()
    decoder = RecordDecoder(cfg.resolution, num_classes, counter, split, None, skip)
    classes = {n: i for i, n in enumerate(names)}
    ds = _paths_dataset(files, FILES_PER_BLOCK, seed).map_batches(
        _folder_batch,
        fn_kwargs={
            "decoder": decoder,
            "fs": fs,
            "prefix": prefix,
            "root": root,
            "classes": classes,
        },
        batch_size=ROWS_PER_BATCH,
    )
    return ImageSource(ds, num_classes, counter, names, rows=len(files))


# ----------------------------------------------------------------------- webdataset


def _member_key(name: str) -> tuple[str, str]:
    """``dir/n0144_1.cls`` -> (``dir/n0144_1``, ``cls``): the key ends at the basename's dot."""
    cut = name.rfind("/") + 1
    stem, _, ext = name[cut:].partition(".")
    return name[:cut] + stem, ext.lower()


def _tar_samples(fs, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar shard: (key, {extension: bytes}) per run of same-key members."""
    key, parts = None, {}
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or not _visible(member.name):
                continue
            k, ext = _member_key(member.name)
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def _tar_records(fs, path: str, prefix: str) -> Iterator[Record]:
    shard = prefix + path
    try:
        for key, parts in _tar_samples(fs, path):
            image = next((parts[e] for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
            data = image if image is not None else ValueError("no jpg/jpeg/png/webp member")
            yield Record(f"{shard}#{key}", key, data, parts.get("cls"))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # a truncated or unreadable shard: what was read is kept, the shard is counted once
        yield Record(shard, None, e, None)


def _tar_batch(batch, decoder: RecordDecoder, fs, prefix: str):
    for path in batch["path"]:
        yield from decoder.decode(_tar_records(fs, str(path), prefix))


def build_webdataset(
    cfg: WebDatasetData, split: Split = "train", skip=None, subset=None, seed=None
) -> ImageSource:
    """One read task per shard, streamed; the hash split uses the sample key. With a
    ``subset`` the shards come in hashed order (a caller's ``limit`` then reads whole shards
    from across the listing, not the first ones)."""
    path, what, fraction = _check_file_cfg(cfg, split)
    fs, prefix, files = list_files(path, (".tar",), what)
    files = files if subset is None else hashed_order(files)
    counter = SkipCounter.remote()
    decoder = RecordDecoder(cfg.resolution, cfg.num_classes, counter, split, fraction, skip)
    ds = _paths_dataset(files, 1, seed).map_batches(
        _tar_batch, fn_kwargs={"decoder": decoder, "fs": fs, "prefix": prefix}, batch_size=1
    )
    return ImageSource(ds, cfg.num_classes, counter)


# ----------------------------------------------------------------------- parquet


def _image_bytes(value: Any) -> bytes | BaseException:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        if value.get("bytes") is None:
            return ValueError(f"no embedded bytes (path={value.get('path')!r})")
        return value["bytes"]
    return value


def _parquet_records(fs, path: str, prefix: str, image_column: str, label_column: str):
    name, row = path.rsplit("/", 1)[-1], 0
    try:
        with fs.open_input_file(path) as f:
            batches = pq.ParquetFile(f).iter_batches(256, columns=[image_column, label_column])
            for rb in batches:
                images = rb.column(image_column).to_pylist()
                labels = rb.column(label_column).to_pylist()
                for value, label in zip(images, labels, strict=True):
                    yield Record(
                        f"{prefix}{path}#{row}", f"{name}#{row}", _image_bytes(value), label
                    )
                    row += 1
    except (OSError, pa.ArrowException) as e:
        yield Record(prefix + path, None, e, None)


def _parquet_batch(batch, decoder: RecordDecoder, fs, prefix: str, columns: tuple[str, str]):
    for path in batch["path"]:
        yield from decoder.decode(_parquet_records(fs, str(path), prefix, *columns))


def _check_columns(fs, path: str, columns: tuple[str, str]) -> None:
    try:
        with fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
    except (OSError, pa.ArrowException):
        return  # an unreadable file is counted when it is read
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConfigError(f"data: columns {missing} not in {path!r}; it has {names}")


def build_parquet(
    cfg: ParquetData, split: Split = "train", skip=None, subset=None, seed=None
) -> ImageSource:
    """One read task per file; ids are ``file#row``; the hash split uses ``name#row``. A
    ``subset`` orders the files as in :func:`build_webdataset`."""
    path, what, fraction = _check_file_cfg(cfg, split)
    fs, prefix, files = list_files(path, (".parquet",), what)
    files = files if subset is None else hashed_order(files)
    columns = (cfg.image_column, cfg.label_column)
    _check_columns(fs, files[0], columns)
    counter = SkipCounter.remote()
    decoder = RecordDecoder(cfg.resolution, cfg.num_classes, counter, split, fraction, skip)
    ds = _paths_dataset(files, 1, seed).map_batches(
        _parquet_batch,
        fn_kwargs={"decoder": decoder, "fs": fs, "prefix": prefix, "columns": columns},
        batch_size=1,
    )
    return ImageSource(ds, cfg.num_classes, counter)


def training_rows(
    dataset: ray.data.Dataset, cfg: Any, seed: int, stream: bool = False
) -> ray.data.Dataset:
    """``dataset`` (images or their latents, listed in :func:`shuffled` order) in an order fit
    for training. Listings, and the extraction's shards that follow them, come class by
    class (ImageNet's folders): a worker's stream, and its local shuffle window, would then
    hold two or three classes per batch. To be held in memory (``stream=False``) they are
    shuffled once, globally (``random_shuffle``: an all-to-all pass over the data before it
    is materialised). A streamed dataset is read anew every epoch, where an all-to-all pass
    would cost a second copy of the data each time: it keeps its shuffled listing, and the
    workers' shuffle window mixes the rows of the read tasks in flight. ``shapes`` is
    exempt: its labels cycle through the classes id by id, so every block holds all of them."""
    if stream or isinstance(cfg, ShapesData):
        return dataset
    return dataset.random_shuffle(seed=seed)


def listing_seed(cfg: Any, seed: int) -> int | None:
    """The seed a training stage permutes ``cfg``'s listing (or its latents' shards) with
    (:func:`shuffled`): None for ``shapes``, whose ids already cycle through the classes."""
    return None if isinstance(cfg, ShapesData) else seed


MEMORY_SHARE = 0.25  # training data held in memory may use this share of the object store


def training_data_mode(
    requested: str, nbytes: int | None, object_store: float, latents: bool
) -> str:
    """How a training stage holds its data (``ray.training_data``): ``memory`` (materialised
    in the object store, spilling to disk beyond it: one global shuffle, and a resumed run
    sees exactly the batches it would have) or ``stream`` (read anew each epoch through Ray
    Data: memory bounded by its buffers, whatever the dataset's size). ``auto``: images are
    held in memory when their estimated size ``nbytes`` (None: unknown before reading, as
    for tar shards) fits in :data:`MEMORY_SHARE` of the object store now in the cluster,
    and streamed otherwise; ``latents`` are held in memory: the extraction writes an image
    folder's latents one class per shard, and a stream of them mixes only the few classes
    within a worker's shuffle window."""
    if requested != "auto":
        return requested
    if latents:
        return "memory"
    fits = nbytes is not None and nbytes <= MEMORY_SHARE * object_store
    return "memory" if fits else "stream"


def load_images(
    cfg: Any,
    split: Split = "train",
    skip: Callable[[str], bool] | None = None,
    subset: int | None = None,
    seed: int | None = None,
) -> ImageSource:
    """The configured source's split as an :class:`ImageSource`, its files (or shards) in an
    order permuted by ``seed`` when given (:func:`shuffled`); ids for which ``skip`` is
    true (a resumed extraction's finished ones) are left out before they are read (image
    folders) or decoded (tar and parquet members, rendered shapes). ``subset=n``: a fixed
    sample of about n images drawn across the whole split (evaluation's real images): exactly
    the n chosen for shapes and image folders, whole shards in hashed order otherwise, for
    the caller to ``limit``."""
    if cfg.name not in READERS:
        raise ConfigError(f"data.name: no reader for {cfg.name!r}; known: {', '.join(READERS)}")
    return READERS[cfg.name](cfg, split, skip=skip, subset=subset, seed=seed)


READERS = {
    "shapes": build_shapes,
    "imagefolder": build_imagefolder,
    "webdataset": build_webdataset,
    "parquet": build_parquet,
}
