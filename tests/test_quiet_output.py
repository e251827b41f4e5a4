"""The tiny pipeline's output, as a user sees it: `puma-ray run` in a child process with a local
Ray of its own and Ray Train workers (ray.num_workers: 1). By default no line of Ray's or
MLflow's internals reaches the output (counted by this module's own detector, built from the
lines the issue listed and the formats of Ray's and MLflow's loggers), our own lines do
(epoch lines and progress lines from the Train worker, the end summary), and the internals are
in the log file the run names; with `-v` they are in the output.

Each child starts its own Ray, so this runs before the session's shared one (own_cluster)."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from tiny_pipeline import TINY_STAGES

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.own_cluster, pytest.mark.timeout(1800)]

SETS = [
    "name=quiet",
    *TINY_STAGES,  # the packaged margin model: one Ray Train run (train) is enough here
    "ray.num_workers=1",  # Ray Train workers: their forwarded output is what is filtered
    "ray.num_cpus=4",  # as the tests' shared Ray: overcommit the 2 cores, no stalls
    "ray.object_store_memory=536870912",
    "tracking.experiment=test-quiet",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's and MLflow's own lines: what the issue counted in the demo's output, and their loggers'
# formats (independent of the patterns puma_ray.logs uses to route them)
INTERNAL = re.compile(
    "|".join(
        [
            r"site-packages/(ray|mlflow|alembic|sqlalchemy)/\S+\.py:\d+: \w*Warning",
            r"RayDeprecationWarning",
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO|WARNING)\s",
            r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ",
            r"\w+\.cc:\d+:",
            r"execution finished|encoding ratio|reader batch size|Progress bars",
            r"PreemptionWatcher|exclude_resources|[Tt]oken auth|Started a local Ray instance",
            r"Ray deduplicates logs",
        ]
    )
)


def _internal(lines):
    return [line for line in lines if INTERNAL.search(line)]


def _run(tmp_path, name: str, *flags: str, env_extra=None, command=("run",)):
    """(run dir, output lines) of `puma-ray FLAGS COMMAND --run-dir <tmp>/<name> --set ...`."""
    run_dir = str(tmp_path / name)
    argv = [sys.executable, "-m", "puma_ray", *flags, *command, "--run-dir", run_dir]
    argv += [a for s in SETS for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", **(env_extra or {}))
    # as a user's run: Ray Train's PreemptionWatcher on (conftest turns it off for speed), so
    # its lines are among those the quiet output must hide
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # its own process group: whatever Ray leaves goes with it
    )
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, out[-6000:]
    return run_dir, [ANSI.sub("", line) for line in out.splitlines()]


def test_quiet_by_default_and_everything_with_verbose(tmp_path):
    # a progress line after every training step (the interval is 30 s otherwise)
    run_dir, lines = _run(tmp_path, "quiet", env_extra={"PUMA_RAY_PROGRESS_EVERY_S": "0"})
    leaked = _internal(lines)
    assert leaked == [], "\n".join(leaked)

    # ours: the log file named once, epoch and progress lines from the Ray Train worker
    said = [line for line in lines if line.startswith("logs: Ray and MLflow messages go to ")]
    assert len(said) == 1, said
    path = said[0].split(" go to ", 1)[1].split(" (-v shows")[0]
    assert path.startswith(os.path.join(run_dir, "logs", "run-")), path
    worker = [line for line in lines if line.startswith("(RayTrainWorker pid=")]
    assert any(re.search(r"\[train\] epoch 1/1: loss \d", line) for line in worker), worker
    progress = r"\[(margin_model|train)\] epoch 1/1: \d+/\d+ steps \(\d+%\), [\d.]+ steps/s, ETA"
    assert any(re.search(progress, line) for line in worker), worker
    assert any(line.startswith("run: finished in") for line in lines)

    # the internals went to the file instead
    with open(path) as f:
        in_file = f.read().splitlines()
    assert len(_internal(in_file)) >= 3, in_file[:50]

    # -v: as Ray and MLflow print them, and no log file (scoring the same run dir again: a
    # Ray Data pipeline of actors, the chattiest stage, and half a minute cheaper than a run)
    shutil.copytree(run_dir, tmp_path / "verbose", ignore=shutil.ignore_patterns("logs"))
    verbose_dir, verbose_lines = _run(tmp_path, "verbose", "-v", command=("score", "--force"))
    assert len(_internal(verbose_lines)) >= 3, "\n".join(verbose_lines[-100:])
    assert not any(line.startswith("logs: ") for line in verbose_lines)
    assert not os.path.exists(os.path.join(verbose_dir, "logs"))
