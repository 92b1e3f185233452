"""Class-conditional generation: per-sample seeds and labels -> latents -> images.

Sample ``i`` uses label ``balanced_labels(N)[i]`` and noise from seed
``sample.seed * 1_000_000 + i`` only, and the network always sees micro-batches of
:data:`MICRO_BATCH`, so the images do not depend on how many tasks or what batch size
produced them (edm2's per-sample seeds). Latents are de-normalised with the latent
dataset's statistics (:func:`latentforge.models.latent_stat`) before decoding."""

from __future__ import annotations

import time

import numpy as np
import torch

from latentforge.config import ExperimentConfig
from latentforge.generators.samplers import JointClassToken, noise_for_seeds, sample
from latentforge.generators.transport import resolve_shift
from latentforge.images import to_uint8
from latentforge.models import build_transport, latent_mean_std, num_classes_of
from latentforge.progress import format_seconds

MICRO_BATCH = 16  # the network always sees this many samples: bit-identical across splits


TOKENIZER_PIXELS = 16 * 256 * 256  # pixels per decode call: 16 images at 256 px


def tokenizer_batch(resolution: int, cap: int) -> int:
    """Images per tokenizer call outside training: at most ``cap`` and
    :data:`TOKENIZER_PIXELS` pixels, so that activations stay bounded at any resolution
    (a VA-VAE decoder at 256 px holds ~0.1 GB of fp32 activations per image)."""
    return max(1, min(cap, TOKENIZER_PIXELS // resolution**2))


def sample_seeds(cfg: ExperimentConfig, n: int) -> np.ndarray:
    return cfg.sample.seed * 1_000_000 + np.arange(n, dtype=np.int64)


@torch.no_grad()
def sample_images(
    cfg: ExperimentConfig,
    generator,
    tokenizer,
    stats: dict,
    seeds: np.ndarray,
    labels: np.ndarray,
    log=print,
    guide=None,
) -> np.ndarray:
    """Sample latents for (seed, label) pairs, de-normalise, decode; uint8 (N, H, W, 3).

    Runs on the generator's device; the noise is drawn on the CPU from each sample's seed
    (the same numbers on any device) and moved there. ``guide``: the autoguidance guide
    (:func:`latentforge.models.load_guide`), else classifier-free guidance."""
    sc = cfg.sample
    latent_shape = tuple(stats["latent_shape"])
    device = next(generator.parameters()).device
    mean, std = latent_mean_std(stats, device)
    field, guide, noise_shape = joint_fields(generator, guide, latent_shape)
    options = sampler_options(cfg, latent_shape, log)
    out, t0 = [], time.time()
    step = max(MICRO_BATCH, sc.batch_size // MICRO_BATCH * MICRO_BATCH)
    for i in range(0, len(seeds), step):
        s, y = seeds[i : i + step], labels[i : i + step]
        chunk_seeds = [int(v) for v in s]
        noise = noise_for_seeds(chunk_seeds, noise_shape, device)
        y = torch.tensor(y, dtype=torch.long, device=device)
        # noise_seeds: the SDE's per-step noise, per sample
        z, nfe = sample(field, noise=noise, y=y, noise_seeds=chunk_seeds, guide=guide, **options)
        z = field.split(z)[0] if isinstance(field, JointClassToken) else z
        per_call = tokenizer_batch(cfg.data.resolution, len(z))
        for j in range(0, len(z), per_call):
            out.append(to_uint8(tokenizer.decode(z[j : j + per_call] * std + mean)))
        done, rate = i + len(s), (i + len(s)) / max(time.time() - t0, 1e-9)
        eta = format_seconds((len(seeds) - done) / rate)
        log(
            f"[sample] {done}/{len(seeds)} images ({100 * done / len(seeds):.0f}%) "
            f"{rate:.1f} img/s ETA {eta} ({nfe} NFE per sample)"
        )
    return np.concatenate(out)


def joint_fields(generator, guide, latent_shape: tuple[int, ...]):
    """(model, guide, noise shape) as the sampler integrates them: with REG the class token
    is sampled jointly with the latent (:class:`JointClassToken`); only the latent is
    decoded."""
    reg_dim = getattr(generator, "reg_dim", 0)
    if not reg_dim:
        return generator, guide, latent_shape
    field = JointClassToken(generator, latent_shape, reg_dim)
    guide = None if guide is None else JointClassToken(guide, latent_shape, reg_dim)
    return field, guide, (field.numel + reg_dim,)


def sampler_options(cfg: ExperimentConfig, latent_shape: tuple[int, ...], log=print) -> dict:
    """The keyword arguments of :func:`~latentforge.generators.samplers.sample` that
    ``cfg.sample`` sets, the shift resolved for ``latent_shape`` (``auto``) and logged."""
    sc = cfg.sample
    shift = resolve_shift(sc.timestep_shift, latent_shape)
    if sc.timestep_shift == "auto":
        log(f"[sample] timestep_shift auto -> {shift:.4f} for latents {latent_shape}")
    return dict(
        transport=build_transport(cfg, latent_shape),
        steps=sc.steps,
        method=sc.sampler,
        cfg_scale=sc.cfg_scale,
        cfg_interval=tuple(sc.cfg_interval),
        cfg_channels=sc.cfg_channels,
        timestep_shift=shift,
        null_class=num_classes_of(cfg),
        micro_batch=MICRO_BATCH,
        sde_diffusion=sc.sde_diffusion,
        sde_last_step=sc.sde_last_step,
    )


def official_precision(device: str) -> None:
    """On CUDA, fp32 weights with TF32 matmuls and convolutions, as LightningDiT's
    inference.py samples (about 8x the fp32 rate of an A100); nothing on CPU."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
