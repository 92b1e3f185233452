"""The training loop: :func:`fit` trains a :class:`Job` (the tokenizer's or the
generator's) to its images seen in any :class:`~latentforge.training.runtime.Runtime`,
resuming from the runtime's latest checkpoint.

Every step is seeded from (seed, rank, images seen) (:func:`seed_step`), so a run resumed
from a checkpoint draws the same noise, times and label drops as one that never stopped.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentforge.config import ExperimentConfig
from latentforge.models import build_generator, build_tokenizer, build_transport, latent_mean_std
from latentforge.progress import format_seconds
from latentforge.training.checkpoint import load_checkpoint, save_checkpoint
from latentforge.training.objectives import GeneratorObjective, TokenizerObjective
from latentforge.training.runtime import Runtime


@dataclass
class Job:
    """What differs between the tokenizer and the generator training job."""

    kind: str  # "tokenizer" | "generator"
    model: nn.Module  # the model whose weights are the artifact
    objective: nn.Module  # forward(batch, nimg, generator) -> dict with "loss"
    total_images: int
    batch_size: int  # global
    lr: float
    ema_decay: float
    betas: tuple[float, float] = (0.9, 0.99)
    # adversarial training: a discriminator inside ``objective``, stepped by its own optimizer
    discriminator: nn.Module | None = None
    disc_lr: float = 0.0
    disc_betas: tuple[float, float] = (0.5, 0.9)
    init_from: str | None = None  # a checkpoint directory to start from (train.generator_init)
    lr_decay: str | None = None  # after the warm-up: None (constant), "linear" or "cosine"
    final_lr: float | None = None  # the decay's end value
    decay_start_images: int | None = None  # images the decay starts at (None: warm-up's end)
    decay_end_images: int | None = None  # images the decay ends at (None: total_images)
    notes: tuple[str, ...] = ()  # derived values, logged when training starts


def tokenizer_job(cfg: ExperimentConfig) -> Job:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and rank
    model = build_tokenizer(cfg)
    disc = model.make_discriminator()
    train_cfg = cfg.train
    return Job(
        "tokenizer",
        model,
        TokenizerObjective(model, disc),
        int(train_cfg.tokenizer_images),
        train_cfg.tokenizer_batch_size,
        train_cfg.tokenizer_lr,
        train_cfg.ema_decay,
        betas=tuple(train_cfg.tokenizer_betas),
        discriminator=disc,
        **({} if disc is None else model.discriminator_optimizer(train_cfg.tokenizer_lr)),
        lr_decay=train_cfg.tokenizer_lr_decay,
        final_lr=train_cfg.tokenizer_final_lr,
    )


def generator_job(cfg: ExperimentConfig, stats: dict[str, Any]) -> Job:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and rank
    model = build_generator(cfg, stats)
    shape = tuple(stats["latent_shape"])
    mean, std = latent_mean_std(stats)
    transport = build_transport(cfg, shape)
    objective = GeneratorObjective(model, transport, mean, std)
    notes, decay = (), cfg.train.generator_decay_end_images
    start = cfg.train.generator_decay_start_images
    if cfg.generator.transport.train_shift == "auto":
        notes = (f"transport.train_shift auto -> {transport.train_shift:.4f} for latents {shape}",)
    return Job(
        "generator",
        model,
        objective,
        int(cfg.train.generator_images),
        cfg.train.generator_batch_size,
        cfg.train.generator_lr,
        cfg.train.ema_decay,
        betas=tuple(cfg.train.generator_betas or Job.betas),
        init_from=cfg.train.generator_init,
        notes=notes,
        lr_decay=cfg.train.generator_lr_decay,
        final_lr=cfg.train.generator_final_lr,
        decay_start_images=None if start is None else int(start),
        decay_end_images=None if decay is None else int(decay),
    )


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early averages do not
    keep the initialisation alive (with 0.999 flat, 60% of the EMA after 500 steps would
    still be the zero-initialised output layer)."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """EMA over named parameters (buffers are copied)."""
    params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.lerp_(params[name].detach(), 1.0 - decay)
    bufs = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(bufs[name])


def lr_at(
    nimg: int,
    base_lr: float,
    warmup_images: float,
    decay: str | None = None,
    final_lr: float | None = None,
    end_images: float = 0.0,
    start_images: float | None = None,
) -> float:
    """Linear warm-up from zero over ``warmup_images``, then constant (LightningDiT and
    VA-VAE) or, with ``decay``, from ``base_lr`` at ``start_images`` (default: the warm-up's
    end) to ``final_lr`` at ``end_images``, flat after: ``linear``, or ``cosine`` (half a
    cosine period), as RAE's schedules (bytetriper/RAE ``src/utils/optim_utils.py``, there
    counted in steps; its ``warmup_from_zero: false`` is warm-up 0 and a later start)."""
    lr = base_lr * min(1.0, (nimg + 1) / max(warmup_images, 1.0))
    start = warmup_images if start_images is None else start_images
    if decay is None or nimg < start:
        return lr
    final = base_lr if final_lr is None else final_lr
    progress = min(1.0, (nimg - start) / max(end_images - start, 1.0))
    if decay == "linear":
        return base_lr + (final - base_lr) * progress
    if decay == "cosine":
        return final + (base_lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate decay {decay!r}: linear or cosine")


def make_optimizers(
    job: Job, train_cfg
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """AdamW for the model; Adam for the discriminator, if any (constant lr, no weight decay,
    as in Esser et al. 2021 and VA-VAE)."""
    params = [p for p in job.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=train_cfg.weight_decay, betas=job.betas)
    if job.discriminator is None:
        return opt, None
    disc = job.discriminator.parameters()
    return opt, torch.optim.Adam(disc, lr=job.disc_lr, betas=job.disc_betas)


def fit(cfg: ExperimentConfig, job: Job, runtime: Runtime, log: Callable = print) -> dict:
    """Train ``job`` to ``job.total_images`` images seen; resume from the runtime's checkpoint."""
    train_cfg = cfg.train
    job.model.to(runtime.device)
    job.objective.to(runtime.device)
    ema = copy.deepcopy(job.model).eval().requires_grad_(False)
    opt, opt_d = make_optimizers(job, train_cfg)
    state, curve = restore(job, ema, opt, opt_d, runtime, log)
    for note in job.notes:
        log(f"[{job.kind}] {note}")
    objective = runtime.wrap(job.objective)
    if train_cfg.compile:
        objective = torch.compile(objective, backend=train_cfg.compile)
    accum = max(1, train_cfg.grad_accum)
    local_bs = local_batch_size(job, runtime.world_size, accum)
    global_bs = local_bs * runtime.world_size * accum  # images per optimizer step
    meter = CurveMeter(job, curve, state["nimg"], train_cfg.log_every_images, log)
    next_ckpt = state["nimg"] + train_cfg.checkpoint_every_images
    gen = torch.Generator(device=runtime.device)
    while state["nimg"] < job.total_images:
        epoch_seed = train_cfg.seed * 1_000_003 + state["epoch"] * 1009 + runtime.rank
        skip = state.get("step_in_epoch", 0)  # groups of this epoch a resumed run has done
        i = -1
        for i, group in enumerate(grouped(runtime.batches(local_bs, epoch_seed), accum)):
            if i < skip:
                continue
            group = [
                {k: v.to(runtime.device, non_blocking=True) for k, v in b.items()} for b in group
            ]
            seed_step(gen, train_cfg.seed, runtime.rank, state["nimg"])
            parts = train_step(objective, opt, group, state["nimg"], gen, job, train_cfg, opt_d)
            ema_update(ema, job.model, ema_decay_at(state["nimg"] // global_bs, job.ema_decay))
            state["nimg"] += global_bs
            state["step_in_epoch"] = i + 1
            done = state["nimg"] >= job.total_images
            meter.add(parts, global_bs, state["nimg"], force=done)
            if state["nimg"] >= next_ckpt or done:
                report_checkpoint(runtime, job, ema, opt, state, curve, opt_d)
                next_ckpt += train_cfg.checkpoint_every_images
            if done:
                break
        else:
            if i < 0:  # not one step in a whole epoch: it would loop forever
                raise ValueError(
                    f"{job.kind} training: this worker's share of the data is smaller than "
                    f"one step ({local_bs} x {accum} images); use fewer workers or a smaller "
                    "batch"
                )
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    return {"nimg": state["nimg"], "curve": curve}


def restore(job: Job, ema, opt, opt_d, runtime: Runtime, log: Callable) -> tuple[dict, list]:
    """The training state and curve to start from: the runtime's latest checkpoint (a
    resumed run), else ``job.init_from`` (a continued run), else a fresh start."""
    with runtime.checkpoint_dir() as ck:
        if ck is not None:
            state, curve = load_checkpoint(ck, job, ema, opt, opt_d)
            state.setdefault("resumed_at", []).append(state["nimg"])  # provenance of restarts
            log(f"[{job.kind}] resumed at {state['nimg']} images")
            return state, curve
    if not job.init_from:
        return {"nimg": 0, "epoch": 0}, []
    if not Path(job.init_from, "state.json").is_file():
        raise FileNotFoundError(
            f"train.generator_init: {job.init_from} is not a training checkpoint "
            "directory (no state.json)"
        )
    state, curve = load_checkpoint(job.init_from, job, ema, opt, opt_d)
    if state["nimg"] > job.total_images:
        raise ValueError(
            f"train.generator_init: {job.init_from} has seen {state['nimg']} images, "
            f"more than the {job.total_images} asked for"
        )
    log(f"[{job.kind}] continuing {job.init_from} from {state['nimg']} images")
    return state, curve


def local_batch_size(job: Job, world_size: int, accum: int) -> int:
    """Each worker's micro-batch; the global batch must split evenly."""
    if job.batch_size % (world_size * accum):
        raise ValueError(
            f"train.{job.kind}_batch_size {job.batch_size} is not a multiple of ray.num_workers "
            f"{world_size} x train.grad_accum {accum}: the global batch would change"
        )
    return job.batch_size // (world_size * accum)


class CurveMeter:
    """Averages the step's logged parts between log points; every ``every`` images (and at
    the end) appends a point to ``curve`` and logs it with progress, images/s and ETA."""

    def __init__(self, job: Job, curve: list, nimg: int, every: float, log: Callable):
        self.job, self.curve, self.every, self.log = job, curve, every, log
        self.next = nimg + every
        self.start_nimg, self.start = nimg, time.time()
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images, self.t0 = 0, time.time()

    def add(self, parts: dict[str, float], images: int, nimg: int, force: bool) -> None:
        for k, v in parts.items():  # averaged over the steps that report them
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images
        if nimg < self.next and not force:
            return
        point = {"nimg": nimg, **{k: v / self.counts[k] for k, v in self.sums.items()}}
        point["images_per_s"] = self.images / max(time.time() - self.t0, 1e-9)
        self.curve.append(point)
        self.log(progress_line(self.job, point, self.start_nimg, time.time() - self.start))
        self._reset()
        self.next += self.every


def progress_line(job: Job, point: dict, start_nimg: int, elapsed: float) -> str:
    """``[generator] 12800/130000 images (10%) 512 img/s ETA 3m49s  loss=0.51 ...``"""
    nimg, total = point["nimg"], job.total_images
    rate = (nimg - start_nimg) / max(elapsed, 1e-9)
    eta = format_seconds((total - nimg) / rate) if rate > 0 and nimg < total else "0s"
    values = " ".join(f"{k}={v:.4g}" for k, v in point.items() if k not in ("nimg", "images_per_s"))
    return (
        f"[{job.kind}] {nimg}/{total} images ({100 * nimg / max(total, 1):.0f}%) "
        f"{point['images_per_s']:.0f} img/s ETA {eta}  {values}"
    )


def seed_step(gen: torch.Generator, seed: int, rank: int, nimg: int) -> None:
    """Seed torch (global and ``gen``) and NumPy from (seed, rank, images seen) before every
    step, so that a run resumed from a checkpoint draws the same noise, times and label
    drops as one that never stopped, with no RNG state to carry between processes."""
    s = (int(seed) * 1_000_003 + int(rank) * 7919 + int(nimg)) % 2**63
    gen.manual_seed(s)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)


def grouped(batches: Iterator, n: int) -> Iterator[list]:
    """Consecutive groups of ``n`` batches (a trailing incomplete group is dropped)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def train_step(
    objective, opt, batches: list, nimg, gen, job: Job, train_cfg, opt_d=None
) -> dict[str, float]:
    """One optimizer step over ``batches`` (gradient accumulation: each micro-batch's loss
    is divided by their number; DDP synchronises gradients on the last one only); with a
    discriminator optimizer ``opt_d``, then the discriminator's step."""
    for group in opt.param_groups:
        end = job.decay_end_images or job.total_images
        group["lr"] = lr_at(
            nimg,
            job.lr,
            train_cfg.warmup_images,
            job.lr_decay,
            job.final_lr,
            end,
            job.decay_start_images,
        )
    opt.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    fakes = []  # detached reconstructions of the GAN phase, for the discriminator's step
    for i, batch in enumerate(batches):
        with sync_on_last(objective, i, len(batches)), autocast_for(batch):
            parts = objective(batch, nimg, gen)
            (parts["loss"] / len(batches)).backward()
        if "fake" in parts:
            fakes.append(parts.pop("fake"))
        accumulate(out, parts, len(batches))
    if train_cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), train_cfg.grad_clip)
        out["grad_norm"] = float(gnorm)
    opt.step()
    if not math.isfinite(out["loss"]):
        raise FloatingPointError(f"{job.kind} loss is {out['loss']} at {nimg} images")
    if opt_d is not None:
        out.update(discriminator_step(objective, opt_d, batches, fakes, nimg))
    return out


def discriminator_step(objective, opt_d, batches: list, fakes: list, nimg) -> dict[str, float]:
    """The discriminator's optimizer step, after the autoencoder's, on the same micro-batches
    and their reconstructions ``fakes`` (detached; reused, not recomputed). Before the GAN
    phase ``fakes`` is empty and nothing is stepped; ``disc_active`` logs which."""
    out = {"disc_active": float(bool(fakes))}
    if not fakes:
        return out
    opt_d.zero_grad(set_to_none=True)  # also drops what the generator's step left there
    for i, (batch, fake) in enumerate(zip(batches, fakes, strict=True)):
        with sync_on_last(objective, i, len(batches)), autocast_for(batch):
            parts = objective(batch, nimg, None, fake=fake)
            (parts.pop("loss") / len(batches)).backward()
        accumulate(out, parts, len(batches))
    opt_d.step()
    if not math.isfinite(out["d_loss"]):
        raise FloatingPointError(f"discriminator loss is {out['d_loss']} at {nimg} images")
    return out


def sync_on_last(objective, i: int, n: int):
    """DDP's ``no_sync`` for all but the last of ``n`` micro-batches (a no-op without DDP)."""
    no_sync = getattr(objective, "no_sync", None)  # DDP only
    return nullcontext() if i == n - 1 or no_sync is None else no_sync()


def accumulate(out: dict[str, float], parts: dict, n: int) -> None:
    """Add the scalar entries of ``parts``, divided by ``n`` (micro-batch means), to ``out``."""
    for k, v in parts.items():
        if torch.is_tensor(v) and v.numel() == 1:
            out[k] = out.get(k, 0.0) + float(v.detach()) / n


def autocast_for(batch: dict[str, torch.Tensor]):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there)."""
    device = next(iter(batch.values())).device
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def report_checkpoint(
    runtime: Runtime, job: Job, ema, opt, state: dict, curve: list, opt_d=None
) -> None:
    metrics = {
        "nimg": float(state["nimg"]),
        **{k: float(v) for k, v in (curve[-1] if curve else {}).items()},
    }
    if runtime.rank != 0:
        runtime.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, job, ema, opt, state, curve, opt_d)
        runtime.report(metrics, d)
