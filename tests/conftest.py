"""Shared fixtures: one Ray session per test module (2 CPUs, as on CI)."""

import pytest


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
