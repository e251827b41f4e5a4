"""The test session: its environment, its markers, and one real local Ray instance (Ray's own
testing advice) that every test marked `ray` shares.

Isolation. The session never talks to anything the shell points at: the variables that send Ray
to another cluster or MLflow to another store (a server, a Databricks workspace, an experiment or
run to log into, credentials) are removed here, at import, before any test module imports Ray or
MLflow. Training and sweeps then log to the sqlite store of their own run directory, which is
what the tests assert.

Markers (registered in pyproject.toml, `--strict-markers`):
  slow         more than ~10 s on 2 cores; `pytest -m "not slow"` is the inner loop
  ray          starts or uses Ray; `pytest -m "not ray"` starts no Ray at all (checked below)
  gpu          needs CUDA; skipped without it
  own_cluster  starts a Ray cluster of its own (tests/test_jobs.py): moved before every other
               test, so it runs before the session's Ray exists and the two never run at once
A test that uses the `ray_local` fixture, directly or through another fixture, is marked `ray`
even if its module forgot to say so.
"""

import os
import sys

import pytest

_REDIRECTS = (
    # Ray: another cluster, namespace or job, token auth for one
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_REDIS_ADDRESS",
    "RAY_NAMESPACE",
    "RAY_JOB_ID",
    "RAY_JOB_CONFIG_JSON_ENV_VAR",
    "RAY_OVERRIDE_JOB_RUNTIME_ENV",
    "RAY_RUNTIME_ENV_HOOK",
    "RAY_CLIENT_MODE",
    "RAY_STORAGE",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    # MLflow: another store, experiment, run or artifact root, and a server's credentials
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "MLFLOW_ACTIVE_MODEL_ID",
    "MLFLOW_ARTIFACT_URI",
    "MLFLOW_DEFAULT_ARTIFACT_ROOT",
    "MLFLOW_TRACKING_DIR",
    "MLFLOW_REGISTRY_DIR",
    "MLFLOW_WORKSPACE",
    "MLFLOW_WORKSPACE_STORE_URI",
    "MLFLOW_ENABLE_WORKSPACES",
    "MLFLOW_GATEWAY_URI",
    "MLFLOW_DEPLOYMENTS_TARGET",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_AWS_SIGV4",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
_REDIRECT_PREFIXES = ("DATABRICKS_",)

for _name in list(os.environ):
    if _name in _REDIRECTS or _name.startswith(_REDIRECT_PREFIXES):
        del os.environ[_name]

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default: start, first report and end
# each wait for a poll, ~2-3 s of idle time per TorchTrainer fit, and the suite fits dozens
# (measured: a trivial one-worker fit 12.4 -> 9.7 s). Faster polling changes no result.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# ...and starts a PreemptionWatcher actor (a fresh worker process) with every worker group, to
# watch for nodes being drained; no test drains a node. tests/test_quiet_output.py turns it back
# on in its child, whose check counts that watcher's lines.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _ray_running() -> bool:
    """Whether this process has Ray initialised (without importing Ray if nothing did)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: before `-m` deselects (so the automatic `ray` mark counts), and still after
    # pytest-randomly's shuffle, which runs in a hook wrapper before every plain implementation
    for item in items:
        if "ray_local" in item.fixturenames and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
    # stable: the random order of everything else is kept
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(autouse=True)
def _ray_only_when_marked(request):
    """A test not marked `ray` must not start Ray in this process (so `-m "not ray"` never
    does); one that does fails, and its Ray is shut down so the next test starts clean."""
    before = _ray_running()
    yield
    if before or request.node.get_closest_marker("ray") is not None or not _ray_running():
        return
    sys.modules["ray"].shutdown()
    pytest.fail(f"{request.node.nodeid} started Ray but is not marked `ray`", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs on this 2-core machine (overcommit avoids deadlocks)."""
    import ray

    if ray.is_initialized():  # e.g. a test not marked `ray` that started it and failed
        ray.shutdown()
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
