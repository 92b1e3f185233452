"""Ray Train jobs for tokenizers and generators: the plain training loop of
:mod:`latentforge.training` inside a TorchTrainer.

At the Ray boundary, ``train_loop_per_worker(config: dict)`` rebuilds the
typed config and calls the plain :func:`~latentforge.training.loop.fit` with a
:class:`RayRuntime`. Resume = rerun the same command: the Ray Train run is named by the
stage's config hash, and Train V2 hands the latest checkpoint back to the loop; a worker
that crashes is restarted the same way, up to ``ray.max_failures`` times.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util import placement_group_table
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from latentforge.config import ConfigError, ExperimentConfig, to_dict
from latentforge.platform.data import training_data_mode, training_rows
from latentforge.platform.workers import worker_setup
from latentforge.training.loop import fit, generator_job, tokenizer_job
from latentforge.training.runtime import SHUFFLE_CHUNK, Runtime, shuffled_batches

if TYPE_CHECKING:
    from latentforge.platform.pipeline import Run


class RayRuntime(Runtime):
    """Inside a Ray Train worker: DDP over the worker group, dataset shard ``train``."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        shard = ray.train.get_dataset_shard("train")
        chunks = shard.iter_batches(batch_size=SHUFFLE_CHUNK * batch_size, batch_format="numpy")
        yield from shuffled_batches(chunks, batch_size, seed)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def checkpoint_dir(self):
        ck = ray.train.get_checkpoint()
        return ck.as_directory() if ck is not None else nullcontext(None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: rebuild the typed config and run :func:`fit`."""
    cfg, _ = worker_setup(config["experiment"])
    runtime = RayRuntime()
    if config["kind"] == "tokenizer":
        job = tokenizer_job(cfg)
    else:
        job = generator_job(cfg, config["stats"])
    log = print if runtime.rank == 0 else (lambda *_: None)
    fit(cfg, job, runtime, log=log)


def scaling(cfg: ExperimentConfig) -> dict:
    """Ray Train's ScalingConfig arguments for ``cfg.ray``."""
    ray_cfg = cfg.ray
    if ray_cfg.accelerator_type and not ray_cfg.use_gpu:
        raise ConfigError(
            "ray.accelerator_type is the Train workers' GPU type: set ray.use_gpu=true"
        )
    resources = {"CPU": ray_cfg.cpus_per_worker} | ({"GPU": 1} if ray_cfg.use_gpu else {})
    out = {
        "num_workers": ray_cfg.num_workers,
        "use_gpu": ray_cfg.use_gpu,
        "resources_per_worker": resources,
    }
    return out | (
        {"accelerator_type": ray_cfg.accelerator_type} if ray_cfg.accelerator_type else {}
    )


def run_trainer(cfg: ExperimentConfig, kind: str, name: str, dataset, stats: dict | None = None):
    """Run one Ray Train job; return its final :class:`ray.train.Checkpoint`."""
    storage = str(Path(cfg.run_dir, "ray").resolve())
    loop_config = {"experiment": to_dict(cfg), "kind": kind, "stats": stats}
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


def _live_groups() -> set[str]:
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


# ----------------------------------------------------------------------------- stage


def train_stage(run: Run, kind: str, dataset, nbytes: int | None, out: Path, stats=None) -> dict:
    """The tokenizer or generator stage: ``dataset`` made ready for training, one Ray Train
    job named by the stage's hash (a rerun resumes it), its final checkpoint copied into
    ``out``. Returns the training state with the checkpoint's path (the full training
    state, for ``train.generator_init``) and the data mode."""
    dataset, mode = training_data(run.cfg, kind, dataset, nbytes, run.log)
    ckpt = run_trainer(run.cfg, kind, f"{kind}-{run.hashes[kind]}", dataset, stats)
    with ckpt.as_directory() as d:
        copy_checkpoint(d, out)
    info = json.loads((out / "state.json").read_text())
    return {**info, "checkpoint": ckpt.path, "training_data": mode}


def copy_checkpoint(ckpt_dir: str | Path, out: Path) -> None:
    """A training run's final checkpoint files into the stage directory (a GAN's
    discriminator too, for a next GAN stage)."""
    for name in ("model.safetensors", "ema.safetensors", "curve.json", "state.json"):
        shutil.copy(Path(ckpt_dir, name), out / name)
    if Path(ckpt_dir, "discriminator.safetensors").exists():
        shutil.copy(Path(ckpt_dir, "discriminator.safetensors"), out / "discriminator.safetensors")


def training_data(cfg: ExperimentConfig, kind: str, dataset, nbytes: int | None, log: Callable):
    """``dataset`` ready for ``kind``'s trainer: ordered for training and materialised, or
    left to stream, as ``ray.training_data`` decides; returns it and the mode."""
    ray_cfg = cfg.ray
    total = ray.cluster_resources()
    store = total.get("object_store_memory", 0)
    mode = training_data_mode(ray_cfg.training_data, nbytes, store, latents=kind == "generator")
    size = "size unknown" if nbytes is None else f"~{nbytes / 2**30:.2f} GiB"
    log(f"[{kind}] training data: {mode} ({size}; object store {store / 2**30:.1f} GiB)")
    if mode == "stream" and total.get("CPU", 0) - ray_cfg.num_workers * ray_cfg.cpus_per_worker < 1:
        log(
            f"[{kind}] streaming reads need a CPU beyond the Train workers': none is free "
            "now (an autoscaling cluster adds a node; on a fixed one lower "
            "ray.num_workers or ray.cpus_per_worker, or set ray.training_data=memory)"
        )
    rows = training_rows(dataset, cfg.data, cfg.train.seed, mode == "stream")
    if mode == "stream":
        return rows, mode
    # blocks in read order: Ray Data otherwise keeps them in the order its (threaded)
    # reads finish, and a rerun of the stage would train on a different order
    rows.context.execution_options.preserve_order = True
    return rows.materialize(), mode
