"""Evaluation of one run: generation and reconstruction metrics, named honestly.

Metrics of the embedded default use the embedded classifier (``shapesnet``):
``fd_shapesnet`` (Fréchet distance of its penultimate features, samples vs real training
images), ``class_accuracy`` (its predictions on class-conditional samples vs the
requested labels), ``rfd_shapesnet`` (held-out reconstructions vs held-out images) and
``psnr``. ``fid`` is reserved for Inception features. Every Fréchet distance is reported
with its sample counts, and with a real-vs-real baseline (held-out real images vs the same
reference set, same count) for scale. Reference statistics are cached on disk, keyed by
the data config, split, count and extractor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from latentforge.config import ExperimentConfig, config_hash
from latentforge.metrics.frechet import FeatureStats, frechet_distance

METRICS = ("fd_shapesnet", "class_accuracy", "rfd_shapesnet", "psnr", "fid")


def check_metrics(names: list[str]) -> None:
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"evaluate.metrics: unknown {unknown}; known: {list(METRICS)}")


def real_images(cfg: ExperimentConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (uint8 N x H x W x 3) and labels of a split of the data."""
    from latentforge.platform.data import load_images

    ds = load_images(cfg.data, split).dataset.limit(n)
    images, labels = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


@torch.no_grad()
def classify(images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Embedded classifier features (N, D) and predicted classes (N,) of uint8 images."""
    from latentforge.metrics.shapesnet import load_shapesnet

    net = load_shapesnet()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        feats.append(net.features(x).double().numpy())
        preds.append(net(x).argmax(dim=1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def reference_stats(
    cfg: ExperimentConfig, split: str, n: int, extractor: str = "shapesnet", featurize=None
) -> FeatureStats:
    """Feature statistics of ``n`` real images of ``split`` under ``extractor`` (named in
    the cache key; ``featurize`` maps uint8 images to features, the embedded classifier's by
    default), cached under run_dir/cache."""
    key = config_hash(extractor, cfg.data, split, n)
    path = Path(cfg.run_dir, "cache", f"real-{split}-{n}-{extractor}-{key}.npz")
    if path.exists():
        return FeatureStats.load(path)
    images, _ = real_images(cfg, split, n)
    if featurize is None:
        feats = classify(images, cfg.evaluate.batch_size)[0]
    else:
        feats = featurize(images)
    stats = FeatureStats.of(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def fid_metrics(cfg: ExperimentConfig, samples: np.ndarray) -> dict:
    """FID (torch-fidelity's InceptionV3, our float64 Fréchet distance) of the samples
    against ``evaluate.fid_reference`` (an ADM batch .npz) or, when unset, against
    ``evaluate.num_real`` training images (statistics cached under run_dir/cache)."""
    from latentforge.metrics.inception import inception_features, load_inception
    from latentforge.metrics.inception import reference_stats as adm_stats

    ec = cfg.evaluate
    extractor = load_inception(ec.inception_weights)

    def featurize(images: np.ndarray) -> np.ndarray:
        return inception_features(images, extractor, ec.batch_size)

    if ec.fid_reference:
        ref, source = adm_stats(ec.fid_reference, extractor, ec.batch_size), ec.fid_reference
    else:
        ref = reference_stats(cfg, "train", ec.num_real, "inception", featurize)
        source = f"{ref.n} training images"
    feats = featurize(samples)
    return {
        "fid": frechet_distance(FeatureStats.of(feats), ref),
        "fid_num_samples": len(samples),
        "fid_reference": source,
        "fid_extractor": "torch-fidelity inception-v3-compat pool3 (2048)",
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.maximum((diff**2).reshape(len(a), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


@torch.no_grad()
def reconstruct(tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
    from latentforge.platform.sample import to_uint8
    from latentforge.platform.train import images_to_float

    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_float(torch.from_numpy(images[i : i + batch_size]))
        out.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))
    return np.concatenate(out)


def generation_metrics(cfg: ExperimentConfig, samples: np.ndarray, labels: np.ndarray) -> dict:
    feats, preds = classify(samples, cfg.evaluate.batch_size)
    ref = reference_stats(cfg, "train", cfg.evaluate.num_real)
    n = len(samples)
    out: dict = {"num_samples": n, "num_real": ref.n}
    out["fd_shapesnet"] = frechet_distance(FeatureStats.of(feats), ref)
    held, _ = real_images(cfg, "holdout", n)
    out["fd_shapesnet_real_baseline"] = frechet_distance(
        FeatureStats.of(classify(held, cfg.evaluate.batch_size)[0]), ref
    )
    out["num_baseline"] = len(held)
    out["class_accuracy"] = float(np.mean(preds == labels))
    out["class_accuracy_per_class"] = [
        float(np.mean(preds[labels == c] == c)) for c in range(cfg.data.num_classes)
    ]
    return out


def reconstruction_metrics(cfg: ExperimentConfig, tokenizer, out_dir: Path) -> dict:
    from PIL import Image

    from latentforge.platform.sample import grid_of

    held, held_labels = real_images(cfg, "holdout", cfg.evaluate.num_recon)
    recon = reconstruct(tokenizer, held, cfg.evaluate.batch_size)
    pairs = np.stack([held[:32], recon[:32]], axis=1).reshape(-1, *held.shape[1:])
    Image.fromarray(grid_of(pairs, cols=16)).save(out_dir / "recon.png")
    out = {"num_recon": len(held), "psnr": psnr(recon, held)}
    recon_feats, recon_preds = classify(recon, cfg.evaluate.batch_size)
    out["rfd_shapesnet"] = frechet_distance(
        FeatureStats.of(recon_feats),
        FeatureStats.of(classify(held, cfg.evaluate.batch_size)[0]),
    )
    # the ceiling of class_accuracy through this tokenizer: a generator whose latents were
    # perfect encodings would decode to images like these
    out["recon_class_accuracy"] = float(np.mean(recon_preds == held_labels))
    return out


def evaluate(cfg: ExperimentConfig, paths: dict, out_dir: str | Path) -> dict:
    """All configured metrics of one run -> ``out_dir/metrics.json``."""
    from latentforge.platform.extract import load_tokenizer

    check_metrics(cfg.evaluate.metrics)
    wanted = set(cfg.evaluate.metrics)
    metrics: dict = {}
    if wanted & {"fd_shapesnet", "class_accuracy", "fid"}:
        with np.load(Path(paths["samples"], "samples.npz")) as f:
            samples, labels = f["arr_0"], f["labels"]
    if wanted & {"fd_shapesnet", "class_accuracy"}:
        metrics.update(generation_metrics(cfg, samples, labels))
    if "fid" in wanted:
        metrics.update(fid_metrics(cfg, samples))
    if wanted & {"rfd_shapesnet", "psnr"}:
        tokenizer = load_tokenizer(cfg, paths["tokenizer"])
        metrics.update(reconstruction_metrics(cfg, tokenizer, Path(out_dir)))
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
