"""Shared fixtures. One real local Ray instance per test session (Ray's own testing advice)."""

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs on this 2-core machine (overcommit avoids deadlocks)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=512 * 2**20,
        include_dashboard=None,  # Train V2 cleans placement groups through the state API
        log_to_driver=True,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.default_hash_shuffle_parallelism = 4
    yield ray
    ray.shutdown()
