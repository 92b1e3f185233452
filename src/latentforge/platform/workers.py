"""What every Ray worker, task and driver of latentforge does the same way: connect to the
cluster (and keep Ray's own output off the console), rebuild the typed config on the far
side of the Ray boundary, pick threads and device, and schedule stage tasks outside any
enclosing placement group."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import ray
import torch
from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from latentforge.config import ExperimentConfig, from_dict

# Train V2 patches ``print`` in its workers into a logger whose console handler writes to
# stderr, while the original print still reaches stdout: every line of the training loop
# reached the driver twice. Without the patch a print is one line on the worker's stdout.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
HANDLER_NAME = "latentforge-ray-log"


def connect(cfg: ExperimentConfig, log_file: str | Path | None = None) -> None:
    """Attach to the configured or ambient Ray cluster, or start a local one.

    With ``log_file``, Ray's own output goes there instead of the console: its log records
    (driver side), its Python warnings, and every line the workers print; Ray Data's
    progress bars are off. Of the workers' lines only latentforge's own (tagged with a
    stage name, ``[generator] 128/512 images ...``) also reach the console, once each and
    without Ray's ``(RayTrainWorker pid=...)`` prefix. Without ``log_file``: Ray's console."""
    if ray.is_initialized():
        return
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped too
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        ray_output_to(log_file)
        sys.stdout = WholeLines(sys.stdout)  # the workers' lines come from Ray's log thread
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"runtime_env": {"env_vars": WORKER_ENV}}
    if address:
        info = ray.init(address=address, **env)
    else:
        info = ray.init(**env)  # with the dashboard: Train V2 queries the State API it serves
    if log_file is not None:
        forward_worker_lines(log_file)
        where = f"cluster {address}" if address else "local cluster"
        dashboard = f", dashboard http://{info.dashboard_url}" if info.dashboard_url else ""
        print(f"[ray] {where}{dashboard}; Ray's logs -> {log_file} (--ray-logs: here)")


def _file_handler(path: Path, fmt: str) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    handler.set_name(HANDLER_NAME)
    handler.setLevel(logging.INFO)
    return handler


def _retarget(logger: logging.Logger, handler: logging.Handler) -> None:
    """``logger``'s console handlers (and a previous file of ours) replaced by ``handler``."""
    for old in list(logger.handlers):
        console = isinstance(old, logging.StreamHandler) and not isinstance(
            old, logging.FileHandler
        )
        if console or old.get_name() == HANDLER_NAME:
            logger.removeHandler(old)
    logger.addHandler(handler)


def ray_output_to(path: Path) -> None:
    """Ray's driver-side log records (``ray`` and ``ray.data``, which does not propagate),
    and warnings of Ray's categories, to ``path``; Ray Data's progress bars off (the
    setting travels with each dataset into its coordinator and tasks)."""
    import ray.data  # configures the ray.data logger on import

    handler = _file_handler(path, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("ray", "ray.data"):
        _retarget(logging.getLogger(name), handler)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_logger, show = logging.getLogger("ray"), warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] != "ray":
            return show(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line)
        ray_logger.warning(text.rstrip())

    warnings.showwarning = showwarning
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n==== {stamp} {' '.join(sys.argv)}\n")
    native_stderr_to(path)


def native_stderr_to(path: Path) -> None:
    """What is written to file descriptor 2 past Python (Ray's C++ core worker logs its
    errors there, e.g. on every actor pool it creates) to ``path``; Python's
    ``sys.stderr`` (tracebacks, warnings, logging) keeps the console."""
    if not hasattr(sys.stderr, "fileno"):
        return
    try:
        if sys.stderr.fileno() != 2:
            return  # already moved (a test's capture, or a second connect)
    except (OSError, ValueError):
        return
    sys.stderr.flush()
    console = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    encoding = sys.stderr.encoding
    sys.stderr = os.fdopen(console, "w", 1, encoding=encoding, errors="backslashreplace")


def forward_worker_lines(path: Path) -> None:
    """Replace Ray's printer of the workers' stdout and stderr on this driver (the
    ``log_to_driver`` stream) by :class:`WorkerLines`; Ray's session logs keep them too."""
    try:  # private; should Ray move it, its own printer stays
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    logger = logging.getLogger("latentforge.ray_workers")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    _retarget(logger, _file_handler(path, "%(message)s"))
    node = ray._private.worker.global_worker.node
    if node is not None:
        logger.info(f"Ray session logs: {node.get_session_dir_path()}/logs")
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", WorkerLines(logger))


class WholeLines:
    """A text stream that threads share a whole line at a time: what a thread writes goes
    out at its newline (or flush) under one lock, so a worker's line, printed by Ray's log
    thread, never lands inside a line the pipeline is printing."""

    def __init__(self, stream: TextIO):
        self._stream, self._lock, self._local = stream, threading.Lock(), threading.local()

    def write(self, text: str) -> int:
        done, newline, self._local.pending = (self._pending() + text).rpartition("\n")
        if newline:
            self._emit(done + newline)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pending, self._local.pending = self._pending(), ""
        self._emit(pending)

    def _pending(self) -> str:
        return getattr(self._local, "pending", "")

    def _emit(self, text: str) -> None:
        with self._lock:
            if text:
                self._stream.write(text)
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...
        return getattr(self._stream, name)


class WorkerLines:
    """Driver-side handler of the workers' output lines: each to the log file with Ray's
    ``(name pid=...)`` prefix; latentforge's own (``[stage] ...``: a lower-case tag in
    brackets at the start, as the stages and the training loop log) also to stdout, bare."""

    ours = re.compile(r"\[[a-z][a-z-]*\] ")

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def __call__(self, data: dict) -> None:
        name = data.get("actor_name") or data.get("task_name") or ""
        ip = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}{ip})"
        for line in data.get("lines", []):
            if RAY_TQDM_MAGIC in line:  # a progress-bar update of ray.experimental.tqdm_ray
                continue
            self.logger.info(f"{prefix} {line}")
            if self.ours.match(line):
                print(line, flush=True)


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


def stage_task(fn: Callable[..., Any], cfg: ExperimentConfig):
    """``fn`` as a Ray task holding the run's per-worker CPUs and, with ``ray.use_gpu``, one
    GPU. A GPU task's process exits after it (``max_calls=1``): no CUDA memory or TF32
    setting is left behind for the next task or Train job."""
    gpu = cfg.ray.use_gpu
    remote = ray.remote(max_calls=1) if gpu else ray.remote
    return remote(fn).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=1 if gpu else 0,
        scheduling_strategy=outside_placement_group(),
    )
