"""MLflow runs for the stages: where the store is, the experiment, and runs that survive resumes.

MLflow 3 defaults to `sqlite:///mlflow.db` in the *current* directory, and an experiment created
inside a Ray worker gets its artifact root under that worker's ephemeral CWD. So the store and the
artifact root are always absolute paths decided on the driver, and the experiment is created
there. Workers receive only a tracking URI and a run id and log through `MlflowClient`, which
keeps no process-global "active run" state.

A tracking URI may carry credentials (`http://user:password@host`, `?token=...`); anything that
prints or stores one goes through `redact` first.

Tracking is on by default; `tracking.tracking_uri: none` (or `off`) turns it off, and a missing
or broken MLflow install degrades to a one-line warning rather than failing a training run.

The experiment is `cfg.experiment`, resolved the way MLflow resolves one: a name in the config
file or in `--set` wins; a config that names none takes MLFLOW_EXPERIMENT_NAME if set, else
"puma-ray". That happens once, when the config is validated (`puma_ray.config._experiment`), so
the driver, the Ray workers it hands the config to, `puma-ray report` and `puma-ray config` all
see the same name, whatever the workers' environment says.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from puma_ray import storage
from puma_ray.config import TrackingConfig

DISABLED_URIS = ("none", "off", "false", "disabled")
# Query parameters whose values are secrets (matched as substrings, case-insensitively).
SECRET_PARAMS = ("token", "password", "passwd", "pwd", "secret", "key", "auth", "credential", "sig")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s]+@")
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=[^&;#\s]*")


def redact(uri: str | None) -> str | None:
    """`uri` (or any text holding URIs) with the credentials replaced by `***`: the user:password
    of the netloc and the values of query parameters named like token, password, secret or key.
    For everything that prints or stores a tracking URI (logs, pipeline.json, reports)."""
    if not uri:
        return uri
    from urllib.parse import unquote

    def param(m: re.Match) -> str:
        name = unquote(m["name"]).lower()
        if any(s in name for s in SECRET_PARAMS):
            return f"{m['lead']}{m['name']}=***"
        return m.group(0)

    return _PARAM.sub(param, _USERINFO.sub(r"\g<scheme>***@", uri))


def _local_base(run_dir: str | None) -> str:
    local = storage.local_path(run_dir) if run_dir is not None else None
    return local or os.getcwd()  # a remote run directory cannot hold a sqlite file


def tracking_uri(cfg: TrackingConfig, run_dir: str | None) -> str | None:
    """The tracking URI (absolute), or None when tracking is switched off: the config's, else
    MLFLOW_TRACKING_URI (a shared server on a cluster), else a sqlite store in the run dir."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None and uri.strip().lower() in DISABLED_URIS:
        return None
    if uri:
        return uri
    return f"sqlite:///{_local_base(run_dir)}/mlflow.db"


def artifact_location(cfg: TrackingConfig, run_dir: str | None) -> str | None:
    """Where a new experiment keeps artifacts: the configured place; else, with a tracking
    server, whatever the server decides (None); else `<run_dir>/mlartifacts`."""
    if cfg.artifact_location:
        loc = cfg.artifact_location
        return loc if "://" in loc else "file://" + os.path.abspath(loc)
    uri = tracking_uri(cfg, run_dir) or ""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if run_dir is not None and not storage.is_local(run_dir):
        return storage.join(run_dir, "mlartifacts")
    return "file://" + os.path.join(_local_base(run_dir), "mlartifacts")


@dataclass(frozen=True)
class RunHandle:
    """What a worker needs to log into a run created on the driver (picklable). Its repr
    redacts the URI, so a handle in a log line or an error message leaks no credentials."""

    tracking_uri: str
    run_id: str

    def __repr__(self) -> str:
        return f"RunHandle(tracking_uri={redact(self.tracking_uri)!r}, run_id={self.run_id!r})"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Log the finite numeric values of `metrics` at `step`."""
        items = _metric_items(metrics, step)
        if items:
            self.client().log_batch(self.run_id, metrics=items)

    def log_new_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """`log_metrics`, leaving out each key already logged at `step` or a later step. A
        training attempt that resumes from an older checkpoint reruns epochs an earlier attempt
        may have logged; MLflow would keep both points, so the history would count them twice."""
        client = self.client()
        items = [
            m
            for m in _metric_items(metrics, step)
            if all(h.step < step for h in client.get_metric_history(self.run_id, m.key))
        ]
        if items:
            client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client().log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client().set_terminated(self.run_id, status)


def _metric_items(metrics: dict[str, Any], step: int) -> list:
    """MLflow `Metric`s of the finite numeric values of `metrics` (booleans are not metrics)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def start_run(
    cfg: TrackingConfig,
    run_dir: str | None,
    *,
    run_name: str,
    params: dict | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    log=print,
) -> RunHandle | None:
    """Create (or reopen, when `resume_run_id` names an existing run) an MLflow run on the
    driver and return a handle for it; None when tracking is off or MLflow is unusable."""
    uri = tracking_uri(cfg, run_dir)
    if uri is None:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
                if run.info.lifecycle_stage == "active":
                    client.update_run(resume_run_id, status="RUNNING")
                    return RunHandle(uri, resume_run_id)
            except Exception:  # deleted store or run: start a new one
                pass
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            exp_id = client.create_experiment(
                cfg.experiment, artifact_location=artifact_location(cfg, run_dir)
            )
        else:
            exp_id = exp.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        handle = RunHandle(uri, run.info.run_id)
        if params:
            from mlflow.entities import Param

            flat = _flatten(params)
            items = [Param(k, v) for k, v in sorted(flat.items())]
            for i in range(0, len(items), 100):
                client.log_batch(handle.run_id, params=items[i : i + 100])
        return handle
    except Exception as e:  # tracking must never take a training run down with it
        log(
            f"warning: MLflow tracking disabled for this run ({type(e).__name__}: "
            f"{redact(str(e))}) [store {redact(uri)}]"
        )
        return None


def safe(fn, *args, log=print, **kwargs) -> None:
    """Call a logging function; a failure becomes a warning."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # its message may quote the tracking URI
        log(f"warning: MLflow logging failed ({type(e).__name__}: {redact(str(e))[:200]})")


# ----------------------------------------------------------------------------------------------
# Helpers for sweeps and reports (additions; everything above keeps its behaviour).


def absolute_uri(uri: str) -> str:
    """`sqlite:///rel/path.db` made absolute against this process's CWD; other URIs as given.
    Tune trials and Train workers run in other directories, so a relative sqlite
    path would give each of them its own empty store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def run_page(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """(the command that serves the store, the URL of the run's page in the MLflow UI). The UI
    opens an experiment on its overview, which for classic runs may show nothing; the run page
    (`#/experiments/<id>/runs/<run id>`) shows the run, its children and its metrics. A server
    store is its own UI; a local store is served by `mlflow ui` on 127.0.0.1:5000."""
    uri = redact(tracking_uri)
    experiment = "0"
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # tracking must never fail the caller
        pass
    if uri.startswith(("http://", "https://")):
        return "", f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    command = f"mlflow ui --backend-store-uri {uri}"
    return command, f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"


def sqlite_path(uri: str) -> str | None:
    """The database file of a sqlite URI (None for other stores)."""
    prefix = "sqlite:///"
    return uri[len(prefix) :] if uri.startswith(prefix) else None


def git_revision(path: str | None = None) -> str | None:
    """The commit of the git checkout holding `path` (default: this package), suffixed with
    `-dirty` when tracked files differ from it; None outside a checkout or without git."""
    import subprocess

    where = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None


def log_params(handle: RunHandle, params: dict) -> None:
    """Log nested `params` flattened to dotted keys ("pruning.ratio"), 100 per request. MLflow
    refuses to change a logged param, so callers log each key with one value per run."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(_flatten(params).items())]
    client = handle.client()
    for i in range(0, len(items), 100):
        client.log_batch(handle.run_id, params=items[i : i + 100])


def set_tags(handle: RunHandle, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    if items:
        handle.client().log_batch(handle.run_id, tags=items)


def log_bytes(handle: RunHandle, name: str, data: bytes | str, artifact_path: str | None) -> None:
    """Log `data` as the artifact file `<artifact_path>/<name>`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        handle.log_artifact(path, artifact_path)
