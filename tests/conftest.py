"""Shared fixtures and the test process's environment (threads, Ray Train polling).

One thread per BLAS / OpenMP pool in this process (and what it starts): the tests run on
2 cores beside Ray's own processes (each of its workers already computes on one thread),
and a 2-thread pool there spends more time handing tiny tensors between its threads, or
waiting for a thread that another process holds, than computing: the samplers' and training
loops' small ops run 10-20x slower on 2 busy cores than on one. Set before numpy and torch
are imported; an explicit setting in the environment is kept.

One local Ray session per test process (``make test`` runs two, pytest-xdist, each module
whole in one of them): every module that needs Ray asks for ``ray_session`` and gets that
process's cluster, started at the first such test and shut down at the end, instead of
paying Ray's start-up (GCS, raylet, workers importing torch) and shutdown once per module.
Two sessions on one machine are two independent local clusters. It has what the most demanding module needs: 2 CPUs, as on CI,
and one declared GPU that no task can use here (no CUDA; test_pipeline schedules its GPU
paths on it and their computation falls back to the CPU). Tasks that ask for no GPU are
placed as before. test_jobs starts its own head (own temp dir, ports and token) and never
joins this one.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Ray Train, for every Ray process started from here (test_jobs' head too): each phase of
# a TorchTrainer run (start, each report, the end) waits for the controller's next poll of
# its workers, every 2 s by default, ~4 s per run at 0.5 s; the preemption watcher (one
# more actor per run) watches for cloud spot-node preemption, which a local node never sees
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to one torch thread before every test: code under test may raise it for the
    rest of the process (train_asset sets the machine's core count)."""
    import torch

    threads = os.environ["OMP_NUM_THREADS"].split(",")[0]
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A randomly initialised InceptionV3 weights file (test_fid.random_inception_file),
    written once and shared by test_fid, test_metrics and test_pipeline (read-only)."""
    from tests.test_fid import random_inception_file

    return random_inception_file(tmp_path_factory.mktemp("inception"))
