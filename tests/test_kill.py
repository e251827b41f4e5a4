"""SIGKILL `puma-ray run` at pseudo-random moments, several times over in the same run dir (each
restart resuming the killed one's work, and killed in turn), rerun it to completion, and check
that the result is the uninterrupted run's: the same kept set (ids and eps), the same report
numbers, a pipeline.json whose every stage carries its current fingerprint, no temp file left
behind and no MLflow metric logged twice at one step.

Each `puma-ray run` is a real child process (`python -m puma_ray run`) that starts its own local
Ray; a SIGKILL leaves that Ray's processes running, so every child runs in its own session and
process group, is killed as a group, and anything else it spawned (found by a marker in the
environment it passes down) is killed too before the next step.
"""

import fnmatch
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_pipeline import TINY_STAGES

from puma_ray.config import load_config
from puma_ray.pipeline import STAGES, input_stamps, stage_fingerprints

# own_cluster: each child starts a Ray of its own, so this runs before the session's Ray exists
pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.own_cluster,
    pytest.mark.timeout(3600),
]

SETS = [
    "name=kill",
    *TINY_STAGES,  # the demo's packaged margin model: kills land in scoring, pruning, training
    "training.epochs=2",  # a kill between the epochs resumes from the first one's checkpoint
    # one stream (the data's own mix): with real:synthetic batches the two endless streams'
    # positions are not in the checkpoint, so a resumed epoch draws other rows than an
    # uninterrupted one (a known gap, docs/guarantees.md); this test pins what is exact
    "training.real_fraction=null",
    "ray.num_cpus=4",  # as the tests' shared Ray: overcommit the 2 cores, no stalls
    "ray.object_store_memory=536870912",
    "tracking.experiment=test-kill",
]
KILLS = 3
MARK = "PUMA_RAY_KILL_TEST"


def _env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            MARK: tag,
        }
    )
    return env


def _start(run_dir: str, log_path: str, tag: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "puma_ray", "run", "--run-dir", run_dir]
    argv += [a for s in SETS for a in ("--set", s)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(tag),
            start_new_session=True,  # its own process group: Ray's processes go with it
        )


def _tagged(tag: str) -> list[int]:
    """Pids of this user's processes whose environment carries `tag` (what a child spawned,
    even if it left the process group)."""
    pids = []
    needle = f"{MARK}={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


def _kill_all(child: subprocess.Popen, tag: str) -> None:
    """SIGKILL the child's process group and every process carrying its tag; wait for them."""
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if child.poll() is None:
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if child.poll() is not None and not _tagged(tag):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of {tag} survive SIGKILL: {_tagged(tag)}")
        time.sleep(0.2)


def _run_to_end(run_dir: str, log_path: str, timeout: float) -> float:
    """Run `puma-ray run` to completion; returns its wall time."""
    tag = uuid.uuid4().hex
    start = time.monotonic()
    child = _start(run_dir, log_path, tag)
    try:
        code = child.wait(timeout=timeout)
    finally:
        _kill_all(child, tag)  # a finished driver's Ray is gone; a hung one is not
    assert code == 0, f"puma-ray run exited {code}; see {log_path}"
    return time.monotonic() - start


def _run_and_kill(run_dir: str, log_path: str, delay: float) -> bool:
    """Start `puma-ray run`, SIGKILL it `delay` seconds in; False if it finished first."""
    tag = uuid.uuid4().hex
    child = _start(run_dir, log_path, tag)
    try:
        child.wait(timeout=delay)
        finished = True
    except subprocess.TimeoutExpired:
        finished = False
    _kill_all(child, tag)
    with open(log_path, "a") as log:
        log.write(f"\n=== SIGKILL after {delay:.1f}s (finished first: {finished}) ===\n")
    return not finished


def _kept(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    kept = os.path.join(run_dir, "kept")
    with open(os.path.join(kept, "manifest.json")) as f:
        files = [s["file"] for s in json.load(f)["shards"]]
    tables = [pq.read_table(os.path.join(kept, name), columns=["id", "eps"]) for name in files]
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    eps = np.concatenate([t.column("eps").to_numpy() for t in tables])
    order = np.argsort(ids)
    return ids[order], eps[order]


def _numbers(run_dir: str) -> dict:
    """The report's outcome, without times and run ids (which differ between any two runs)."""
    with open(os.path.join(run_dir, "report.json")) as f:
        r = json.load(f)
    keys = ("rows_scored", "misclassified", "kept", "pruned", "eps_adjusted", "attack")
    return {
        **{k: r[k] for k in keys},
        "methods": [
            {k: m[k] for k in ("method", "rows", "clean_acc", "robust_acc")} for m in r["methods"]
        ],
    }


def _check_consistent(run_dir: str) -> None:
    cfg = load_config(None, SETS)
    fps = stage_fingerprints(cfg, input_stamps(cfg, run_dir))
    with open(os.path.join(run_dir, "pipeline.json")) as f:
        done = json.load(f)["stages"]
    assert done == {s: fps[s] for s in STAGES}

    strays = [
        os.path.join(root, name)
        for root, _dirs, names in os.walk(run_dir)
        for name in names
        if fnmatch.fnmatch(name, "*.tmp-*")
    ]
    assert strays == []

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000)
    assert runs
    for run in runs:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, sorted(steps))


def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """One run dir, killed KILLS times in a row (each restart resumes what the killed one left,
    and is itself killed), then run to the end: the uninterrupted run's outcome."""
    reference = str(tmp_path / "reference")
    duration = _run_to_end(reference, str(tmp_path / "reference.log"), timeout=1800)
    _check_consistent(reference)
    want_ids, want_eps = _kept(reference)
    want = _numbers(reference)

    rng = random.Random(0)
    run_dir, log_path = str(tmp_path / "killed"), str(tmp_path / "killed.log")
    killed = 0
    for _ in range(KILLS):
        # each restart skips what is done, so later kills aim at the earlier part of a run
        killed += _run_and_kill(run_dir, log_path, rng.uniform(0.15, 0.6) * duration)
    _run_to_end(run_dir, log_path, timeout=max(600, 4 * duration))
    ids, eps = _kept(run_dir)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(eps, want_eps)
    assert _numbers(run_dir) == want, f"see {log_path}"
    _check_consistent(run_dir)
    assert killed >= 2, f"only {killed} of {KILLS} runs were still going when killed"
