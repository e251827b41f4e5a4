"""Where MLflow runs and artifacts go: decided on the driver, absolute, server-aware."""

from puma_ray.cli import _absolute
from puma_ray.config import TrackingConfig
from puma_ray.tracking import artifact_location, tracking_uri


def test_default_store_and_artifacts_live_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig()
    assert tracking_uri(cfg, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert artifact_location(cfg, str(tmp_path)) == f"file://{tmp_path}/mlartifacts"
    assert tracking_uri(TrackingConfig(tracking_uri="none"), str(tmp_path)) is None


def test_a_tracking_server_decides_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    cfg = TrackingConfig()
    assert tracking_uri(cfg, str(tmp_path)) == "http://10.0.0.5:5000"
    assert artifact_location(cfg, str(tmp_path)) is None  # not <job cwd>/mlartifacts
    # a remote run directory keeps its artifacts beside the run
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert artifact_location(cfg, "s3://bucket/runs/x") == "s3://bucket/runs/x/mlartifacts"


def test_cli_paths_are_absolute_and_file_uris_become_paths(tmp_path):
    assert _absolute(f"file://{tmp_path}/run") == f"{tmp_path}/run"
    assert _absolute("s3://bucket/run") == "s3://bucket/run"
    assert _absolute("runs/x").startswith("/")
