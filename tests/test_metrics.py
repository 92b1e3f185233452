"""Evaluation metrics beyond FD: IS / KID / precision-recall / sFID from one Inception pass
with cached reference features, FD on a VFM with its real baseline, SSIM / LPIPS, per-class
accuracy, and the report's metric rows. CPU, no Ray (real images are rendered in-process),
no weights downloaded."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentforge import models
from latentforge.config import load_experiment
from latentforge.metrics import inception as inc
from latentforge.metrics import shapesnet
from latentforge.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_inf
from latentforge.metrics.inception import (
    inception_features,
    inception_outputs,
    inception_score,
    write_adm_npz,
)
from latentforge.metrics.reconstruction import load_lpips, lpips_distance, ssim
from latentforge.metrics.table import vfm_metric_name
from latentforge.models import build_tokenizer, state_dict_of
from latentforge.platform import evaluate as ev
from latentforge.platform import reference_cache
from latentforge.shapes import render_shapes
from latentforge.tokenizers import vfm as vfm_mod

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml"
INCEPTION_SET = ["fid", "fid_inf", "sfid", "is", "kid", "precision", "recall"]


@pytest.fixture(scope="module")
def random_inception(inception_file):
    return inc.load_inception(inception_file)


@pytest.fixture
def real_calls(monkeypatch):
    """Real images rendered in-process instead of read through Ray Data; counts the reads."""
    calls = []

    def fake_real_images(cfg, split, n):
        calls.append((split, n))
        start = 0 if split == "train" else 10_000
        return render_shapes(range(start, start + n), cfg.data.resolution, cfg.data.seed)

    monkeypatch.setattr(reference_cache, "real_images", fake_real_images)
    return calls


def smoke_cfg(tmp_path, *overrides):
    return load_experiment(SMOKE, [f"run_dir={tmp_path / 'run'}", *overrides])


def noisy(images, seed, scale=40):
    noise = np.random.default_rng(seed).normal(0, scale, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def test_one_inception_pass_gives_pool_features_and_logits(random_inception):
    x = render_shapes(range(4), 32)[0]
    pool, logits = inception_outputs(x, random_inception, batch_size=3)
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    assert pool.dtype == logits.dtype == np.float64
    assert np.array_equal(pool, inception_features(x, random_inception))


def count_inception_passes(monkeypatch) -> list[int]:
    """Record the number of images of every Inception forward pass."""
    passes = []
    real_outputs = inc.inception_outputs

    def counted(images, extractor, batch_size=100):
        passes.append(len(images))
        return real_outputs(images, extractor, batch_size)

    monkeypatch.setattr(inc, "inception_outputs", counted)
    return passes


def test_inception_metrics_from_one_pass_with_cached_reference(
    tmp_path, monkeypatch, inception_file, real_calls
):
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.metrics={INCEPTION_SET}",
        f"evaluate.inception_weights={inception_file}",
        "evaluate.num_real=12",
        "evaluate.batch_size=8",
    )
    passes = count_inception_passes(monkeypatch)
    samples = noisy(render_shapes(range(100, 110), 32)[0], 0)
    first = ev.fid_metrics(cfg, samples, INCEPTION_SET, device="cpu")
    # the samples once (pool, logits, sFID's spatial), the reference once (pool, spatial)
    assert passes == [10, 12]
    assert real_calls == [("train", 12)]
    for name in INCEPTION_SET:
        assert np.isfinite(first[name]), name
        assert first[f"{name}_num_samples"] == 10
        assert "inception" in first[f"{name}_extractor"]
    assert first["fid_reference"] == first["kid_reference"] == "12 training images"
    assert first["sfid_reference"] == "12 training images"
    assert "Mixed_6d.branch1x1" in first["sfid_extractor"]
    assert first["kid_subset_size"] == 10 and first["kid_std"] >= 0 and first["is_std"] >= 0
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    assert first["fid_inf_sizes"][-1] == 10
    cached = sorted(p.name for p in Path(cfg.run_dir, "cache").iterdir())
    assert len(cached) == 3 and any(name.endswith("-features.npz") for name in cached)
    assert any("inception-spatial" in name for name in cached)
    passes.clear()
    feature_set = ["is", "kid", "precision", "recall"]  # (skips the slow 2048-d FDs)
    again = ev.fid_metrics(cfg, samples, feature_set, device="cpu")
    assert passes == [10] and real_calls == [("train", 12)]  # the reference came from disk
    for name in feature_set:
        assert again[name] == pytest.approx(first[name], rel=1e-6, abs=1e-9), name


def test_reference_cache_is_keyed_by_the_extractors_weights(tmp_path, inception_file):
    # retrained or swapped weights must not reuse features cached under another file
    cfg = smoke_cfg(tmp_path, f"evaluate.inception_weights={inception_file}")
    other = tmp_path / "other_inception.pth"
    other.write_bytes(Path(inception_file).read_bytes())
    swapped = smoke_cfg(tmp_path, f"evaluate.inception_weights={other}")
    key = reference_cache.cache_file(cfg, "train", 12, "inception", "")
    assert reference_cache.cache_file(swapped, "train", 12, "inception", "") != key
    assert reference_cache.cache_file(cfg, "train", 12, "inception", "") == key  # stable
    asset = tmp_path / "shapes-vit-retrained.safetensors"
    asset.write_bytes(b"x")
    vfm = smoke_cfg(tmp_path, f"evaluate.fd_vfm=local:{asset}")
    before = reference_cache.cache_file(vfm, "train", 12, "vfm-x", "")
    asset.write_bytes(b"xy")  # retrained in place: same name, new file
    assert reference_cache.cache_file(vfm, "train", 12, "vfm-x", "") != before


@pytest.mark.slow
def test_adm_reference_images_and_statistics_only(tmp_path, inception_file, monkeypatch):
    samples = noisy(render_shapes(range(8), 32)[0], 1)
    batch = tmp_path / "VIRTUAL_ref.npz"
    write_adm_npz(batch, render_shapes(range(50, 58), 32)[0])
    cfg = smoke_cfg(
        tmp_path,
        "evaluate.metrics=[fid,kid,precision,recall]",
        f"evaluate.inception_weights={inception_file}",
        f"evaluate.fid_reference={batch}",
    )
    out = ev.fid_metrics(cfg, samples, ["fid", "kid", "precision"], device="cpu")
    assert out["kid_reference"] == f"{batch} arr_0 (8 images)" == out["fid_reference"]
    assert np.isfinite(out["fid"]) and "recall" not in out
    assert len(list(Path(cfg.run_dir, "cache").glob("adm-VIRTUAL_ref-inception-*.npz"))) == 1
    # a batch with only precomputed statistics serves FID but not KID or precision/recall
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=np.zeros(4), sigma=np.eye(4))
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.inception_weights={inception_file}",
        f"evaluate.fid_reference={stats_only}",
    )
    with pytest.raises(ValueError, match="stats_only.npz") as e:
        ev.check_inputs(cfg, {"fid", "kid", "recall"})
    assert "['kid', 'recall']" in str(e.value) and "arr_0" in str(e.value)
    ev.check_inputs(cfg, {"fid"})


@pytest.mark.slow
def test_sfid_against_adm_images_stored_statistics_or_neither(
    tmp_path, inception_file, monkeypatch
):
    passes = count_inception_passes(monkeypatch)
    samples = noisy(render_shapes(range(8), 32)[0], 4)[:6]
    with_images = tmp_path / "VIRTUAL_ref.npz"
    write_adm_npz(with_images, render_shapes(range(60, 66), 32)[0])
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.inception_weights={inception_file}",
        f"evaluate.fid_reference={with_images}",
    )
    from_images = ev.fid_metrics(cfg, samples, ["kid", "sfid"], device="cpu")
    assert passes == [6, 6]  # the samples once, the batch's images once (pool-3 and spatial)
    assert from_images["sfid_reference"] == f"{with_images} arr_0 (6 images)"
    assert from_images["sfid_num_samples"] == 6 and from_images["sfid"] > 0
    assert from_images["sfid_extractor"] == ev.INCEPTION_SPATIAL
    (cache,) = Path(cfg.run_dir, "cache").glob("adm-VIRTUAL_ref-inception_spatial-*.npz")
    # ADM's layout: pool-3 mu/sigma and spatial mu_s/sigma_s, read as stored
    stats = FeatureStats.load(cache)
    stored = tmp_path / "VIRTUAL_stats.npz"
    np.savez(stored, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=stats.mu, sigma_s=stats.sigma)
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.inception_weights={inception_file}",
        f"evaluate.fid_reference={stored}",
    )
    from_stored = ev.fid_metrics(cfg, samples, ["sfid"], device="cpu")
    assert passes == [6, 6, 6] and from_stored["sfid_reference"] == str(stored)
    assert from_stored["sfid"] == pytest.approx(from_images["sfid"], rel=1e-9)
    # pool-3 statistics only: sFID fails before any work, naming what is missing
    pool_only = tmp_path / "pool_only.npz"
    np.savez(pool_only, mu=np.zeros(2048), sigma=np.eye(2048))
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.inception_weights={inception_file}",
        f"evaluate.fid_reference={pool_only}",
    )
    with pytest.raises(ValueError, match="pool_only.npz") as e:
        ev.check_inputs(cfg, {"fid", "sfid"})
    assert "mu_s/sigma_s" in str(e.value) and "arr_0" in str(e.value)
    ev.check_inputs(cfg, {"fid"})


def test_fd_vfm_on_the_embedded_vit_names_its_extractor(tmp_path, real_calls):
    assert vfm_metric_name("local:shapes-vit") == "fd_shapes_vit"
    assert vfm_metric_name("hf:facebook/dinov2-base") == "fd_dinov2_base"
    assert (
        vfm_metric_name("timm:vit_large_patch14_dinov2.lvd142m")
        == "fd_vit_large_patch14_dinov2_lvd142m"
    )
    cfg = smoke_cfg(tmp_path, "evaluate.num_real=24", "evaluate.metrics=[fd_vfm]")
    same = ev.vfm_metrics(
        cfg, render_shapes(range(24), 32)[0], device="cpu"
    )  # the reference itself
    assert same["fd_shapes_vit"] == pytest.approx(0.0, abs=1e-6)
    assert same["fd_shapes_vit_extractor"] == "local:shapes-vit class token (128)"
    assert same["fd_shapes_vit_num_samples"] == 24
    assert same["fd_shapes_vit_reference"] == "24 training images"
    # the real-vs-real baseline, as for fd_shapesnet: as many held-out images, same reference
    baseline = same["fd_shapes_vit_real_baseline"]
    assert baseline > 0 and same["fd_shapes_vit_real_baseline_num_samples"] == 24
    assert same["fd_shapes_vit_real_baseline_extractor"] == same["fd_shapes_vit_extractor"]
    assert same["fd_shapes_vit_real_baseline_reference"] == "24 training images"
    other = ev.vfm_metrics(cfg, noisy(render_shapes(range(200, 224), 32)[0], 2), device="cpu")
    assert other["fd_shapes_vit"] > 0 and other["fd_shapes_vit_real_baseline"] == baseline
    assert real_calls == [("train", 24), ("holdout", 24), ("holdout", 24)]  # cached reference


def test_ssim_and_lpips():
    x = render_shapes(range(6), 32)[0]
    y = noisy(x, 3)
    assert ssim(x, x, batch_size=4) == pytest.approx(1.0)
    assert 0 < ssim(x, y) < 0.9
    torch.manual_seed(0)
    net = load_lpips_random()
    assert lpips_distance(x, x, net, batch_size=4) == pytest.approx(0.0, abs=1e-7)
    assert lpips_distance(x, y, net) > lpips_distance(x, noisy(x, 3, scale=5), net) > 0


def load_lpips_random():
    """The lpips package's LPIPS with its shipped linear layers on a random AlexNet (tests
    only: the ImageNet backbone is a download we never make)."""
    import lpips  # heavy (seconds to import): only this test needs it

    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def test_lpips_without_backbone_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as e:
        load_lpips("alex")
    assert str(expected) in str(e.value) and "download.pytorch.org" in str(e.value)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        ev.check_inputs(smoke_cfg(tmp_path, "evaluate.lpips_net=vgg"), {"lpips"})


class Identity(torch.nn.Module):
    def encode(self, x):
        return x

    def decode(self, z):
        return z


def test_reconstruction_metrics_of_a_perfect_tokenizer(tmp_path, real_calls):
    metrics = ["rfd_shapesnet", "psnr", "ssim", "lpips"]
    cfg = smoke_cfg(tmp_path, f"evaluate.metrics={metrics}")
    torch.manual_seed(0)
    out = ev.reconstruction_metrics(
        cfg, Identity(), tmp_path, lpips_model=load_lpips_random(), device="cpu"
    )
    assert (tmp_path / "recon.png").exists()
    assert out["psnr"] == pytest.approx(10 * np.log10(255**2 / 1e-10))  # the MSE floor
    assert out["ssim"] == pytest.approx(1.0) and out["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert out["rfd_shapesnet"] == pytest.approx(0.0, abs=1e-6)
    for name in [*metrics, "recon_class_accuracy"]:
        assert out[f"{name}_num_samples"] == cfg.evaluate.num_recon == 16, name
        assert out[f"{name}_extractor"], name
    assert out["lpips_extractor"] == "lpips v0.1 alex (random backbone: tests only)"
    assert out["ssim_reference"] == "16 held-out images"
    ceiling, counts = (out[f"recon_class_accuracy_per_class{k}"] for k in ("", "_num_samples"))
    assert sum(counts) == 16 and len(ceiling) == cfg.data.num_classes
    hits = sum(a * k for a, k in zip(ceiling, counts, strict=True) if k)
    assert hits / 16 == pytest.approx(out["recon_class_accuracy"])


class SeesAsTheVFM(Identity):
    """A tokenizer whose latents are the VFM's own patch grid: SE-CKNNA 1 on every set."""

    def __init__(self, vfm):
        super().__init__()
        self.vfm = vfm

    def encode(self, x):
        self.images = x
        return self.vfm(x).patch[-1]

    def decode(self, z):
        return self.images  # what recon.png shows


def test_se_cknna_of_a_tokenizer_with_the_evaluation_vfm(tmp_path, real_calls):
    cfg = smoke_cfg(tmp_path, "evaluate.metrics=[se_cknna]", "evaluate.num_recon=24")
    vfm = vfm_mod.load_vfm(cfg.evaluate.fd_vfm)
    same = ev.reconstruction_metrics(cfg, SeesAsTheVFM(vfm), tmp_path, device="cpu")
    for key in ("se_cknna", "se_cknna_clean", "se_cknna_equivariance", "se_cknna_noise"):
        assert same[key] == pytest.approx(1.0, abs=1e-4), key  # the 1e-6 of the ratio
    assert same["se_cknna_num_samples"] == 24
    assert "local:shapes-vit" in same["se_cknna_extractor"]
    pixels = ev.reconstruction_metrics(cfg, Identity(), tmp_path, device="cpu")  # mean RGB
    assert -1.0 <= pixels["se_cknna"] < 0.9
    again = ev.reconstruction_metrics(cfg, Identity(), tmp_path, device="cpu")
    assert again["se_cknna"] == pixels["se_cknna"]  # seeded transforms
    few = smoke_cfg(tmp_path, "evaluate.metrics=[se_cknna]", "evaluate.num_recon=10")
    with pytest.raises(ValueError, match="more than 10 held-out images"):
        ev.reconstruction_metrics(few, Identity(), tmp_path, device="cpu")


def test_generation_metrics_per_class_and_fd_inf(tmp_path, real_calls):
    cfg = smoke_cfg(tmp_path, "evaluate.num_real=40")
    samples, labels = render_shapes(range(300, 340), 32)  # real images as "samples"
    out = ev.generation_metrics(
        cfg, samples, labels, ["fd_shapesnet", "fd_shapesnet_inf", "class_accuracy"], device="cpu"
    )
    per_class = out["class_accuracy_per_class"]
    counts = out["class_accuracy_per_class_num_samples"]
    assert len(per_class) == cfg.data.num_classes and counts == [4] * 10
    assert np.dot(per_class, counts) / 40 == pytest.approx(out["class_accuracy"])
    conf = np.asarray(out["class_confusion"])  # rows: requested class; columns: classified as
    assert conf.shape == (10, 10) and conf.sum(1).tolist() == counts
    assert np.diag(conf).tolist() == [round(a * k) for a, k in zip(per_class, counts, strict=True)]
    assert out["class_accuracy_extractor"] == "shapesnet classifier"
    assert out["fd_shapesnet_num_samples"] == 40 and "(128)" in out["fd_shapesnet_extractor"]
    assert np.isfinite(out["fd_shapesnet_inf"]) and out["fd_shapesnet_inf_sizes"][-1] == 40
    # a class without samples is reported as such, not as NaN
    out = ev.generation_metrics(
        cfg, samples[labels != 3], labels[labels != 3], ["class_accuracy"], device="cpu"
    )
    assert out["class_accuracy_per_class"][3] is None
    assert "fd_shapesnet_inf" not in out


def shapesnet_outputs(images):
    """The embedded classifier's penultimate features and predicted classes, computed here
    from its documented input convention (float images in [-1, 1], channels first)."""
    net = shapesnet.load_shapesnet()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255).mul(2).sub(1).float()
    with torch.no_grad():
        return net.features(x).double().numpy(), net(x).argmax(1).numpy()


def test_generation_metrics_equal_an_independent_computation(tmp_path, real_calls):
    """fd_shapesnet = FD(shapesnet features of the samples, of the num_real training images),
    its real baseline = FD(held-out images, same reference), FD∞ the extrapolation of the
    samples' FD, class_accuracy = the fraction of samples classified as their label."""
    cfg = smoke_cfg(tmp_path, "evaluate.num_real=40")
    samples, labels = render_shapes(range(300, 340), 32)
    samples = noisy(samples, 5, scale=60)  # not the training images: FD > 0
    labels = labels.copy()
    labels[:8] = (labels[:8] + 1) % 10  # some requested labels the images do not show
    out = ev.generation_metrics(
        cfg, samples, labels, ["fd_shapesnet", "fd_shapesnet_inf"], device="cpu"
    )
    feats, preds = shapesnet_outputs(samples)
    train, _ = render_shapes(range(40), 32, cfg.data.seed)  # what real_images gave it
    held, _ = render_shapes(range(10_000, 10_040), 32, cfg.data.seed)
    ref = FeatureStats.of(shapesnet_outputs(train)[0])
    fd = frechet_distance(FeatureStats.of(feats), ref)
    baseline = frechet_distance(FeatureStats.of(shapesnet_outputs(held)[0]), ref)
    assert fd > 2 * baseline > 0  # noisy samples are farther from the reference than real ones
    assert out["fd_shapesnet"] == pytest.approx(fd, rel=1e-5)
    assert out["fd_shapesnet_real_baseline"] == pytest.approx(baseline, rel=1e-5)
    assert out["fd_shapesnet_inf"] == pytest.approx(
        frechet_distance_inf(feats, ref).value, rel=1e-4
    )
    accuracy = float(np.mean(preds == labels))
    assert 0 < accuracy < 1 and out["class_accuracy"] == pytest.approx(accuracy)


def test_fd_vfm_equals_the_distance_of_the_vfms_class_tokens(tmp_path, monkeypatch, real_calls):
    """fd_shapes_vit = FD(class tokens of the samples, of the training images), the tokens
    computed here by the VFM on images in [-1, 1] (its documented input)."""
    vfm = vfm_mod.load_vfm("local:shapes-vit")
    monkeypatch.setattr(vfm_mod, "load_vfm", lambda spec, weights=None: vfm)  # load it once
    cfg = smoke_cfg(tmp_path, "evaluate.num_real=8", "evaluate.metrics=[fd_vfm]")
    samples = noisy(render_shapes(range(200, 208), 32)[0], 2)
    out = ev.vfm_metrics(cfg, samples, device="cpu")

    def tokens(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255).mul(2).sub(1)
        return vfm(x.float()).cls.double().numpy()

    ref = FeatureStats.of(tokens(render_shapes(range(8), 32, cfg.data.seed)[0]))
    fd = frechet_distance(FeatureStats.of(tokens(samples)), ref)
    assert out["fd_shapes_vit"] == pytest.approx(fd, rel=1e-4)


def fake_inception_outputs(images, extractor, batch_size=100):
    """A cheap stand-in for the Inception pass: a fixed random projection of the pixels
    (16-d "pool" features, 10 "logits"). The random-weight InceptionV3 gives features of
    ~1e-8 that all coincide (KID ~ 1e-16 for any two sets), and 2048-d FDs take seconds."""
    proj = np.random.default_rng(0).normal(size=(images[0].size, 16)) / 32
    pool = (np.asarray(images, np.float64).reshape(len(images), -1) / 255) @ proj
    return pool, pool[:, :10] * 3


def kid_exact(x, y):
    """Unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3 (Bińkowski et al. 2018, Eq. 3)
    on the whole sets (a KID subset of every sample is the set itself)."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * k(x, y).mean()
    )


def precision_recall_exact(fake, real, k=3):
    """Kynkäänniemi et al. 2019: a point is inside a set's manifold when it lies within the
    distance of some member to that member's k-th nearest neighbour (itself excluded)."""
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    r_real, r_fake = np.sort(d(real, real), 1)[:, k], np.sort(d(fake, fake), 1)[:, k]
    precision = np.mean((d(fake, real) <= r_real[None]).any(1))
    recall = np.mean((d(real, fake) <= r_fake[None]).any(1))
    return precision, recall


def test_inception_metrics_compare_the_samples_with_the_real_images(
    tmp_path, monkeypatch, inception_file, real_calls
):
    """FID, KID, precision/recall and IS of the samples' features against the training
    images' features, each equal to its definition computed here."""
    monkeypatch.setattr(inc, "inception_outputs", fake_inception_outputs)
    wanted = ["fid", "kid", "precision", "recall", "is"]
    cfg = smoke_cfg(
        tmp_path,
        f"evaluate.metrics={wanted}",
        f"evaluate.inception_weights={inception_file}",
        "evaluate.num_real=12",
        "evaluate.kid_subset_size=12",
    )
    samples = noisy(render_shapes(range(100, 112), 32)[0] // 2, 0, scale=20)  # darker
    out = ev.fid_metrics(cfg, samples, wanted, device="cpu")
    pool, logits = fake_inception_outputs(samples, None)
    real = fake_inception_outputs(render_shapes(range(12), 32, cfg.data.seed)[0], None)[0]
    assert out["fid"] == pytest.approx(
        frechet_distance(FeatureStats.of(pool), FeatureStats.of(real)), rel=1e-6
    )
    kid = kid_exact(pool, real)
    assert kid > 1 and out["kid"] == pytest.approx(kid, rel=1e-6)
    precision, recall = precision_recall_exact(pool, real)
    assert (precision, recall) != (1.0, 1.0)  # distinguishable from the samples vs themselves
    assert (out["precision"], out["recall"]) == pytest.approx((precision, recall))
    assert out["is"] == pytest.approx(inception_score(logits)[0])


def test_evaluate_runs_its_networks_on_the_given_device(tmp_path, monkeypatch, real_calls):
    """evaluate(device=...) puts every network it loads there ("cpu:0" here, to tell the
    argument from the "cpu" default): what the GPU evaluation task relies on."""
    cfg = smoke_cfg(
        tmp_path,
        "evaluate.num_real=8",
        "evaluate.num_recon=4",
        "evaluate.metrics=[fd_shapesnet,fd_vfm,psnr]",
    )
    samples, labels = render_shapes(range(100, 108), 32)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=labels)
    save_file(state_dict_of(build_tokenizer(cfg)), str(tmp_path / "tok.safetensors"))
    devices = []

    def spy(name, load):
        def wrapped(*args, **kwargs):
            device = kwargs.get("device", args[-1] if name != "vfm" else None)
            model = load(*args, **kwargs)
            if name == "vfm":
                to = model.to
                model.to = lambda d: devices.append(("vfm", str(d))) or to(d)
            else:
                devices.append((name, str(device)))
            return model

        return wrapped

    monkeypatch.setattr(shapesnet, "load_shapesnet", spy("shapesnet", shapesnet.load_shapesnet))
    monkeypatch.setattr(models, "load_tokenizer", spy("tokenizer", models.load_tokenizer))
    monkeypatch.setattr(vfm_mod, "load_vfm", spy("vfm", vfm_mod.load_vfm))
    paths = {"samples": str(tmp_path), "tokenizer": str(tmp_path / "tok.safetensors")}
    out = ev.evaluate(cfg, paths, tmp_path, device="cpu:0")
    assert {"fd_shapesnet", "fd_shapes_vit", "psnr"} <= set(out)
    assert set(devices) == {("shapesnet", "cpu:0"), ("vfm", "cpu:0"), ("tokenizer", "cpu:0")}
    assert not hasattr(ev, "DEVICE")  # passed down, never a global
