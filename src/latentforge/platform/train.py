"""Ray Train jobs for tokenizers and generators: one loop, two objectives.

The Ray boundary follows STYLE.md: ``train_loop_per_worker(config: dict)`` rebuilds the
typed config and calls the plain :func:`fit` with a :class:`Runtime`. A checkpoint is a
directory of safetensors weights of the unwrapped model (+ EMA), the optimizer state
(loadable with ``weights_only=True``), ``state.json`` (images seen) and ``curve.json``
(the loss curve so far); a tokenizer trained with a GAN adds its discriminator
(``discriminator.safetensors``, kept out of the tokenizer's weights) and that optimizer's
state (``optimizer_disc.pt``). Resume = rerun the same command: the Ray Train run is named by
the stage's config hash, and Train V2 hands the latest checkpoint back to the loop; a worker
that crashes is restarted the same way, up to ``ray.max_failures`` times (the test hook
``LATENTFORGE_FAULT_AT_IMAGES``, :func:`fault_hook`, crashes one on purpose).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latentforge.config import ConfigError, ExperimentConfig, from_dict, to_dict
from latentforge.registry import GENERATORS, TOKENIZERS

# --------------------------------------------------------------------------- runtime


class Runtime:
    """Where a training loop runs: rank, device, data, reporting, checkpoints."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def checkpoint_dir(self):
        """Context manager yielding the latest checkpoint directory, or None."""
        raise NotImplementedError


class LocalRuntime(Runtime):
    """One process, in-memory arrays: for tests and debugging without Ray."""

    def __init__(self, arrays: dict[str, np.ndarray], out_dir: str | Path):
        self.arrays = arrays
        self.out_dir = Path(out_dir)
        self.reports: list[dict[str, float]] = []

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        yield from shuffled_batches([self.arrays], batch_size, seed)  # one chunk: all rows

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            dest = self.out_dir / "checkpoint"
            dest.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                (dest / f.name).write_bytes(f.read_bytes())

    def checkpoint_dir(self):
        from contextlib import nullcontext

        ck = self.out_dir / "checkpoint"
        return nullcontext(str(ck) if (ck / "state.json").exists() else None)


SHUFFLE_CHUNK = 64  # batches' worth of rows a Ray worker pulls at a time and shuffles


def shuffled_batches(
    chunks: Iterable[dict[str, np.ndarray]], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows from a stream of chunks (dicts of arrays): each chunk,
    with the rows the previous one left over, is permuted by a generator seeded with
    ``seed`` and cut into batches; a trailing incomplete batch is dropped. Pulling large
    chunks and slicing them here costs far less per step than asking Ray Data for every
    small batch (the demo's generator: 600 instead of 540 images/s on 2 cores), and
    shuffles better than a buffer of a few batches."""
    rng = np.random.default_rng(seed)
    carry: dict[str, np.ndarray] = {}
    for chunk in chunks:
        if carry:
            chunk = {k: np.concatenate([carry[k], v]) for k, v in chunk.items()}
        n = len(next(iter(chunk.values())))
        order = rng.permutation(n)
        full = n - n % batch_size
        for i in range(0, full, batch_size):
            idx = order[i : i + batch_size]
            yield {k: torch.from_numpy(v[idx]) for k, v in chunk.items()}
        carry = {k: v[order[full:]] for k, v in chunk.items()}


class RayRuntime(Runtime):
    """Inside a Ray Train worker: DDP over the worker group, dataset shard ``train``.
    ``fault``: the armed test hook of :func:`fault_hook`, or None (always, outside tests)."""

    def __init__(self, fault: dict | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.fault = fault
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        chunks = shard.iter_batches(batch_size=SHUFFLE_CHUNK * batch_size, batch_format="numpy")
        yield from shuffled_batches(chunks, batch_size, seed)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if self.fault and ckpt is not None and metrics["nimg"] >= self.fault["at_images"]:
            inject_fault(self.fault["marker"], metrics["nimg"])

    def checkpoint_dir(self):
        from contextlib import nullcontext

        import ray.train

        ck = ray.train.get_checkpoint()
        return ck.as_directory() if ck is not None else nullcontext(None)


# --------------------------------------------------------------------------- jobs


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


class TokenizerObjective(nn.Module):
    """Calls ``Tokenizer.loss`` through ``forward`` so DDP sees the call. The discriminator
    (if any) is a submodule, so DDP synchronises it too; called with ``fake=``
    (reconstructions of the autoencoder's step) the objective is the discriminator's loss."""

    def __init__(self, tokenizer: nn.Module, discriminator: nn.Module | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator

    def forward(self, batch: dict[str, torch.Tensor], nimg: int, generator=None, fake=None):
        images = images_to_float(batch["image"])
        if fake is not None:
            return self.tokenizer.discriminator_loss(self.discriminator, images, fake)
        if self.discriminator is None:
            return self.tokenizer.loss(images, nimg)
        return self.tokenizer.loss(images, nimg, discriminator=self.discriminator)


class GeneratorObjective(nn.Module):
    """Normalises latents with the dataset statistics, then the transport loss."""

    def __init__(self, model: nn.Module, transport, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.transport = transport
        self.register_buffer("mean", mean.view(1, -1), persistent=False)
        self.register_buffer("std", std.view(1, -1), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], nimg: int, generator=None):
        latent, feats = flip_augment(batch, generator)
        shape = (1, -1) + (1,) * (latent.ndim - 2)  # (B, C, H, W) or 1-D tokens (B, C, N)
        x1 = (latent - self.mean.view(shape)) / self.std.view(shape)
        cls = standardize_cls(batch["vfm_cls"]) if "vfm_cls" in batch else None
        return self.transport.loss(
            self.model, x1, batch["label"].long(), generator=generator, features=feats, cls=cls
        )


def standardize_cls(cls: torch.Tensor) -> torch.Tensor:
    """REG's class token at unit scale, like the normalised latents: each vector to zero
    mean and unit variance over its dimensions (the VFM's own scale is arbitrary; the
    mirrored image keeps the token, which describes the whole image)."""
    cls = cls.float()
    return (cls - cls.mean(-1, keepdim=True)) / cls.std(-1, keepdim=True).clamp(min=1e-6)


def flip_augment(batch: dict[str, torch.Tensor], generator=None):
    """LightningDiT's flip augmentation: with ``latent_flip`` in the batch (the latent of the
    mirrored image), each sample takes it with probability 0.5, drawn from ``generator``;
    its REPA features (B, D, h, w) are mirrored with it. Returns (latent, features or None)."""
    latent = batch["latent"].float()
    feats = batch["vfm"].float() if "vfm" in batch else None
    if "latent_flip" not in batch:
        return latent, feats
    flip = torch.rand(len(latent), generator=generator, device=latent.device) < 0.5  # (B,)
    mirrored = batch["latent_flip"].float()
    latent = torch.where(flip.view(-1, *[1] * (latent.ndim - 1)), mirrored, latent)
    if feats is not None:
        feats = torch.where(flip.view(-1, 1, 1, 1), feats.flip(-1), feats)
    return latent, feats


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float [-1, 1] (B, 3, H, W)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def build_tokenizer(cfg: ExperimentConfig) -> nn.Module:
    return TOKENIZERS.build(cfg.tokenizer.name, cfg.tokenizer, cfg.data.resolution)


def repa_dim(cfg: ExperimentConfig, stats: dict[str, Any]) -> int:
    """Width of the stored VFM features REPA aligns to; 0 when REPA is off."""
    if cfg.generator.transport.repa_weight <= 0:
        return 0
    if "vfm_shape" not in stats:
        raise ConfigError(
            "generator.transport.repa_weight > 0 needs VFM features stored with the "
            "latents: set extract.vfm (e.g. extract.vfm=local:shapes-vit)"
        )
    return int(stats["vfm_shape"][0])


def reg_dim(cfg: ExperimentConfig, stats: dict[str, Any]) -> int:
    """Width of the VFM class token REG generates (0 without REG)."""
    if cfg.generator.transport.reg_weight <= 0:
        return 0
    if "vfm_cls_dim" not in stats:
        raise ConfigError(
            "generator.transport.reg_weight > 0 needs the VFM class token stored with the "
            "latents: set extract.vfm (a VFM with a class token) and extract again"
        )
    return int(stats["vfm_cls_dim"])


def build_generator(cfg: ExperimentConfig, stats: dict[str, Any]) -> nn.Module:
    """The configured generator for the extracted latents described by ``stats``; with REPA,
    its projector is sized to the stored VFM features; with REG, its class-token layers to
    the stored class token."""
    dim = repa_dim(cfg, stats)
    extra = {"repa_dim": dim} if dim else {}
    if reg := reg_dim(cfg, stats):
        extra["reg_dim"] = reg
    return GENERATORS.build(
        cfg.generator.name,
        cfg.generator,
        tuple(stats["latent_shape"]),
        cfg.data.num_classes,
        **extra,
    )


def build_transport(cfg: ExperimentConfig):
    from latentforge.generators.transport import Transport

    return Transport(cfg.generator.transport)


def tokenizer_job(cfg: ExperimentConfig) -> Job:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and rank
    model = build_tokenizer(cfg)
    disc = model.make_discriminator()
    tc = cfg.train
    return Job(
        "tokenizer",
        model,
        TokenizerObjective(model, disc),
        int(tc.tokenizer_images),
        tc.tokenizer_batch_size,
        tc.tokenizer_lr,
        tc.ema_decay,
        betas=tuple(tc.tokenizer_betas),
        discriminator=disc,
        disc_lr=getattr(cfg.tokenizer, "disc_lr", None) or tc.tokenizer_lr,
        disc_betas=tuple(getattr(cfg.tokenizer, "disc_betas", (0.5, 0.9))),
    )


def generator_job(cfg: ExperimentConfig, stats: dict[str, Any]) -> Job:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and rank
    model = build_generator(cfg, stats)
    mean = torch.tensor(stats["mean"], dtype=torch.float32)
    std = torch.tensor(stats["std"], dtype=torch.float32)
    objective = GeneratorObjective(model, build_transport(cfg), mean, std)
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
    )


# --------------------------------------------------------------------------- the loop


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the unwrapped model (no ``module.`` prefixes)."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


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


def lr_at(nimg: int, base_lr: float, warmup_images: float) -> float:
    """Linear warm-up, then constant (LightningDiT and VA-VAE use a constant lr)."""
    return base_lr * min(1.0, (nimg + 1) / max(warmup_images, 1.0))


def save_checkpoint(path: str, job: Job, ema, opt, state: dict, curve: list, opt_d=None) -> None:
    save_file(state_dict_of(job.model), os.path.join(path, "model.safetensors"))
    if ema is not None:
        save_file(state_dict_of(ema), os.path.join(path, "ema.safetensors"))
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.pt"))
    if job.discriminator is not None:
        save_file(state_dict_of(job.discriminator), os.path.join(path, "discriminator.safetensors"))
        torch.save(opt_d.state_dict(), os.path.join(path, "optimizer_disc.pt"))
    Path(path, "state.json").write_text(json.dumps(state))
    Path(path, "curve.json").write_text(json.dumps(curve))


def load_checkpoint(path: str, job: Job, ema, opt, opt_d=None) -> tuple[dict, list]:
    job.model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    # on the CPU first (a GPU-saved state would otherwise land on cuda:0 on every rank, or
    # fail on a CPU-only run); load_state_dict moves it to the parameters' device
    load = partial(torch.load, map_location="cpu", weights_only=True)
    opt.load_state_dict(load(os.path.join(path, "optimizer.pt")))
    if job.discriminator is not None:
        disc = load_file(os.path.join(path, "discriminator.safetensors"))
        job.discriminator.load_state_dict(disc)
        opt_d.load_state_dict(load(os.path.join(path, "optimizer_disc.pt")))
    state = json.loads(Path(path, "state.json").read_text())
    curve = json.loads(Path(path, "curve.json").read_text())
    return state, curve


def make_optimizers(job: Job, tc) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """AdamW for the model; Adam for the discriminator, if any (constant lr, no weight decay,
    as in Esser et al. 2021 and VA-VAE)."""
    params = [p for p in job.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=tc.weight_decay, betas=job.betas)
    if job.discriminator is None:
        return opt, None
    disc = job.discriminator.parameters()
    return opt, torch.optim.Adam(disc, lr=job.disc_lr, betas=job.disc_betas)


def fit(cfg: ExperimentConfig, job: Job, runtime: Runtime, log: Callable = print) -> dict:
    """Train ``job`` to ``job.total_images`` images seen; resume from the runtime's checkpoint."""
    tc = cfg.train
    job.model.to(runtime.device)
    job.objective.to(runtime.device)
    ema = copy.deepcopy(job.model).eval().requires_grad_(False)
    opt, opt_d = make_optimizers(job, tc)
    state, curve = {"nimg": 0, "epoch": 0}, []
    with runtime.checkpoint_dir() as ck:
        if ck is not None:
            state, curve = load_checkpoint(ck, job, ema, opt, opt_d)
            state.setdefault("resumed_at", []).append(state["nimg"])  # provenance of restarts
            log(f"[{job.kind}] resumed at {state['nimg']} images")
        elif job.init_from:
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
    objective = runtime.wrap(job.objective)
    if tc.compile:
        objective = torch.compile(objective, backend=tc.compile)
    accum = max(1, tc.grad_accum)
    if job.batch_size % (runtime.world_size * accum):
        raise ValueError(
            f"train.{job.kind}_batch_size {job.batch_size} is not a multiple of ray.num_workers "
            f"{runtime.world_size} x train.grad_accum {accum}: the global batch would change"
        )
    local_bs = job.batch_size // (runtime.world_size * accum)
    global_bs = local_bs * runtime.world_size * accum  # images per optimizer step
    next_log = state["nimg"] + tc.log_every_images
    next_ckpt = state["nimg"] + tc.checkpoint_every_images
    sums, counts, count, t0 = {}, {}, 0, time.time()
    gen = torch.Generator(device=runtime.device)
    while state["nimg"] < job.total_images:
        epoch_seed = tc.seed * 1_000_003 + state["epoch"] * 1009 + runtime.rank
        skip = state.get("step_in_epoch", 0)  # groups of this epoch a resumed run has done
        i = -1
        for i, group in enumerate(grouped(runtime.batches(local_bs, epoch_seed), accum)):
            if i < skip:
                continue
            group = [
                {k: v.to(runtime.device, non_blocking=True) for k, v in b.items()} for b in group
            ]
            seed_step(gen, tc.seed, runtime.rank, state["nimg"])
            parts = train_step(objective, opt, group, state["nimg"], gen, job, tc, opt_d)
            ema_update(ema, job.model, ema_decay_at(state["nimg"] // global_bs, job.ema_decay))
            state["nimg"] += global_bs
            state["step_in_epoch"] = i + 1
            for k, v in parts.items():  # averaged over the steps that report them
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            count += 1
            done = state["nimg"] >= job.total_images
            if state["nimg"] >= next_log or done:
                point = {"nimg": state["nimg"], **{k: v / counts[k] for k, v in sums.items()}}
                point["images_per_s"] = count * global_bs / max(time.time() - t0, 1e-9)
                curve.append(point)
                log(f"[{job.kind}] " + " ".join(f"{k}={v:.4g}" for k, v in point.items()))
                sums, counts, count, t0 = {}, {}, 0, time.time()
                next_log += tc.log_every_images
            if state["nimg"] >= next_ckpt or done:
                report_checkpoint(runtime, job, ema, opt, state, curve, opt_d)
                next_ckpt += tc.checkpoint_every_images
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
    objective, opt, batches: list, nimg, gen, job: Job, tc, opt_d=None
) -> dict[str, float]:
    """One optimizer step over ``batches`` (gradient accumulation: each micro-batch's loss
    is divided by their number; DDP synchronises gradients on the last one only); with a
    discriminator optimizer ``opt_d``, then the discriminator's step."""
    for group in opt.param_groups:
        group["lr"] = lr_at(nimg, job.lr, tc.warmup_images)
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
    if tc.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), tc.grad_clip)
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
    from contextlib import nullcontext

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


# --------------------------------------------------------------------------- Ray entry


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: rebuild the typed config and run :func:`fit`."""
    cfg = from_dict(config["experiment"], source=config.get("source", "<ray>"))
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    runtime = RayRuntime(fault=config.get("fault"))
    if config["kind"] == "tokenizer":
        job = tokenizer_job(cfg)
    else:
        job = generator_job(cfg, config["stats"])
    log = print if runtime.rank == 0 else (lambda *_: None)
    fit(cfg, job, runtime, log=log)


def scaling(cfg: ExperimentConfig) -> dict:
    """Ray Train's ScalingConfig arguments for ``cfg.ray``."""
    rc = cfg.ray
    if rc.accelerator_type and not rc.use_gpu:
        raise ConfigError(
            "ray.accelerator_type is the Train workers' GPU type: set ray.use_gpu=true"
        )
    resources = {"CPU": rc.cpus_per_worker} | ({"GPU": 1} if rc.use_gpu else {})
    out = {"num_workers": rc.num_workers, "use_gpu": rc.use_gpu, "resources_per_worker": resources}
    return out | ({"accelerator_type": rc.accelerator_type} if rc.accelerator_type else {})


def run_trainer(cfg: ExperimentConfig, kind: str, name: str, dataset, stats: dict | None = None):
    """Run one Ray Train job; return its final :class:`ray.train.Checkpoint`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = str(Path(cfg.run_dir, "ray").resolve())
    loop_config = {"experiment": to_dict(cfg), "kind": kind, "stats": stats}
    if fault := fault_hook(storage, name):
        loop_config["fault"] = fault
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(**scaling(cfg)),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        datasets={"train": dataset},
    )
    before = _live_groups()
    result = trainer.fit()
    wait_for_release(before)
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} training ended without a checkpoint ({storage}/{name})")
    return result.checkpoint


FAULT_ENV = "LATENTFORGE_FAULT_AT_IMAGES"


def fault_hook(storage: str, name: str) -> dict | None:
    """Test hook for fault tolerance, read on the driver: with ``LATENTFORGE_FAULT_AT_IMAGES=N``
    set, rank 0 of the Train worker group kills itself (SIGKILL, a real crash) right after its
    first checkpoint at N images or more, once per run: it first writes the marker
    ``fault_injected.json`` (images seen, pid) into the run's directory ``storage/name``, and
    an existing marker disarms the hook, so the restarted worker group trains on. Passed to
    the workers in the loop's config (the driver's environment does not reach them). Unset,
    as outside tests: None, and the loop has no hook."""
    at = os.environ.get(FAULT_ENV)
    if not at:
        return None
    return {"at_images": float(at), "marker": str(Path(storage, name, "fault_injected.json"))}


def inject_fault(marker: str, nimg: float) -> None:
    """Crash this worker process unless ``marker`` exists (see :func:`fault_hook`). It waits
    until Ray Train has registered the checkpoint just reported (``ray.train.report`` returns
    once it is uploaded, before the controller has taken it in), so the restart finds it."""
    import ray.train

    if Path(marker).exists():
        return
    ray.train.get_all_reported_checkpoints()  # blocks until every report is processed
    Path(marker).write_text(json.dumps({"nimg": nimg, "pid": os.getpid()}))
    os.kill(os.getpid(), signal.SIGKILL)


def _live_groups() -> set[str]:
    from ray.util import placement_group_table

    return {pid for pid, pg in placement_group_table().items() if pg["state"] != "REMOVED"}


def wait_for_release(before: set[str], timeout_s: float = 120.0, shared_s: float = 15.0) -> None:
    """Train V2 frees its worker placement group asynchronously after ``fit`` returns;
    wait until the group created since ``before`` is gone, so the next stage's actors
    start at once instead of queueing behind a group that is being torn down. Groups are
    unnamed: when several appeared meanwhile (concurrent sweep trials, whose groups live
    on), wait for one of them to go, for at most ``shared_s``."""
    created = _live_groups() - before
    if not created:
        return
    deadline = time.time() + (timeout_s if len(created) == 1 else shared_s)
    while time.time() < deadline and created <= _live_groups():
        time.sleep(0.5)
