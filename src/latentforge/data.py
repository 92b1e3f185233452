"""Schemas of the data sources: ``shapes`` (embedded), ``imagefolder``, ``webdataset``,
``parquet``. Their Ray Data readers live in :mod:`latentforge.platform.data`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentforge.config import DataConfig
from latentforge.registry import DATASETS, Entry
from latentforge.shapes import JITTER as SHAPES_JITTER
from latentforge.shapes import NUM_CLASSES
from latentforge.shapes import SCALE as SHAPES_SCALE

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".bmp"]


@dataclass
class ShapesData(DataConfig):
    """The embedded procedural dataset (see ``latentforge.shapes``)."""

    name: Literal["shapes"] = "shapes"
    resolution: int = 64
    num_images: int = 20000
    seed: int = 0
    num_classes: int = NUM_CLASSES
    holdout_images: int = 2000
    scale: list[float] = field(default_factory=lambda: list(SHAPES_SCALE))  # radius range
    position_jitter: float = SHAPES_JITTER  # 0: centred; 1: anywhere (the assets' layout)


@dataclass
class FileData(DataConfig):
    """Fields shared by the file-based sources."""

    name: str = ""
    path: str = ""  # directory, file, or glob/brace pattern; local or s3:// / gs://
    resolution: int = 256
    holdout_path: str | None = None  # e.g. ImageNet val; else a hash split of the keys
    holdout_fraction: float = 0.01


@dataclass
class ImageFolderData(FileData):
    """``root/<class name>/.../<image>``; class index = position in sorted class names."""

    name: Literal["imagefolder"] = "imagefolder"
    num_classes: int | None = None  # None: the number of class folders
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))


@dataclass
class WebDatasetData(FileData):
    """Tar shards with ``<key>.jpg|jpeg|png|webp`` and ``<key>.cls`` (text int) members."""

    name: Literal["webdataset"] = "webdataset"
    num_classes: int = 1000


@dataclass
class ParquetData(FileData):
    """Parquet files: encoded image bytes (or a ``{bytes, path}`` struct) and an int label."""

    name: Literal["parquet"] = "parquet"
    num_classes: int = 1000
    image_column: str = "image"
    label_column: str = "label"


for _schema in (ShapesData, ImageFolderData, WebDatasetData, ParquetData):
    DATASETS.add(Entry(_schema.name, _schema))
