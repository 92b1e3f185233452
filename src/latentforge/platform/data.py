"""Ray Data image sources: ``shapes`` (embedded), ``imagefolder``, ``webdataset``, ``parquet``.

Every source yields rows ``{"image": uint8 (R, R, 3), "label": int64, "id": str}`` at the
configured resolution R, preprocessed with the ADM centre crop (Dhariwal & Nichol 2021,
openai/guided-diffusion: halve with a box filter while the short side is at least 2R,
bicubic-resize the short side to R, crop the centre). A corrupt or unreadable image, or
one without a valid label, is skipped, logged and counted (:meth:`ImageSource.num_skipped`),
never a crash. Paths may be local or ``s3://`` / ``gs://`` URIs (pyarrow filesystems).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import ray
from PIL import Image

from latentforge.registry import DATASETS
from latentforge.shapes import HOLDOUT_OFFSET, NUM_CLASSES, render_shapes

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe"]
Split = Literal["train", "holdout"]


@dataclass
class ShapesData:
    """The embedded procedural dataset (see ``latentforge.shapes``)."""

    name: str = "shapes"
    resolution: int = 64
    num_images: int = 20000
    seed: int = 0
    num_classes: int = NUM_CLASSES
    holdout_images: int = 2000


@dataclass
class FileData:
    """Fields shared by the file-based sources."""

    name: str = ""
    path: str = ""  # directory / URI of the training images
    resolution: int = 256
    num_classes: int = 1000
    holdout_path: str | None = None  # e.g. ImageNet val; else a hash split of the ids
    holdout_fraction: float = 0.01


@dataclass
class ImageFolderData(FileData):
    """``root/<class name>/<image>``; class index = position in sorted class names."""

    name: str = "imagefolder"
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))


@dataclass
class WebDatasetData(FileData):
    """Tar shards with ``<key>.jpg|jpeg|png|webp`` and ``<key>.cls`` members."""

    name: str = "webdataset"


@dataclass
class ParquetData(FileData):
    """Parquet files with encoded image bytes (or a ``{bytes, path}`` struct) and a label."""

    name: str = "parquet"
    image_column: str = "image"
    label_column: str = "label"


# ----------------------------------------------------------------------- decoding


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop of a PIL image to uint8 (resolution, resolution, 3)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return center_crop_arr(image.convert("RGB"), resolution)


def in_holdout(key: str, fraction: float) -> bool:
    """Deterministic hash split of ids (used when no holdout_path is given)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000


@ray.remote(num_cpus=0)
class SkipCounter:
    """Collects the ids of skipped images across Ray tasks."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def add(self, ids: list[str]) -> None:
        self.ids.extend(ids)

    def get(self) -> list[str]:
        return list(self.ids)


class ImageSource:
    """A lazy Ray Dataset of ``image``/``label``/``id`` rows plus its skip counter."""

    def __init__(self, dataset: ray.data.Dataset, num_classes: int, counter=None):
        self.dataset = dataset
        self.num_classes = num_classes
        self._counter = counter

    def skipped_ids(self) -> list[str]:
        return ray.get(self._counter.get.remote()) if self._counter is not None else []

    def num_skipped(self) -> int:
        return len(self.skipped_ids())


@dataclass
class Decoder:
    """Turns (bytes, label, id) records into rows; counts and skips the bad ones."""

    resolution: int
    num_classes: int
    counter: object
    split: Split
    holdout_fraction: float | None  # None: no hash split (explicit holdout_path)

    def keep(self, key: str) -> bool:
        if self.holdout_fraction is None:
            return True
        return in_holdout(key, self.holdout_fraction) == (self.split == "holdout")

    def rows(self, records) -> dict[str, np.ndarray]:
        images, labels, ids, bad = [], [], [], []
        for data, label, key in records:
            if not self.keep(key):
                continue
            try:
                label = int(label)
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"label {label} outside [0, {self.num_classes})")
                images.append(decode_image(data, self.resolution))
            except Exception as e:  # noqa: BLE001 - any undecodable input is skipped
                log.warning("skipping %s: %s", key, e)
                bad.append(key)
                continue
            labels.append(label)
            ids.append(key)
        if bad:
            ray.get(self.counter.add.remote(bad))
        r = self.resolution
        return {
            "image": np.stack(images) if images else np.zeros((0, r, r, 3), np.uint8),
            "label": np.asarray(labels, dtype=np.int64),
            "id": np.asarray(ids, dtype=object),
        }


# ----------------------------------------------------------------------- shapes


def _render_batch(
    batch: dict[str, np.ndarray], resolution: int, seed: int, num_classes: int, offset: int
):
    idx = batch["id"].astype(np.int64) + offset
    images, labels = render_shapes(idx, resolution, seed, num_classes)
    return {"image": images, "label": labels, "id": idx.astype(str).astype(object)}


@DATASETS.register("shapes", config=ShapesData)
def build_shapes(cfg: ShapesData, split: Split = "train") -> ImageSource:
    n = cfg.num_images if split == "train" else cfg.holdout_images
    offset = 0 if split == "train" else HOLDOUT_OFFSET
    blocks = max(1, min(64, n // 500))
    ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
        _render_batch,
        fn_kwargs={
            "resolution": cfg.resolution,
            "seed": cfg.seed,
            "num_classes": cfg.num_classes,
            "offset": offset,
        },
        batch_size=500,
        batch_format="numpy",
    )
    return ImageSource(ds, cfg.num_classes)


# ----------------------------------------------------------------------- files


def _filesystem(path: str):
    import pyarrow.fs as pafs

    uri = path if "://" in path else str(Path(path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise FileNotFoundError(f"data.path {path!r}: cannot open ({e})") from e


def list_files(path: str, suffixes: tuple[str, ...]) -> tuple[object, list[str]]:
    """All files under ``path`` whose name ends with one of ``suffixes`` (sorted)."""
    import pyarrow.fs as pafs

    if not path:
        raise FileNotFoundError("data.path is empty: set it to the dataset's directory or URI")
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [root]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes)
    )
    if not files:
        raise FileNotFoundError(f"data.path {path!r} holds no {'/'.join(suffixes)} files")
    return fs, files


def _uri(fs, path: str) -> str:
    return path if fs.type_name == "local" else f"{fs.type_name}://{path}"


def _split_path(cfg: FileData, split: Split) -> tuple[str, float | None]:
    if split == "holdout" and cfg.holdout_path:
        return cfg.holdout_path, None
    return cfg.path, (None if split == "train" and cfg.holdout_path else cfg.holdout_fraction)


def _folder_batch(batch, decoder: Decoder, classes: dict[str, int]):
    records = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        records.append((data, classes.get(Path(str(path)).parent.name, -1), str(path)))
    return decoder.rows(records)


@DATASETS.register("imagefolder", config=ImageFolderData)
def build_imagefolder(cfg: ImageFolderData, split: Split = "train") -> ImageSource:
    path, fraction = _split_path(cfg, split)
    suffixes = tuple(e.lower() for e in cfg.extensions)
    fs, files = list_files(path, suffixes)
    # classes are the training folder's sub-directories, so both splits share indices
    train_files = files if path == cfg.path else list_files(cfg.path, suffixes)[1]
    names = sorted({Path(f).parent.name for f in train_files})
    counter = SkipCounter.remote()
    decoder = Decoder(cfg.resolution, cfg.num_classes, counter, split, fraction)
    ds = ray.data.read_binary_files([_uri(fs, f) for f in files], include_paths=True).map_batches(
        _folder_batch,
        fn_kwargs={"decoder": decoder, "classes": {n: i for i, n in enumerate(names)}},
        batch_size=64,
    )
    return ImageSource(ds, cfg.num_classes, counter)


def _tar_records(data: bytes, shard: str):
    """(image bytes, label text, key) per sample of a webdataset tar."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            prefix = member.name[: len(member.name) - len(base)]
            samples.setdefault(prefix + key, {})[ext.lower()] = tar.extractfile(member).read()
    for key, parts in samples.items():
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), b"")
        label = parts.get("cls", b"-1").decode(errors="replace").strip() or "-1"
        yield image, label, f"{shard}/{key}"


def _tar_batch(batch, decoder: Decoder):
    records = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        try:
            records.extend(_tar_records(data, str(path)))
        except tarfile.TarError as e:
            log.warning("skipping unreadable shard %s: %s", path, e)
            ray.get(decoder.counter.add.remote([str(path)]))
    return decoder.rows(records)


@DATASETS.register("webdataset", config=WebDatasetData)
def build_webdataset(cfg: WebDatasetData, split: Split = "train") -> ImageSource:
    path, fraction = _split_path(cfg, split)
    fs, files = list_files(path, (".tar",))
    counter = SkipCounter.remote()
    decoder = Decoder(cfg.resolution, cfg.num_classes, counter, split, fraction)
    ds = ray.data.read_binary_files([_uri(fs, f) for f in files], include_paths=True).map_batches(
        _tar_batch, fn_kwargs={"decoder": decoder}, batch_size=1
    )
    return ImageSource(ds, cfg.num_classes, counter)


def _parquet_batch(batch, decoder: Decoder, image_column: str, label_column: str):
    records = []
    for value, label, path in zip(
        batch[image_column], batch[label_column], batch["path"], strict=True
    ):
        data, key = value, None
        if isinstance(value, dict):  # Hugging Face datasets' Image feature
            data, key = value.get("bytes"), value.get("path")
        data = data or b""
        key = key or f"{path}#{hashlib.blake2b(data, digest_size=8).hexdigest()}"
        records.append((data, -1 if label is None else label, str(key)))
    return decoder.rows(records)


@DATASETS.register("parquet", config=ParquetData)
def build_parquet(cfg: ParquetData, split: Split = "train") -> ImageSource:
    path, fraction = _split_path(cfg, split)
    fs, files = list_files(path, (".parquet",))
    counter = SkipCounter.remote()
    decoder = Decoder(cfg.resolution, cfg.num_classes, counter, split, fraction)
    ds = ray.data.read_parquet(
        [_uri(fs, f) for f in files],
        columns=[cfg.image_column, cfg.label_column],
        include_paths=True,
    ).map_batches(
        _parquet_batch,
        fn_kwargs={
            "decoder": decoder,
            "image_column": cfg.image_column,
            "label_column": cfg.label_column,
        },
        batch_size=64,
        batch_format="numpy",
    )
    return ImageSource(ds, cfg.num_classes, counter)


def load_images(cfg, split: Split = "train") -> ImageSource:
    """The configured source's split as an :class:`ImageSource`."""
    return DATASETS.build(cfg.name, cfg, split)
