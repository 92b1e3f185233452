"""What every Ray worker, task and driver of latentforge does the same way: connect to the
cluster, rebuild the typed config on the far side of the Ray boundary, pick threads and
device, and schedule stage tasks outside any enclosing placement group."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from latentforge.config import ExperimentConfig, from_dict


def connect(cfg: ExperimentConfig) -> None:
    """Attach to the configured or ambient Ray cluster, or start a local one."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init()  # with the dashboard: Train V2 queries the State API it serves


def worker_setup(experiment: dict, source: str = "<ray>") -> tuple[ExperimentConfig, str]:
    """Inside a Ray worker or task: the typed config rebuilt from :func:`~latentforge.config.
    to_dict` output, torch's threads set to the worker's CPUs, and the device it computes
    on (``cuda`` when the run uses GPUs and this worker has one, else ``cpu``)."""
    cfg = from_dict(experiment, source=source)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
    return cfg, device


def outside_placement_group() -> PlacementGroupSchedulingStrategy:
    """A scheduling strategy that never lets a task be captured by an enclosing placement
    group (a Tune trial's): Ray Data would limit itself to the trial's tiny bundle, and
    the stage's tasks would queue behind it."""
    return PlacementGroupSchedulingStrategy(placement_group=None)


def stage_task(fn: Callable[..., Any], cfg: ExperimentConfig, gpu: bool | None = None):
    """``fn`` as a Ray task holding the run's per-worker CPUs and, with ``ray.use_gpu`` (or
    ``gpu``), one GPU. A GPU task's process exits after it (``max_calls=1``): no CUDA memory
    or TF32 setting is left behind for the next task or Train job."""
    gpu = cfg.ray.use_gpu if gpu is None else gpu
    remote = ray.remote(max_calls=1) if gpu else ray.remote
    return remote(fn).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if gpu else 0,
        scheduling_strategy=outside_placement_group(),
    )
