"""Decoding the records of the file sources into image rows: the ADM centre crop (Dhariwal
& Nichol 2021, openai/guided-diffusion: halve with a box filter while the short side is at
least 2R, bicubic-resize the short side to R, crop the centre), labels, the hash split of
the held-out images, and the counting of skipped (unreadable) images across Ray tasks."""

from __future__ import annotations

import hashlib
import io
import logging
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import ray
from PIL import Image

log = logging.getLogger(__name__)
Split = Literal["train", "holdout"]
ROWS_PER_BATCH = 64  # decoded rows per output batch of the file sources


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop of a PIL image to uint8 (resolution, resolution, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:  # cheap anti-aliased halving first
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> ADM-cropped uint8 (resolution, resolution, 3)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return center_crop_arr(image, resolution)


def parse_label(value: Any, num_classes: int) -> int:
    """A class index from an int, an integral float or (byte) text; ValueError otherwise."""
    if value is None:
        raise ValueError("missing label")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        label = int(value.strip())
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"label {value!r} is not an integer")
        label = int(value)
    else:
        label = operator.index(value)
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, {num_classes})")
    return label


def _key_hash(key: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.blake2b((salt + key).encode(), digest_size=8).digest(), "big")


def in_holdout(key: str, fraction: float) -> bool:
    """Deterministic hash split of keys (used when no holdout_path is given)."""
    return (_key_hash(key) % 1_000_000) < fraction * 1_000_000


def hashed_order(items: list[str], key: Callable[[str], str] = str) -> list[str]:
    """``items`` in the order of a hash of their keys: a fixed pseudo-random order that does
    not follow the listing's (class-sorted) one, so any prefix draws from every class."""
    return sorted(items, key=lambda item: _key_hash(key(item), "subset:"))


@ray.remote(num_cpus=0)
class SkipCounter:
    """Collects the ids of skipped images across Ray tasks (a re-read counts once)."""

    def __init__(self) -> None:
        self.ids: dict[str, None] = {}  # insertion-ordered set

    def add(self, ids: list[str]) -> None:
        self.ids.update(dict.fromkeys(ids))

    def get(self) -> list[str]:
        return list(self.ids)


class ImageSource:
    """A lazy Ray Dataset of ``image``/``label``/``id`` rows plus its skip counter and, where
    the listing tells it, its number of rows."""

    def __init__(
        self,
        dataset: ray.data.Dataset,
        num_classes: int,
        counter: Any = None,
        class_names: list[str] | None = None,
        rows: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_classes = num_classes
        self.class_names = class_names
        self.rows = rows  # at most this many rows, where known before reading
        self._counter = counter

    def skipped_ids(self) -> list[str]:
        """Ids skipped so far (complete once the dataset has been consumed)."""
        return ray.get(self._counter.get.remote()) if self._counter is not None else []

    def num_skipped(self) -> int:
        return len(self.skipped_ids())


class Record(NamedTuple):
    """One image before decoding; ``data`` may be bytes, a reader, or the read's error."""

    id: str
    key: str | None  # location-independent key for the hash split; None: in every split
    data: bytes | Callable[[], bytes] | BaseException | None
    label: Any


@dataclass
class RecordDecoder:
    """Turns records into row batches; logs, counts and drops the bad ones."""

    resolution: int
    num_classes: int
    counter: Any
    split: Split
    holdout_fraction: float | None  # None: no hash split (explicit holdout_path)
    skip: Callable[[str], bool] | None = None  # ids the caller has: neither read nor decoded

    def keep(self, key: str | None) -> bool:
        if self.holdout_fraction is None or key is None:
            return True
        return in_holdout(key, self.holdout_fraction) == (self.split == "holdout")

    def row(self, rec: Record) -> tuple[np.ndarray, int]:
        data = rec.data() if callable(rec.data) else rec.data
        if isinstance(data, BaseException):
            raise data
        if not data:
            raise ValueError("no image data")
        label = parse_label(rec.label, self.num_classes)
        return decode_image(data, self.resolution), label

    def decode(self, records: Iterable[Record]) -> Iterator[dict[str, np.ndarray]]:
        images, labels, ids, bad = [], [], [], []
        for rec in records:
            if (self.skip is not None and self.skip(rec.id)) or not self.keep(rec.key):
                continue
            try:
                image, label = self.row(rec)
            except Exception as e:  # noqa: BLE001 - any unreadable input is skipped
                log.warning("skipping %s: %s: %s", rec.id, type(e).__name__, e)
                bad.append(rec.id)
                continue
            images.append(image)
            labels.append(label)
            ids.append(rec.id)
            if len(ids) >= ROWS_PER_BATCH:
                self.report(bad)
                yield self.batch(images, labels, ids)
                images, labels, ids, bad = [], [], [], []
        self.report(bad)
        if ids:
            yield self.batch(images, labels, ids)

    def report(self, bad: list[str]) -> None:
        if bad:
            ray.get(self.counter.add.remote(bad))

    @staticmethod
    def batch(images: list, labels: list, ids: list) -> dict[str, np.ndarray]:
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, dtype=np.int64),
            "id": np.asarray(ids, dtype=object),
        }
