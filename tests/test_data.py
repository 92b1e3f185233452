"""Ray Data sources: each reader on a tiny fixture it writes itself, corrupt files included."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentforge.config import ConfigError, merge_schema
from latentforge.data import ImageFolderData, ParquetData, ShapesData, WebDatasetData
from latentforge.platform.data import expand_braces, load_images
from latentforge.platform.decode import center_crop_arr, decode_image, parse_label
from latentforge.registry import DATASETS
from latentforge.shapes import HOLDOUT_OFFSET, render_shapes

pytestmark = pytest.mark.ray
RES = 16
# (class, colour, size, format): class 0 "cat" is red, class 1 "dog" is blue; odd sizes
GOOD = [
    ("cat", (255, 0, 0), (80, 50), "PNG"),
    ("cat", (250, 5, 0), (50, 81), "JPEG"),
    ("dog", (0, 0, 255), (33, 47), "PNG"),
    ("dog", (0, 5, 250), (120, 61), "JPEG"),
    ("dog", (0, 0, 240), (17, 16), "PNG"),  # smaller than RES: upsampled
]
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"garbage, not an image" * 4


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session):
    """Every test here reads through Ray Data."""


def encode(color, size=(80, 50), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def label_of(cls: str) -> int:
    return int(cls == "dog")


def rows(source) -> list[dict]:
    return sorted(source.dataset.take_all(), key=lambda r: r["id"])


def check_rows(out: list[dict], n: int = len(GOOD)) -> None:
    assert len(out) == n
    assert len({r["id"] for r in out}) == n
    for r in out:
        assert r["image"].shape == (RES, RES, 3) and r["image"].dtype == np.uint8
        assert isinstance(r["id"], str) and r["label"] in (0, 1)
        red = r["image"][..., 0].mean() > r["image"][..., 2].mean()
        assert red == (r["label"] == 0)


def write_tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_folder(root, n_extra: int = 0):
    for i, (cls, color, size, fmt) in enumerate(GOOD):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i}.{fmt.lower()}").write_bytes(encode(color, size, fmt))
    for i in range(n_extra):
        (root / "cat" / f"x{i}.PNG").write_bytes(encode((200, 0, 0), (9, 9)))
    return root


# ----------------------------------------------------------------------- preprocessing


def test_adm_crop_keeps_the_centre():
    # 300x100, thirds green | red | blue: box-halved to 150x50, bicubic to 96x32, the centre
    # 32 columns are the red third
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100, 1] = 255
    img[:, 100:200, 0] = 255
    img[:, 200:, 2] = 255
    out = center_crop_arr(Image.fromarray(img), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 3:-3, 0].min() > 240 and out[:, 3:-3, 1:].max() < 15
    portrait = center_crop_arr(Image.fromarray(img.transpose(1, 0, 2).copy()), 32)
    assert portrait[3:-3, :, 0].min() > 240


def test_adm_crop_box_halves_then_crops_exactly():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    # short side 48 >= 2*24: one box halving to 32x24, no resize (scale 1), crop 4 columns
    blocks = img.reshape(24, 2, 32, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = center_crop_arr(Image.fromarray(img), 24)
    assert np.abs(out.astype(np.float64) - blocks[:, 4:28]).max() <= 1
    # an image already at the resolution passes through unchanged
    sq = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(sq), 24), sq)
    # a 1-pixel checkerboard is averaged by the box halvings, not aliased
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    flat = center_crop_arr(Image.fromarray(board), 64)
    assert flat.min() >= 127 and flat.max() <= 128


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
@pytest.mark.parametrize("size", [(81, 50), (50, 81), (1000, 700), (17, 300)])
def test_adm_crop_shapes_and_modes(mode, size):
    image = Image.new("RGB", size, (10, 200, 30)).convert(mode)
    assert center_crop_arr(image, 64).shape == (64, 64, 3)


def test_decode_and_labels_reject_bad_input():
    assert decode_image(encode((1, 2, 3), (40, 30), "PNG"), 8).shape == (8, 8, 3)
    with pytest.raises(Exception):  # noqa: B017 - PIL raises UnidentifiedImageError
        decode_image(CORRUPT, 8)
    assert parse_label(b" 3\n", 10) == parse_label(3.0, 10) == parse_label(np.int64(3), 10) == 3
    for bad in (None, b"", "x", 2.5, float("nan"), -1, 10):
        with pytest.raises(ValueError):
            parse_label(bad, 10)


def test_expand_braces():
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]


def test_configs_are_registered_and_typed():
    for name, schema in [
        ("shapes", ShapesData),
        ("imagefolder", ImageFolderData),
        ("webdataset", WebDatasetData),
        ("parquet", ParquetData),
    ]:
        assert DATASETS.get(name).config_cls is schema
    cfg = merge_schema(ParquetData, {"name": "parquet", "path": "x", "image_column": "jpg"}, "t")
    assert cfg.image_column == "jpg" and cfg.resolution == 256
    with pytest.raises(ConfigError, match="name"):
        merge_schema(ParquetData, {"name": "imagefolder"}, "t")


def test_shapes_layout_is_checked_at_build():
    for bad, match in [({"position_jitter": 2.0}, "jitter"), ({"scale": [0.3]}, "data.scale")]:
        cfg = merge_schema(ShapesData, {"name": "shapes", **bad}, "t")
        with pytest.raises(ConfigError, match=match):
            load_images(cfg, "train")


# ----------------------------------------------------------------------- sources


def test_imagefolder_counts_labels_and_skips_corrupt(tmp_path):
    root = make_folder(tmp_path / "train")
    (root / "dog" / "broken.png").write_bytes(CORRUPT)
    (root / "dog" / "notes.txt").write_text("not an image, not listed")
    (root / "dog" / ".hidden.png").write_bytes(CORRUPT)  # hidden files are not listed
    source = load_images(ImageFolderData(path=str(root), resolution=RES, holdout_fraction=0.0))
    out = rows(source)
    check_rows(out)
    assert source.class_names == ["cat", "dog"] and source.num_classes == 2
    assert all(r["label"] == label_of(r["id"].split("/")[-2]) for r in out)
    assert source.num_skipped() == 1
    assert source.skipped_ids() == [str(root / "dog" / "broken.png")]


def test_imagefolder_hash_split_is_disjoint_and_complete(tmp_path):
    root = make_folder(tmp_path, n_extra=35)
    cfg = ImageFolderData(path=str(root), resolution=RES, holdout_fraction=0.3)
    train = {r["id"] for r in load_images(cfg, "train").dataset.take_all()}
    held = {r["id"] for r in load_images(cfg, "holdout").dataset.take_all()}
    assert train.isdisjoint(held) and len(train | held) == 40 and 4 <= len(held) <= 20
    again = {r["id"] for r in load_images(cfg, "holdout").dataset.take_all()}
    assert again == held


def test_subset_draws_across_classes_not_the_first_folders(tmp_path):
    # ImageNet-style listing: 8 class folders of 6 files; the first 12 files in listing order
    # are classes 0-1 only, an evaluation's reference set must come from all over the split
    names = [f"c{k}" for k in range(8)]
    for k, name in enumerate(names):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.png").write_bytes(encode((30 * k, 0, 0), (9, 9)))
    cfg = ImageFolderData(path=str(tmp_path), resolution=RES, holdout_fraction=0.0)
    first = [r["label"] for r in sorted(load_images(cfg).dataset.take_all(), key=lambda r: r["id"])]
    assert set(first[:12]) == {0, 1}
    picked = rows(load_images(cfg, subset=12))
    assert len(picked) == 12 and len({r["label"] for r in picked}) >= 5
    assert [r["id"] for r in rows(load_images(cfg, subset=12))] == [r["id"] for r in picked]
    assert len(rows(load_images(cfg, subset=100))) == 48


def test_training_rows_mix_class_ordered_data_once():
    import ray

    from latentforge.platform.data import training_rows

    ordered = ray.data.from_items([{"label": i // 50} for i in range(500)], override_num_blocks=10)
    folder = ImageFolderData(path="/data", resolution=RES)
    rows_ = training_rows(ordered, folder, seed=0).take_all()
    assert sorted(r["label"] for r in rows_) == [i // 50 for i in range(500)]  # all, once
    assert len({r["label"] for r in rows_[:32]}) >= 6  # a batch's worth spans the classes
    again = training_rows(ordered, folder, seed=0).take_all()
    assert [r["label"] for r in again] == [r["label"] for r in rows_]
    assert training_rows(ordered, ShapesData(), seed=0) is ordered  # mixed by construction
    # streamed: read anew each epoch, so no all-to-all pass; the listing is shuffled instead
    assert training_rows(ordered, folder, seed=0, stream=True) is ordered


def test_training_listing_is_a_seeded_permutation_across_classes(tmp_path):
    from latentforge.platform.data import listing_seed, shuffled

    items = list(range(100))
    assert shuffled(items, None) is items
    assert shuffled(items, 3) == shuffled(items, 3) != shuffled(items, 4)
    assert sorted(shuffled(items, 3)) == items
    assert listing_seed(ShapesData(), 7) is None  # ids cycle through the classes already
    assert listing_seed(ImageFolderData(path="/x"), 7) == 7
    root = tmp_path / "folder"
    for c in range(6):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(8):
            (root / f"c{c}" / f"{i}.png").write_bytes(encode((40 * c, 0, 0), (9, 9)))
    cfg = ImageFolderData(path=str(root), resolution=RES)
    listed = load_images(cfg, seed=5)
    assert listed.rows == 48
    read = [r["id"] for r in listed.dataset.take_all()]  # one read task: listing order
    assert sorted(read) == sorted(r["id"] for r in load_images(cfg).dataset.take_all())
    assert len({i.rsplit("/", 2)[-2] for i in read[:8]}) >= 4  # not folder by folder
    assert read == [r["id"] for r in load_images(cfg, seed=5).dataset.take_all()]


@pytest.mark.parametrize(
    ("requested", "nbytes", "latents", "mode"),
    [
        ("auto", 10 << 20, False, "memory"),  # fits in a quarter of the 1 GiB store
        ("auto", 600 << 20, False, "stream"),  # does not
        ("auto", None, False, "stream"),  # size unknown before reading (tar shards)
        ("auto", 600 << 20, True, "memory"),  # latents: one class per shard streams badly
        ("memory", 600 << 20, False, "memory"),
        ("stream", 10 << 20, True, "stream"),
    ],
)
def test_training_data_mode(requested, nbytes, latents, mode):
    from latentforge.platform.data import training_data_mode

    assert training_data_mode(requested, nbytes, 1 << 30, latents) == mode


def test_imagefolder_holdout_path_uses_training_classes(tmp_path):
    train = make_folder(tmp_path / "train")
    val = tmp_path / "val"
    (val / "dog").mkdir(parents=True)
    (val / "dog" / "v.png").write_bytes(encode((0, 0, 255)))
    (val / "bird").mkdir()  # not a training class: its images are skipped
    (val / "bird" / "b.png").write_bytes(encode((0, 255, 0)))
    cfg = ImageFolderData(path=str(train), holdout_path=str(val), resolution=RES)
    assert len(load_images(cfg, "train").dataset.take_all()) == len(GOOD)  # no hash split
    held = load_images(cfg, "holdout")
    out = rows(held)
    assert [(r["id"].rsplit("/", 2)[-2], r["label"]) for r in out] == [("dog", 1)]
    assert held.num_skipped() == 1 and held.skipped_ids()[0].endswith("bird/b.png")


def wds_members(prefix: str, samples) -> list[tuple[str, bytes]]:
    members = []
    for i, (cls, color, size, fmt) in enumerate(samples):
        ext = "jpg" if fmt == "JPEG" else "png"
        members += [(f"{prefix}{i:03d}.{ext}", encode(color, size, fmt))]
        members += [(f"{prefix}{i:03d}.cls", b"%d" % label_of(cls))]
    return members


def test_webdataset_skips_corrupt_unlabelled_and_truncated(tmp_path):
    members = wds_members("s", GOOD)
    write_tar(tmp_path / "shard-000000.tar", members[:6])
    bad = [("bad.jpg", CORRUPT), ("bad.cls", b"1"), ("nolabel.png", encode((9, 9, 9)))]
    write_tar(tmp_path / "shard-000001.tar", members[6:] + bad)
    # a shard cut inside its second image: the first sample is kept, the shard counted
    write_tar(tmp_path / "cut.tar", wds_members("t", GOOD[:2]))
    with tarfile.open(tmp_path / "cut.tar") as tar:
        cut = tar.getmember("t001.jpg").offset_data + 10
    (tmp_path / "shard-000002.tar").write_bytes((tmp_path / "cut.tar").read_bytes()[:cut])
    cfg = WebDatasetData(path=str(tmp_path / "shard-{000000..000002}.tar"), resolution=RES)
    cfg.num_classes, cfg.holdout_fraction = 2, 0.0
    source = load_images(cfg)
    out = rows(source)
    check_rows(out, len(GOOD) + 1)
    keys = [r["id"].rsplit("/", 1)[-1] for r in out]
    assert keys == [f"shard-00000{i // 3}.tar#s{i:03d}" for i in range(5)] + [
        "shard-000002.tar#t000"
    ]
    assert [r["label"] for r in out] == [label_of(c) for c, *_ in GOOD] + [0]
    skipped = sorted(k.rsplit("/", 1)[-1] for k in source.skipped_ids())
    assert skipped == ["shard-000001.tar#bad", "shard-000001.tar#nolabel", "shard-000002.tar"]


def test_webdataset_hash_split_is_disjoint(tmp_path):
    members = wds_members("k", [("cat", (i, 0, 0), (9, 9), "PNG") for i in range(30)])
    write_tar(tmp_path / "a.tar", members[:30])
    write_tar(tmp_path / "b.tar", members[30:])
    cfg = WebDatasetData(path=str(tmp_path), resolution=8, num_classes=1, holdout_fraction=0.3)
    train = {r["id"] for r in load_images(cfg, "train").dataset.take_all()}
    held = {r["id"] for r in load_images(cfg, "holdout").dataset.take_all()}
    assert train.isdisjoint(held) and len(train | held) == 30 and 3 <= len(held) <= 15


@pytest.mark.parametrize("layout", ["bytes", "struct"])
def test_parquet_skips_corrupt_and_unlabelled_rows(tmp_path, layout):
    images = [encode(c, s, f) for _, c, s, f in GOOD] + [CORRUPT, encode((0, 0, 255))]
    labels = [label_of(cls) for cls, *_ in GOOD] + [1, None]
    if layout == "struct":  # Hugging Face datasets' Image feature
        images = [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)]
    table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
    pq.write_table(table.slice(0, 4), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(4), tmp_path / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(0, 2), tmp_path / "validation-00000.parquet")  # not matched
    cfg = ParquetData(path=str(tmp_path / "train-*.parquet"), resolution=RES, num_classes=2)
    cfg.holdout_fraction = 0.0
    source = load_images(cfg)
    out = rows(source)
    check_rows(out)
    assert [r["label"] for r in out] == [label_of(cls) for cls, *_ in GOOD]
    second = str(tmp_path / "train-00001-of-00002.parquet")
    assert sorted(source.skipped_ids()) == [f"{second}#1", f"{second}#2"]


def test_parquet_unreadable_file_is_counted(tmp_path):
    pq.write_table(pa.table({"image": [encode((255, 0, 0))], "label": [0]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    cfg = ParquetData(path=str(tmp_path), resolution=RES, num_classes=2, holdout_fraction=0.0)
    source = load_images(cfg)
    assert len(source.dataset.take_all()) == 1
    assert source.skipped_ids() == [str(tmp_path / "b.parquet")]


def test_config_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    for cfg in (
        ImageFolderData(path=missing),
        WebDatasetData(path=missing),
        ParquetData(path=missing + "/*.parquet"),
    ):
        with pytest.raises(ConfigError, match="nowhere"):
            load_images(cfg)
    for cfg in (ImageFolderData(path=""), ParquetData(path="")):
        with pytest.raises(ConfigError, match="data.path is empty"):
            load_images(cfg)
    with pytest.raises(ConfigError, match="no .tar files"):
        load_images(WebDatasetData(path=str(tmp_path)))
    pq.write_table(pa.table({"jpg": [b"x"], "cls": [0]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match="columns"):
        load_images(ParquetData(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="holdout"):
        load_images(ParquetData(path=str(tmp_path), holdout_fraction=0.0), "holdout")


def test_shapes_is_deterministic_and_matches_renderer():
    cfg = ShapesData(resolution=RES, num_images=60, holdout_images=10)
    source = load_images(cfg)
    a, b = rows(source), rows(load_images(cfg))
    assert len(a) == 60 and source.num_skipped() == 0
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    ids = sorted(int(r["id"]) for r in a)
    assert ids == list(range(60))
    ref, lab = render_shapes(ids, RES, seed=0, num_classes=10)
    by_id = {int(r["id"]): r for r in a}
    assert all(np.array_equal(by_id[i]["image"], ref[i]) for i in ids)
    assert [by_id[i]["label"] for i in ids] == lab.tolist()
    held = load_images(cfg, "holdout").dataset.take_all()
    assert sorted(int(r["id"]) for r in held) == [HOLDOUT_OFFSET + i for i in range(10)]


def test_skip_leaves_ids_out_before_reading_or_decoding(tmp_path):
    """A resumed extraction's finished ids: never read (image folders) nor decoded (tar
    members, rendered shapes), so a file that broke since is not even counted."""
    root = make_folder(tmp_path / "train")
    (root / "dog" / "broken.png").write_bytes(CORRUPT)
    cfg = ImageFolderData(path=str(root), resolution=RES, holdout_fraction=0.0)
    done = {str(root / "dog" / "broken.png"), str(root / "cat" / "0.png")}
    source = load_images(cfg, skip=done.__contains__)
    out = rows(source)
    assert len(out) == len(GOOD) - 1 and not done & {r["id"] for r in out}
    assert source.num_skipped() == 0  # broken.png was never opened

    write_tar(
        tmp_path / "s.tar", wds_members("s", GOOD) + [("bad.jpg", CORRUPT), ("bad.cls", b"1")]
    )
    wds = WebDatasetData(path=str(tmp_path / "s.tar"), resolution=RES)
    wds.num_classes, wds.holdout_fraction = 2, 0.0
    source = load_images(wds, skip=lambda i: i.endswith(("#bad", "#s000")))
    assert [r["id"][-4:] for r in rows(source)] == ["s001", "s002", "s003", "s004"]
    assert source.num_skipped() == 0

    shapes = ShapesData(resolution=RES, num_images=20)
    out = rows(load_images(shapes, skip=lambda i: int(i) % 2 == 0))
    ids = sorted(int(r["id"]) for r in out)
    assert ids == list(range(1, 20, 2))
    ref, _ = render_shapes(ids, RES, seed=0, num_classes=10)
    by_id = {int(r["id"]): r["image"] for r in out}
    assert all(np.array_equal(by_id[i], ref[k]) for k, i in enumerate(ids))
