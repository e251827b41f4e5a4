"""`puma-ray run tune_configs/cifar10_edm1m.yaml --smoke-test --run-dir X` on this 2-core, no-GPU
machine, offline, in a child process: it finishes; X (the real run dir, holding a file of ours)
is untouched; X-smoke has every stage's outputs and its MLflow store the smoke test's own
experiment. Its config is checked field by field in tests/test_smoke_config.py.

The child starts its own Ray, so this runs before the session's shared one (own_cluster)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.own_cluster, pytest.mark.timeout(1800)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM = os.path.join(ROOT, "tune_configs", "cifar10_edm1m.yaml")
STAGES = ("ingest", "margin_model", "score", "prune", "train", "evaluate")


def test_smoke_test_of_the_paper_config_finishes_here_and_leaves_the_run_dir_alone(tmp_path):
    real = tmp_path / "edm1m"
    real.mkdir()
    (real / "notes.txt").write_text("the real run's")
    argv = [sys.executable, "-m", "puma_ray", "run", EDM, "--smoke-test", "--run-dir", str(real)]
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    print(f"smoke test of cifar10_edm1m.yaml: {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, out[-6000:]
    assert "data.sources[1] (npz s3://YOUR_BUCKET/edm/1m.npz: remote, not read offline)" in out

    assert sorted(os.listdir(real)) == ["notes.txt"]
    assert (real / "notes.txt").read_text() == "the real run's"

    smoke = tmp_path / "edm1m-smoke"
    with open(smoke / "pipeline.json") as f:
        assert set(STAGES) <= set(json.load(f)["stages"])
    with open(smoke / "evaluate" / "summary.json") as f:
        ev = json.load(f)
    assert ev["rows"] == 128 and 0 <= ev["pgd_acc"] <= ev["clean_acc"] <= 1
    with open(smoke / "train" / "summary.json") as f:
        assert len(json.load(f)["history"]) == 1  # one epoch

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke}/mlflow.db")
    exp = client.get_experiment_by_name("puma-ray-cifar10-edm1m-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert {"margin_model", "train", "evaluate"} <= {r.info.run_name for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}
