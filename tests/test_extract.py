"""Latent extraction: id-keyed shards, flip latents, manifest, and resume after a kill."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from latentforge.config import from_dict, load_experiment, to_dict
from latentforge.models import build_tokenizer, state_dict_of
from latentforge.platform.extract import (
    ExtractionError,
    ShardTasks,
    extract,
    latent_dataset,
    latent_nbytes,
)
from latentforge.platform.extract import (
    LatentEncoder as Encoder,
)
from latentforge.platform.pipeline import stage_hashes
from latentforge.platform.shards import (
    Store,
    finalize_shard,
    id_order,
    parse_id,
    shard_of,
    write_manifest,
)
from latentforge.shapes import render_shapes
from latentforge.training.objectives import flip_augment
from tests.test_config import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"
# 200 images in shards of 64: three full shards and a partial one; batches of 32
OVERRIDES = [
    "data.num_images=200",
    "extract.batch_size=32",
    "extract.shard_rows=64",
    "extract.vfm=local:shapes-vit",
]

# the plugin tokenizer family ``vavae-failing``: a kill inside the encoder actors
FAILING = Path(__file__).resolve().parent / "families" / "failing_encoder.py"


def failing_encoder(cfg, after_calls: int, marker: Path):
    """``cfg`` with its tokenizer made the plugin family ``vavae-failing``: the same fields
    and weights, but the encoder actor raises after ``after_calls`` encode calls unless
    ``marker`` exists (the failure writes it, so a rerun of this experiment encodes on).
    The actors rebuild the experiment and so import the plugin themselves."""
    node = to_dict(cfg)
    node["plugins"] = [*node["plugins"], str(FAILING)]
    node["tokenizer"] |= {
        "name": "vavae-failing",
        "fail_after_calls": after_calls,
        "fail_marker": str(marker),
    }
    return from_dict(node)


def encoded_on_disk(out: Path) -> set[str]:
    """The ids a killed extraction left encoded: in part files or in finished shards."""
    files = list(out.glob("parts/*/*.parquet"))
    files += [m.with_suffix(".parquet") for m in out.glob("shards/*.json")]
    return {i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def read_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("shards/*")) + [out / "manifest.json", out / "stats.json"]
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


def column(table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy()  # (N, *shape) tensor column


def test_shard_keys_depend_on_ids_only():
    assert parse_id("17") == ("", 17)
    assert parse_id("s3://b/x.parquet#17") == ("s3://b/x.parquet", 17)
    assert parse_id("/d/000.tar#n01_5") == ("/d/000.tar", None)
    assert parse_id("/root/dog/a.jpg") == ("/root/dog", None)
    assert shard_of("0", 64) == shard_of("63", 64) == "000000"
    assert shard_of("64", 64) == "000001"
    assert shard_of("/root/dog/a.jpg", 64) == shard_of("/root/dog/b.jpg", 64)
    assert shard_of("/root/dog/a.jpg", 64) != shard_of("/root/cat/a.jpg", 64)
    assert shard_of("f.parquet#70", 64).endswith("-000001")
    assert sorted(["10", "9", "100"], key=id_order) == ["9", "10", "100"]


def test_flip_augment_is_seeded_and_mirrors_features():
    z = torch.randn(64, 4, 8, 8)
    batch = {"latent": z, "latent_flip": z.flip(-1) + 100.0, "vfm": torch.randn(64, 6, 8, 8)}
    a, fa = flip_augment(batch, torch.Generator().manual_seed(3))
    b, fb = flip_augment(batch, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(fa, fb)  # deterministic given the seed
    flipped = (a > 50).flatten(1).all(1)
    assert (a > 50).flatten(1).any(1).eq(flipped).all()  # whole samples switch
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(fa[flipped], batch["vfm"][flipped].flip(-1))
    assert torch.equal(fa[~flipped], batch["vfm"][~flipped])
    plain, feats = flip_augment({"latent": z})
    assert torch.equal(plain, z) and feats is None


@pytest.fixture
def threads():
    """Encoder() sets torch's thread count for its actor; keep this process's."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_shards_do_not_depend_on_batching(tmp_path, threads):
    """The same shards whatever the batches and their order (no Ray: the encoder, part
    writer and shard writer called directly); without flips, no ``latent_flip``."""
    cfg = load_experiment(SMOKE, [*OVERRIDES[:3], "extract.flip=false"])
    weights = tmp_path / "tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
    images, labels = render_shapes(range(100), cfg.data.resolution, cfg.data.seed)
    ids = np.arange(100).astype(str).astype(object)

    def run(out: Path, batches: list[np.ndarray]) -> dict[str, bytes]:
        store = Store.open(out)
        encoder = Encoder(to_dict(cfg), str(weights), store)
        for idx in batches:
            encoder({"image": images[idx], "label": labels[idx], "id": ids[idx]})
        for name in sorted(p.name for p in (out / "parts").iterdir()):
            finalize_shard(store, name, cfg.extract.shard_rows)
        write_manifest(cfg, store, {"num_skipped": 0, "skipped_ids": []})
        return read_bytes(out)

    shuffled = np.random.default_rng(0).permutation(100)
    one_go = run(tmp_path / "a", [np.arange(100)])
    assert run(tmp_path / "b", np.split(shuffled, [7, 50, 51])) == one_go
    table = pq.read_table(tmp_path / "a" / "shards" / "shard-000001.parquet")
    assert table.column_names == ["id", "label", "latent"]
    stats = json.loads(one_go["stats.json"])
    assert stats["count"] == 100 and stats["samples"] == 100 * 8 * 8 and not stats["flip"]
    assert "normalization" not in stats  # per channel: stats.json as it has always been


def test_trained_tokenizer_loads_without_training_only_files(tmp_path, threads):
    """Extraction actors and sampling tasks load the stage's weights only: the VFM, LPIPS
    and the published weights training started from may be absent on their node."""
    from latentforge.models import load_tokenizer

    cfg = load_experiment(SMOKE, [f"run_dir={tmp_path}", *OVERRIDES])
    torch.manual_seed(0)
    trained = build_tokenizer(cfg)
    assert trained.linear_proj is not None  # trained with VF alignment
    save_file(state_dict_of(trained), str(tmp_path / "model.safetensors"))
    missing = str(tmp_path / "missing.safetensors")
    remote = load_experiment(
        SMOKE,
        [
            f"run_dir={tmp_path}",
            *OVERRIDES,
            "tokenizer.vfm=timm:vit_large_patch14_dinov2.lvd142m",
            f"tokenizer.vfm_weights={missing}",
            "tokenizer.perceptual=lpips",
            f"tokenizer.weights={missing}",
        ],
    )
    with pytest.raises(FileNotFoundError):  # training would need them
        build_tokenizer(remote)
    model = load_tokenizer(remote, tmp_path / "model.safetensors")
    assert model.vfm is None and model.perceptual is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = trained.eval().decode(trained.encode(x))
        assert torch.equal(model.decode(model.encode(x)), expected)


def test_bfloat16_latents_are_rounded_to_bf16(tmp_path, threads):
    cfg = load_experiment(SMOKE, [*OVERRIDES[:3], "extract.dtype=bfloat16"])
    weights = tmp_path / "tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
    images, _ = render_shapes(range(4), cfg.data.resolution, cfg.data.seed)
    out = Encoder(to_dict(cfg), str(weights), Store.open(tmp_path / "x")).encode(images)
    for name in ("latent", "latent_flip"):
        z = torch.from_numpy(out[name])
        assert out[name].dtype == np.float32 and torch.equal(z.bfloat16().float(), z), name
    cfg32 = load_experiment(SMOKE, [*OVERRIDES[:3]])
    full = Encoder(to_dict(cfg32), str(weights), Store.open(tmp_path / "y")).encode(images)
    assert not np.array_equal(full["latent"], out["latent"])  # fp32 keeps more bits


def test_extract_vfm_input_size_is_configurable(tmp_path, threads):
    # REPA feeds DINOv2 224 px (a 16 x 16 grid at 256 px), not the VFM's own 518
    cfg = load_experiment(SMOKE, [*OVERRIDES[:3], "extract.vfm=local:shapes-vit"])
    weights = tmp_path / "tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
    images, _ = render_shapes(range(2), cfg.data.resolution, cfg.data.seed)
    for extra, grid in (([], (8, 8)), (["extract.vfm_resize=64"], (16, 16))):
        run = load_experiment(SMOKE, [*OVERRIDES[:3], "extract.vfm=local:shapes-vit", *extra])
        out = Encoder(to_dict(run), str(weights), Store.open(tmp_path / "x")).encode(images)
        assert out["vfm"].shape == (2, 128, *grid)
    resized = load_experiment(SMOKE, ["extract.vfm=local:shapes-vit", "extract.vfm_resize=64"])
    assert stage_hashes(resized)["extract"] != stage_hashes(cfg)["extract"]


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    cfg = load_experiment(SMOKE, [f"run_dir={root}", *OVERRIDES])
    torch.manual_seed(0)
    weights = root / "tokenizer.safetensors"
    save_file(state_dict_of(build_tokenizer(cfg)), str(weights))
    full = root / "full"
    stats = extract(cfg, weights, full, log=lambda *_: None)
    return cfg, weights, root, full, stats


@pytest.mark.ray
@pytest.mark.slow
def test_manifest_and_shards(setup):
    cfg, _, _, full, stats = setup
    manifest = json.loads((full / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["000000", "000001", "000002", "000003"]
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 64, 8]
    assert manifest["shards"][3]["id_range"] == [192, 256]
    assert manifest["count"] == stats["count"] == 200 and manifest["flip"]
    assert sorted(p.name for p in full.iterdir()) == ["manifest.json", "shards", "stats.json"]
    latents, flips = [], []
    for k, entry in enumerate(manifest["shards"]):
        data = (full / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        table = pq.read_table(full / entry["file"])
        assert table.column_names == ["id", "label", "latent", "latent_flip", "vfm", "vfm_cls"]
        ids = [int(i) for i in table.column("id").to_pylist()]
        assert ids == list(range(64 * k, min(64 * (k + 1), 200)))  # sorted, the id range
        assert [entry["first_id"], entry["last_id"]] == [str(ids[0]), str(ids[-1])]
        latents.append(column(table, "latent"))
        flips.append(column(table, "latent_flip"))
    both = np.concatenate(latents + flips).astype(np.float64)
    assert stats["samples"] == both.size // 4 and stats["seed"] == cfg.data.seed
    assert np.allclose(stats["mean"], both.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(stats["std"], both.std(axis=(0, 2, 3)), atol=1e-9)
    assert stats["vfm_shape"][1:] == [8, 8] and stats["vfm_cls_dim"] == stats["vfm_shape"][0]
    logs = []
    assert extract(cfg, "unused", full, log=logs.append) == json.loads(
        (full / "stats.json").read_text()
    )
    assert any("complete" in line for line in logs)


@pytest.mark.ray
@pytest.mark.slow
def test_latent_dataset_order_and_size_estimate(setup, monkeypatch):
    """Seeded reads list the shards in a permuted order (Ray Data then groups small files
    into read tasks as it likes); the size estimate (what ``ray.training_data=auto``
    compares with the object store) is that of the columns actually read."""
    import ray

    from latentforge.platform.data import shuffled

    _, _, _, full, _ = setup
    manifest = json.loads((full / "manifest.json").read_text())
    listed = [str(full / s["file"]) for s in manifest["shards"]]
    calls, read = [], ray.data.read_parquet
    monkeypatch.setattr(ray.data, "read_parquet", lambda p, **kw: calls.append(p) or read(p, **kw))
    rows = latent_dataset(full, seed=2).take_all()
    assert calls == [shuffled(listed, 2)] and shuffled(listed, 2) != listed
    assert len(rows) == 200
    for vfm, cls in ((False, False), (True, True)):
        rows = latent_dataset(full, vfm=vfm, cls=cls).take_all()
        actual = sum(np.asarray(v).nbytes for r in rows for v in r.values())
        estimate = latent_nbytes(full, vfm=vfm, cls=cls)
        assert actual <= estimate <= 1.05 * actual, (estimate, actual)


@pytest.mark.ray
@pytest.mark.slow
def test_latents_held_in_memory_keep_the_manifest_order(setup):
    """Materialised for training, the latents come in manifest order, every time: Ray
    Data's default keeps blocks in the order its threaded reads finish, and a rerun of the
    stage (a resumed job) would train on other batches."""
    from latentforge.platform.train import training_data

    cfg, _, root, full, _ = setup
    manifest = json.loads((full / "manifest.json").read_text())
    expected = np.concatenate(
        [column(pq.read_table(full / s["file"]), "latent") for s in manifest["shards"]]
    )
    for _ in range(2):
        data = latent_dataset(full), latent_nbytes(full)
        ds, mode = training_data(cfg, "generator", *data, log=lambda *_: None)
        assert mode == "memory"
        assert np.array_equal(np.stack([r["latent"] for r in ds.take_all()]), expected)


@pytest.mark.ray
@pytest.mark.slow
def test_flip_latent_is_the_encoding_of_the_flipped_image(setup, threads):
    cfg, weights, _, full, _ = setup
    table = pq.read_table(full / "shards" / "shard-000001.parquet")
    ids = [int(i) for i in table.column("id").to_pylist()[5:12]]
    images, _ = render_shapes(ids, cfg.data.resolution, cfg.data.seed, cfg.data.num_classes)
    encoder = Encoder(to_dict(cfg), str(weights), Store.open(full))
    mine = encoder.encode(images[:, :, ::-1])  # mirrored uint8 (B, H, W, 3)
    stored = column(table, "latent_flip")[5:12]
    assert np.array_equal(mine["latent"], stored)  # bit for bit: fixed batch shape
    assert np.array_equal(encoder.encode(images)["latent"], column(table, "latent")[5:12])
    with torch.no_grad():
        x = torch.from_numpy(images[:, :, ::-1].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = encoder.model.encode(x).numpy()
    assert np.allclose(direct, stored, atol=1e-5)
    assert np.array_equal(encoder.encode(images)["vfm"], column(table, "vfm")[5:12])
    # REG's class token: the VFM's, from the same forward pass
    with torch.no_grad():
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        cls = encoder.vfm(x).cls.numpy().astype(np.float16)
    assert np.allclose(column(table, "vfm_cls")[5:12].astype(np.float32), cls, atol=2e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_while_encoding_resumes_to_identical_bytes(setup):
    """The encoder actor fails after four encode calls (two batches and their flips) of the
    plugin tokenizer ``vavae-failing``, as a kill there would; rerun, the same experiment
    encodes only the rest, to the bytes of the uninterrupted extraction (``full``, with
    the ``vavae`` family: same weights, same extraction settings)."""
    cfg, weights, root, full, stats = setup
    out, marker = root / "killed-encoding", root / "encoder-failed.json"
    failing = failing_encoder(cfg, 4, marker)
    assert to_dict(failing.extract) == to_dict(cfg.extract)
    with pytest.raises(ExtractionError, match="killed by the test"):  # in an encoder actor
        extract(failing, weights, out, log=lambda *_: None)
    assert json.loads(marker.read_text())["calls"] == 4  # it failed there, in the actor
    assert not (out / "manifest.json").exists() and list(out.glob("parts/*/*.parquet"))
    kept = encoded_on_disk(out)
    assert 0 < len(kept) < stats["count"]
    stray = out / "shards" / ".shard-000003.parquet.tmp-dead"  # a write killed mid-way
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"partial")
    logs = []
    resumed = extract(failing, weights, out, log=logs.append)
    assert any("resuming" in line for line in logs)
    # only what the killed run had not done: its parts and shards are reused
    assert resumed["encoded"] == stats["count"] - len(kept)
    assert not stray.exists() and not (out / "parts").exists()
    assert read_bytes(out) == read_bytes(full)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_while_writing_shards_resumes_to_identical_bytes(setup, monkeypatch):
    """The driver fails right after it collects the first finished shard task, as a kill
    there would; the rerun keeps the finished shards and writes the rest. Also through a
    ``file://`` URI (any pyarrow filesystem)."""
    cfg, weights, root, full, _ = setup
    out = root / "killed-shards"
    uri = out.as_uri()
    collect = ShardTasks.collect

    def collect_then_kill(self, ref):
        collect(self, ref)
        raise RuntimeError(f"killed by the test after {self.finished} shards")

    with monkeypatch.context() as patch:
        patch.setattr(ShardTasks, "collect", collect_then_kill)
        with pytest.raises(RuntimeError, match="killed by the test after 1 shards"):
            extract(cfg, weights, uri, log=lambda *_: None)  # on the driver
    markers = list(out.glob("shards/*.json"))
    done = len(markers)
    finished = {p: p.stat().st_mtime_ns for m in markers for p in (m, m.with_suffix(".parquet"))}
    assert 1 <= done < 4
    logs = []
    extract(cfg, weights, uri, log=logs.append)
    assert f"[extract] {4 - done} shards written" in logs  # the finished ones are kept
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert read_bytes(out) == read_bytes(full)
    rows = latent_dataset(uri).take_all()
    assert len(rows) == 200 and {"latent", "latent_flip", "label"} <= set(rows[0])


@pytest.mark.ray
@pytest.mark.slow
def test_diagnostics_are_written_beside_the_shards_and_completed_not_redone(setup):
    """The latent diagnostics of an extraction (a copy of ``full``): the stored latents'
    first, then the held-out images' ones added to the same file; a complete file is kept."""
    import shutil

    from latentforge.platform.diagnose import run_diagnostics

    cfg, weights, root, full, _ = setup
    out = root / "diagnosed"
    shutil.copytree(full, out)
    paths = {"tokenizer": str(weights)}
    first = ["extract.diagnostics.metrics=[linear_probe,effective_dim]"]
    cfg = load_experiment(SMOKE, [f"run_dir={root}", *OVERRIDES, *first])
    values = run_diagnostics(cfg, paths, out, log=lambda *_: None)
    assert values["probe_num_fit"] + values["probe_num_test"] == 200  # every stored latent
    assert 0 <= values["probe_accuracy"] <= 1 and values["latent_dim"] == 4 * 8 * 8
    assert 1 <= values["participation_ratio"] <= 256
    assert values["pca_dims_90"] <= values["pca_dims_99"] <= 199
    assert "robust_psnr" not in values and values["computed"] == ["linear_probe", "effective_dim"]
    logs = []
    everything = load_experiment(SMOKE, [f"run_dir={root}", *OVERRIDES])
    values = run_diagnostics(everything, paths, out, log=logs.append)
    assert "se_cknna, robustness, robustness_shapesnet ->" in logs[0]  # only what it lacked
    stored = json.loads((out / "diagnostics.json").read_text())
    assert stored == values and stored["computed"] == everything.extract.diagnostics.metrics
    held = stored["robust_psnr_num_samples"]
    assert held == everything.data.holdout_images and stored["latent_se_cknna_num_samples"] == held
    # an untrained tokenizer: no trend with the noise to expect (test_diagnostics has one)
    sigmas = [f"sigma_{s:g}" for s in everything.extract.diagnostics.noise]
    for name in ("robust_psnr", "robust_rfd_shapesnet"):
        per_sigma = [stored[f"{name}_{s}"] for s in sigmas]
        assert np.isfinite(stored[f"{name}_clean"]) and stored[name] == np.mean(per_sigma)
    assert "local:shapes-vit" in stored["latent_se_cknna_extractor"]  # extract.vfm's
    before = (out / "diagnostics.json").stat().st_mtime_ns
    logs = []
    assert run_diagnostics(everything, paths, out, log=logs.append) == stored
    assert logs == [f"[diagnostics] cached: {out / 'diagnostics.json'}"]
    assert (out / "diagnostics.json").stat().st_mtime_ns == before
