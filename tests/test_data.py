"""Ray Data sources: each reader on a tiny fixture it writes itself, corrupt files included."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from latentforge.platform.data import (
    ImageFolderData,
    ParquetData,
    ShapesData,
    WebDatasetData,
    center_crop_arr,
    load_images,
)
from latentforge.shapes import HOLDOUT_OFFSET, render_shapes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def png(color, size=(80, 50), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


GOOD = [
    ("cat", (255, 0, 0)),
    ("cat", (250, 5, 0)),
    ("dog", (0, 0, 255)),
    ("dog", (0, 5, 250)),
    ("dog", (0, 0, 240)),
]
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def rows(source):
    out = source.dataset.take_all()
    return sorted(out, key=lambda r: r["id"])


def check_rows(out, res=16):
    assert len(out) == len(GOOD)
    for r in out:
        assert r["image"].shape == (res, res, 3) and r["image"].dtype == np.uint8
        # red images are class 0 ("cat"), blue ones class 1 ("dog")
        assert (r["image"][..., 0].mean() > r["image"][..., 2].mean()) == (r["label"] == 0)


def test_imagefolder_with_corrupt_file(tmp_path):
    for i, (cls, color) in enumerate(GOOD):
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / f"{i}.{'jpg' if i % 2 else 'png'}").write_bytes(
            png(color, fmt="JPEG" if i % 2 else "PNG")
        )
    (tmp_path / "dog" / "broken.png").write_bytes(CORRUPT)
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not listed")
    source = load_images(
        ImageFolderData(path=str(tmp_path), resolution=16, num_classes=2, holdout_fraction=0.0)
    )
    check_rows(rows(source))
    assert source.num_skipped() == 1 and source.skipped_ids()[0].endswith("broken.png")


def test_webdataset_with_corrupt_member(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        members = [(f"s{i:03d}.png", png(c)) for i, (_, c) in enumerate(GOOD)]
        members += [
            (f"s{i:03d}.cls", str(int(cls == "dog")).encode()) for i, (cls, _) in enumerate(GOOD)
        ]
        members += [("bad.jpg", CORRUPT), ("bad.cls", b"1"), ("nolabel.png", png((9, 9, 9)))]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = load_images(
        WebDatasetData(path=str(tmp_path), resolution=16, num_classes=2, holdout_fraction=0.0)
    )
    check_rows(rows(source))
    assert sorted(k.rsplit("/", 1)[-1] for k in source.skipped_ids()) == ["bad", "nolabel"]


@pytest.mark.parametrize("layout", ["bytes", "struct"])
def test_parquet_with_corrupt_row(tmp_path, layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [png(c) for _, c in GOOD] + [CORRUPT]
    labels = [int(cls == "dog") for cls, _ in GOOD] + [1]
    if layout == "struct":  # Hugging Face datasets' Image feature
        images = [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)]
    pq.write_table(pa.table({"image": images, "label": labels}), tmp_path / "train-0.parquet")
    source = load_images(
        ParquetData(path=str(tmp_path), resolution=16, num_classes=2, holdout_fraction=0.0)
    )
    check_rows(rows(source))
    assert source.num_skipped() == 1


def test_hash_split_is_disjoint_and_complete(tmp_path):
    for i in range(40):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(png((i, i, i), size=(8, 8)))
    cfg = ImageFolderData(path=str(tmp_path), resolution=8, num_classes=1, holdout_fraction=0.25)
    train = {r["id"] for r in load_images(cfg, "train").dataset.take_all()}
    held = {r["id"] for r in load_images(cfg, "holdout").dataset.take_all()}
    assert train.isdisjoint(held) and len(train | held) == 40 and 0 < len(held) < 20


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(ImageFolderData(path=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="empty"):
        load_images(ParquetData(path=""))


def test_shapes_source_is_deterministic_and_matches_renderer():
    cfg = ShapesData(resolution=16, num_images=60, holdout_images=10)
    a = rows(load_images(cfg))
    b = rows(load_images(cfg))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    first = next(r for r in a if r["id"] == "7")
    ref, lab = render_shapes([7], 16)
    assert np.array_equal(first["image"], ref[0]) and first["label"] == lab[0]
    held = load_images(cfg, "holdout").dataset.take_all()
    assert len(held) == 10 and min(int(r["id"]) for r in held) == HOLDOUT_OFFSET


def test_adm_center_crop():
    # 300x100: left/right thirds green, centre third red -> the centre crop is all red
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100, 1] = img[:, 200:, 1] = 255
    img[:, 100:200, 0] = 255
    out = center_crop_arr(Image.fromarray(img), 32)
    assert out.shape == (32, 32, 3)
    assert out[4:-4, 4:-4, 0].min() > 200 and out[4:-4, 4:-4, 1].max() < 40
    # large images are box-halved first, then bicubic-resized: still exact size
    assert center_crop_arr(Image.new("RGB", (1000, 700)), 64).shape == (64, 64, 3)
