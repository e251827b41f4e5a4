"""`ray job submit` of the whole pipeline to a real Ray head, as docs/cluster.md does it.

One head for the module: `ray start --head --block` on free ports with its own --temp-dir,
token authentication on (a fresh random token passed as RAY_AUTH_TOKEN to the head and to every
`ray job` call, so no file in ~/.ray is read or written), and MLFLOW_TRACKING_URI in the head's
environment, which is how cluster.yaml hands the tracking server to every job.

The head is a second Ray cluster on this machine, so its tests are marked `own_cluster`:
tests/conftest.py runs them before every other test, while the session's own Ray (the
`ray_local` fixture, started by the first test that needs it) does not exist yet; the head is
torn down with this module's fixtures before that. The head gets one bounded attempt to start.

Teardown does not use `ray stop`: in Ray 2.60 it takes no address or temp dir and kills every
Ray process on the machine, including other test sessions' and benchmarks' clusters. Instead
the `--block` process gets SIGTERM (Ray then shuts its node down), and every process that
carries this head's marker in its environment is checked for, and killed by pid if one was left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import psutil
import pytest

from puma_ray import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The venv's bin: `ray` and `puma-ray` of the interpreter running the tests. The entrypoint of
# a job runs with the PATH of the `ray start` process, so this directory goes first there.
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
MARKER = "PUMA_RAY_TEST_HEAD"
STAGES = ("ingest", "margin_model", "score", "prune", "train", "evaluate")

# --smoke-test made smaller still, since every second here is CI time: 448 rows, one PGD step in
# training, a 3-step DeepFool, a 1-step PGD evaluation on 64 test images, and the training loop
# in the driver (a TorchTrainer start alone costs ~30 s on 2 cores; tests/test_train.py covers
# Ray Train, and the same job with ray.num_workers=1 was run by hand).
FAST = [
    "ray.num_workers=0",
    "data.sources=[{type: builtin, real_train: 128, real_test: 64, synthetic: 256}]",
    "data.rows_per_shard=128",
    "training.attack.steps=1",
    "margin_model.train.attack.steps=1",
    "scoring.max_iter=3",
    "evaluation.subset=64",
    "evaluation.pgd_steps=1",
]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes started by this module's head: they all inherit MARKER=marker."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


class Head:
    """A real local Ray head for `ray job` commands."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="prj-", dir="/tmp")  # short: Unix socket paths
        self.marker = uuid.uuid4().hex
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
        self.mlflow_db = os.path.join(self.tmp, "mlflow.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.pop("RAY_ADDRESS", None)
        env.update(
            PATH=BIN + os.pathsep + env.get("PATH", ""),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            # SIGTERM then stops the node at once instead of draining it for up to 30 s
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        self.client_env = dict(env)  # what a user's shell has: the token, no marker
        self.head_env = dict(
            env, **{MARKER: self.marker}, MLFLOW_TRACKING_URI=f"sqlite:///{self.mlflow_db}"
        )
        self.proc: subprocess.Popen | None = None
        self.log = None

    def _launch(self, attempt: int) -> None:
        # Explicit free ports for the four that default to fixed numbers (6379, 8265, 10001,
        # 52365), so this head never collides with another Ray instance on the machine.
        ports = _free_ports(4)
        self.gcs_port, self.dashboard_port = ports[0], ports[1]
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = os.path.join(self.tmp, f"ray{attempt}")
        self.log = open(os.path.join(self.tmp, f"ray-start{attempt}.log"), "w")
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats",
            "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={256 * 2**20}",
            f"--temp-dir={self.temp_dir}", f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=self.head_env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.tmp
        )

    def start(self, timeout_s: float = 180) -> None:
        """Start the head and wait until the Jobs API answers an authenticated request: one
        attempt, at most `timeout_s`, then an error that says what happened."""
        self._launch(0)
        start = time.monotonic()
        deadline = start + timeout_s
        started = False
        while time.monotonic() < deadline and self.proc.poll() is None:
            started = "Ray runtime started" in self.output()  # the node is fully up
            with contextlib.suppress(OSError):
                if started and _http_status(f"{self.address}/api/jobs/", self.token) == 200:
                    return
            time.sleep(1)
        code = self.proc.poll()
        tail = self.output()[-3000:]
        self._shutdown()
        if code is not None:
            what = f"`ray start --head` exited with status {code}"
        elif started:
            what = f"the node started but its Jobs API did not answer within {timeout_s:.0f} s"
        else:
            what = f"`ray start --head` was not up within {timeout_s:.0f} s"
        raise RuntimeError(
            f"the test Ray head did not start: {what} after {time.monotonic() - start:.0f} s "
            "(on a loaded machine Ray 2.60's raylet aborts when its dashboard agent takes more "
            "than 15 s to report its port: 'Timed out waiting for file "
            f".../dashboard_agent_listen_port_...'). Log of `ray start`:\n{tail}"
        )

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def job(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job ARGS --address ...` from a shell that has the token, as a user would."""
        return subprocess.run(
            [RAY, "job", *args[:1], "--address", self.address, *args[1:]],
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def _shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Ray drains and stops its node processes
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def stop(self) -> list[str]:
        """Shut the head down; returns what had to be killed by force (should be nothing)."""
        self._shutdown()
        leftovers = _marked(self.marker)
        killed = []
        for p in leftovers:  # ours: they carry this head's marker
            with contextlib.suppress(psutil.Error):
                killed.append(" ".join(p.cmdline()[:3]))
                p.kill()
        psutil.wait_procs(leftovers, timeout=30)
        return killed


@pytest.fixture(scope="module")
def head():
    if sys.modules.get("ray") is not None and sys.modules["ray"].is_initialized():
        pytest.fail(
            "the session's Ray is already running: the own_cluster tests must run before any "
            "test that uses it (tests/conftest.py orders them first)",
            pytrace=False,
        )
    h = Head()
    try:
        h.start()
        yield h
    finally:
        killed = h.stop()
        if killed:
            print(f"killed {len(killed)} processes the head left behind: {killed}")
        still = _marked(h.marker)
        answering = h.proc is not None and (_port_open(h.gcs_port) or _port_open(h.dashboard_port))
        shutil.rmtree(h.tmp, ignore_errors=True)
        assert not still, f"Ray processes of the test head survived: {still}"
        assert not answering, "the test head still answers after stop"


def _entrypoint(run_dir: str, *extra: str) -> list[str]:
    sets = [x for s in FAST for x in ("--set", s)]
    return ["puma-ray", "run", "--smoke-test", "--run-dir", run_dir, *sets, *extra]


def _submit(head: Head, run_dir: str, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    sid = f"puma-{uuid.uuid4().hex[:8]}"
    result = head.job(
        "submit", "--submission-id", sid, "--working-dir", ROOT, "--", *_entrypoint(run_dir, *extra)
    )
    return sid, result


@pytest.mark.own_cluster
@pytest.mark.ray
@pytest.mark.slow
def test_jobs_api_requires_the_token(head):
    url = f"{head.address}/api/jobs/"
    assert _http_status(url, None) == 401
    assert _http_status(url, secrets.token_hex(32)) == 403
    assert _http_status(url, head.token) == 200


@pytest.mark.own_cluster
@pytest.mark.ray
@pytest.mark.slow
def test_submit_pipeline_job(head):
    run_dir = os.path.join(head.tmp, "run")
    start = time.monotonic()
    sid, result = _submit(head, run_dir)
    print(f"job {sid}: {time.monotonic() - start:.0f}s from submission to exit")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]

    status = head.job("status", sid)
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, status
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{head.address}/api/jobs/{sid}", headers={"Authorization": f"Bearer {head.token}"}
        ),
        timeout=30,
    ) as r:
        assert json.load(r)["status"] == "SUCCEEDED"
    logs = head.job("logs", sid).stdout
    assert "[evaluate] done" in logs, logs[-3000:]
    print(logs)  # shown with -rP

    # outputs in the run directory: --smoke-test writes to <run dir>-smoke, never the real one
    assert not os.path.exists(run_dir)
    smoke_dir = run_dir + "-smoke"
    with open(os.path.join(smoke_dir, "pipeline.json")) as f:
        done = json.load(f)["stages"]
    assert set(STAGES) <= set(done), done
    assert os.path.getsize(os.path.join(smoke_dir, "train", "model.pt")) > 0
    with open(os.path.join(smoke_dir, "evaluate", "summary.json")) as f:
        summary = json.load(f)
    assert summary["rows"] == 64 and 0 <= summary["clean_acc"] <= 1

    # MLflow: the job found the store through MLFLOW_TRACKING_URI, inherited from `ray start`
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{head.mlflow_db}")
    exp = client.get_experiment_by_name("puma-ray-smoke")  # a smoke test's own experiment
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    # the demo scores with its packaged margin model: no margin_model run
    assert {"train", "evaluate", "pipeline-demo-smoke"} == names, names
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]

    # the uploaded working_dir: .gitignore honoured (no .venv, runs, bench_out), small
    pkg = re.search(r"Uploading package gcs://(_ray_pkg_\w+)\.zip", out)
    assert pkg, out[-3000:]
    shipped_dir = os.path.join(
        head.temp_dir, "session_latest", "runtime_resources", "working_dir_files", pkg.group(1)
    )
    shipped = set(os.listdir(shipped_dir))
    assert {"puma_ray", "tune_configs", "pyproject.toml"} <= shipped, shipped
    assert not shipped & {".git", ".venv", "runs", "bench_out", "mlflow.db"}, shipped
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(shipped_dir) for f in files
    )
    assert size < 5 * 2**20, f"working_dir upload unpacks to {size / 2**20:.1f} MiB"
    print(f"working_dir: {size / 2**20:.2f} MiB unpacked, top level {sorted(shipped)}")

    # Rerunning the same command resumes: every stage is up to date and skipped.
    start = time.monotonic()
    sid2, again = _submit(head, run_dir)
    print(f"job {sid2} (rerun): {time.monotonic() - start:.0f}s")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    logs2 = head.job("logs", sid2).stdout
    for stage in STAGES:
        assert f"[{stage}] up to date, skipped" in logs2, logs2[-3000:]


# ----------------------------------------------------------------------------------------------
# Run directories given as URIs (what s3:// and gs:// go through), with a file:// URI.


def test_storage_uri_round_trip(tmp_path):
    base = f"file://{tmp_path}/run"
    path = storage.join(base, "stage", "manifest.json")
    assert path == f"file://{tmp_path}/run/stage/manifest.json"
    storage.atomic_write_bytes(path, b"{}")
    assert storage.exists(path) and storage.read_bytes(path) == b"{}"
    assert storage.list_files(storage.join(base, "stage"), ".json") == [
        f"{tmp_path}/run/stage/manifest.json"
    ]
    assert storage.local_path(base) == f"{tmp_path}/run"
    assert storage.local_path("s3://bucket/run") is None
    storage.delete(storage.join(base, "stage"))
    assert not storage.exists(path)


def test_bucket_filesystems_are_reused():
    # gs:// builds its filesystem without a network call, so this runs offline
    fs1, p1 = storage.resolve("gs://bucket/runs/a/model.pt")
    fs2, p2 = storage.resolve("gs://bucket/runs/b/")
    assert fs1 is fs2 and (p1, p2) == ("bucket/runs/a/model.pt", "bucket/runs/b")
    assert storage.resolve("gs://other/x")[0] is not fs1
