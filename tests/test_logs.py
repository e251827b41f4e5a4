"""What a command prints (puma_ray.logs), without Ray: `Progress` lines on an injected clock; which
forwarded worker lines are Ray's or MLflow's internals (samples copied from real Ray 2.60 worker
output); and a quiet session routing library loggers and warnings to the run's log file and
restoring everything afterwards. The end-to-end check on real Ray output is
tests/test_quiet_output.py."""

import io
import logging
import os
import warnings

import pytest

from puma_ray import logs
from puma_ray.cli import build_parser
from puma_ray.logs import Progress, duration, split_worker_lines


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_says_nothing_before_the_interval_then_at_most_once_per_interval():
    clock, lines = Clock(), []
    p = Progress(400, "[train] epoch 3/8", lines.append, every_s=30, unit="steps", clock=clock)
    for step in range(10):
        clock.t += 3.0 if step < 9 else 2.5  # 29.5 s in
        p.update()
    assert lines == []
    clock.t += 0.5  # 30 s: the first line
    p.update()
    assert lines == ["[train] epoch 3/8: 11/400 steps (3%), 0.37 steps/s, ETA 17m41s"]
    for _ in range(5):  # 5 more steps within the next 30 s: no line
        clock.t += 5
        p.update()
    assert len(lines) == 1
    clock.t += 5  # 60 s since the start, 30 since the last line
    p.update(4)
    assert len(lines) == 2
    # 20 steps in 60 s: 1/3 step per second, 380 left
    assert lines[1] == "[train] epoch 3/8: 20/400 steps (5%), 0.33 steps/s, ETA 19m00s"


def test_progress_rate_and_eta_against_a_hand_computation():
    clock, lines = Clock(), []
    p = Progress(10_000, "evaluate PGD-20", lines.append, every_s=0, clock=clock)
    clock.t += 8.0
    p.update(2_000)  # 250 rows/s, 8,000 left -> 32 s
    assert lines == ["evaluate PGD-20: 2,000/10,000 rows (20%), 250 rows/s, ETA 32s"]
    clock.t += 0.0
    p.update(0)  # every_s=0: a line on every update, even with no time passed
    assert len(lines) == 2


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(logs.PROGRESS_ENV, "0")
    assert Progress(3, "x", print).every_s == 0
    monkeypatch.setenv(logs.PROGRESS_ENV, "not a number")
    assert Progress(3, "x", print).every_s == 30
    monkeypatch.delenv(logs.PROGRESS_ENV)
    assert Progress(3, "x", print).every_s == 30


def test_duration():
    assert [duration(s) for s in (0, 44.6, 60, 725, 3600, 10_950)] == [
        "0s",
        "45s",
        "1m00s",
        "12m05s",
        "1h00m",
        "3h02m",
    ]


# Lines as Ray 2.60 forwards them from workers in this project's runs (pids and times varied).
RAY_LINES = [
    "Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Estimated parquet encoding ratio is 0.873.",
    "Estimated parquet reader batch size at 4096 rows",
    "✔️  Dataset train_12_0 execution finished in 0.53 seconds",
    "/home/user/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/"
    "execution_options.py:81: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is "
    "deprecated and will be removed after January 2027.",
    "  self.exclude_resources = exclude_resources",
    "[2026-12-02 06:05:15,752 E 27615 27650] core_worker.cc:2741: Actor with class name: "
    "'PreemptionWatcher' and ID: '5d3b' has constructor arguments in the object store and "
    "max_restarts > 0.",
    "2026-12-02 06:05:15,752\tINFO worker.py:2012 -- Started a local Ray instance.",
    "2026/12/02 06:05:15 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
]
OUR_LINES = [
    "[train] epoch 1/8: loss 2.3021, train clean 0.102 adv 0.098, 412 samples/s, 12 s",
    "[train] epoch 1/8: 30/94 steps (32%), 1.2 steps/s, ETA 53s",
    "prune: selection pass 1: 3 requests over 2 shards",
    "sweep trial_0: ratio=0.3 eps_scale=0.5",
    "  clean                       0.500  [0.41, 0.59]",
    "  model: /tmp/run/train/model.pt",
]


def test_ray_and_mlflow_lines_are_hidden_ours_are_not():
    shown, hidden = split_worker_lines(RAY_LINES + OUR_LINES)
    assert hidden == RAY_LINES
    assert shown == OUR_LINES


def test_our_table_after_a_ray_message_stays_and_a_warning_hides_only_its_source_line():
    lines = [RAY_LINES[3], "  clean   0.500", RAY_LINES[4], RAY_LINES[5], "  robust  0.250"]
    shown, hidden = split_worker_lines(lines)
    assert shown == ["  clean   0.500", "  robust  0.250"]
    assert hidden == [RAY_LINES[3], RAY_LINES[4], RAY_LINES[5]]


def test_errors_stay_visible_and_a_hidden_records_traceback_goes_with_it():
    error = [
        "2026-12-02 06:05:16,001\tERROR worker.py:3 -- the actor died",
        "Traceback (most recent call last):",
        '  File "/home/user/puma_ray/score.py", line 10, in __call__',
        "    raise ValueError('boom')",
        "ValueError: boom",
    ]
    shown, hidden = split_worker_lines(error)
    assert shown == error and hidden == []
    warning_with_trace = [
        "2026-12-02 06:05:16,001\tWARNING preemption.py:190 -- PreemptionWatcher poll failed",
        "Traceback (most recent call last):",
        '  File "/x/site-packages/ray/train/v2/_internal/execution/preemption.py", line 1',
        "    poll()",
        "RuntimeError: gone",
        "[train] epoch 2/8: loss 2.1",
    ]
    shown, hidden = split_worker_lines(warning_with_trace)
    assert shown == ["[train] epoch 2/8: loss 2.1"] and hidden == warning_with_trace[:-1]


def test_ray_actors_output_is_hidden_unless_it_shows_an_error():
    assert split_worker_lines(["anything at all"], "SplitCoordinator") == ([], ["anything at all"])
    assert split_worker_lines(["x"], "ReadParquet->SplitBlocks(4)") == ([], ["x"])
    boom = ["Traceback (most recent call last):", "ValueError: boom"]
    assert split_worker_lines(boom, "TrainController") == (boom, [])
    # our own actors and tasks: by line
    assert split_worker_lines(OUR_LINES[:1], "RayTrainWorker") == (OUR_LINES[:1], [])
    assert split_worker_lines(OUR_LINES[2:3], "_prune_task") == (OUR_LINES[2:3], [])


# ----------------------------------------------------------------------------------------------
# A quiet session in this process.


@pytest.fixture
def library_logger():
    """The `alembic` logger (one of logs.LIBRARY_LOGGERS) with a console handler of its own, as
    MLflow sets it up, restored afterwards."""
    logger = logging.getLogger("alembic")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    console = io.StringIO()
    logger.handlers = [logging.StreamHandler(console)]
    logger.propagate, logger.level = False, logging.INFO
    yield logger, console
    logger.handlers, logger.propagate, logger.level = saved[0], saved[1], saved[2]


def _log_files(run_dir):
    d = os.path.join(run_dir, "logs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_quiet_session_routes_library_records_and_restores_them(library_logger, tmp_path):
    logger, console = library_logger
    said = []
    run_dir = str(tmp_path / "run")
    with logs.session("run", run_dir=run_dir, say=said.append) as s:
        assert _log_files(run_dir) == []  # created on its first line, not before
        logger.info("Context impl SQLiteImpl.")
        logger.error("the store is locked")
        with logs.session("train", run_dir=run_dir, say=said.append) as inner:
            assert inner is s  # joins the outer session: one file, said once
    assert said == [f"logs: Ray and MLflow messages go to {s.path} (-v shows them here)"]
    assert s.path.startswith(os.path.join(run_dir, "logs", "run-")) and s.path.endswith(".log")
    assert console.getvalue() == "the store is locked\n"  # errors stay on the console
    text = open(s.path).read()
    assert "INFO alembic: Context impl SQLiteImpl." in text and "the store is locked" in text
    logger.info("after the session")  # restored: on the console again, not in the file
    assert console.getvalue().endswith("after the session\n")
    assert "after the session" not in open(s.path).read()
    assert all(not isinstance(h, logs._Sink) for h in logger.handlers)


def test_verbose_session_changes_nothing(library_logger, tmp_path):
    logger, console = library_logger
    said = []
    with logs.session("run", verbose=True, run_dir=str(tmp_path), say=said.append):
        logger.info("shown")
        assert logs.is_verbose()
    assert console.getvalue() == "shown\n" and said == [] and _log_files(str(tmp_path)) == []


def test_quiet_session_sends_library_warnings_to_the_file(tmp_path, monkeypatch):
    shown = []  # what reaches the warnings display the session found (pytest's, else stderr)
    monkeypatch.setattr(warnings, "showwarning", lambda msg, *a, **k: shown.append(str(msg)))
    run_dir = str(tmp_path)
    with logs.session("run", run_dir=run_dir, say=lambda m: None) as s:
        assert not logs.is_verbose()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            ray_file = "/x/site-packages/ray/data/context.py"
            warnings.warn_explicit("`use_polars` is deprecated", DeprecationWarning, ray_file, 9)
            warnings.warn_explicit("ours", UserWarning, "/home/user/puma_ray/score.py", 3)
    assert shown == ["ours"]
    assert "context.py:9: DeprecationWarning: `use_polars` is deprecated" in open(s.path).read()
    assert logs.is_verbose()  # no session any more


def test_a_remote_run_dir_logs_to_the_temporary_folder():
    import tempfile

    path = logs.log_path("s3://bucket/runs/x", "sweep", now=0)
    assert path.startswith(os.path.join(tempfile.gettempdir(), "puma-ray", "logs", "sweep-"))


def test_verbose_flag_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["run"]).verbose is False
    assert parser.parse_args(["-v", "run"]).verbose is True
    assert parser.parse_args(["run", "-v"]).verbose is True
    assert parser.parse_args(["report", "--verbose"]).verbose is True


def test_worker_output_filter_wraps_rays_printer_and_gives_it_back(tmp_path, monkeypatch):
    """The printer Ray registers for forwarded worker output (its dispatcher's
    "ray_print_logs" handler; a stand-in here, on a dispatcher of its own, since no Ray runs)
    is wrapped for the session: internals to the file, the rest to Ray's printer unchanged;
    restored at the end."""
    import ray._private.ray_logging as ray_logging

    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    printed = []

    def ray_printer(data):
        printed.append(data)

    dispatcher.add_handler("ray_print_logs", ray_printer)
    with logs.session("run", run_dir=str(tmp_path), say=lambda m: None) as s:
        logs._filter_worker_output(s)
        logs._filter_worker_output(s)  # idempotent: wrapped once
        batch = {"pid": 7, "actor_name": "RayTrainWorker", "is_err": False, "ip": "x"}
        dispatcher.emit({**batch, "lines": RAY_LINES[:2] + OUR_LINES[:2]})
        dispatcher.emit({**batch, "actor_name": "SplitCoordinator", "lines": ["y"]})
        dispatcher.emit({"pid": "raylet", "lines": ["A worker died"], "is_err": True})
    assert [d["lines"] for d in printed] == [OUR_LINES[:2], ["A worker died"]]
    assert printed[0]["actor_name"] == "RayTrainWorker" and printed[0]["pid"] == 7
    text = open(s.path).read()
    assert f"(RayTrainWorker pid=7) {RAY_LINES[1]}" in text
    assert "(SplitCoordinator pid=7) y" in text
    assert dispatcher.handlers == [("ray_print_logs", ray_printer)]  # given back


def test_ray_core_records_on_fd2_go_to_the_log_file_everything_else_stays(tmp_path, capfd):
    """Ray's C++ core writes to file descriptor 2 past Python; a quiet session filters exactly
    its non-fatal records into the log file and passes every other byte through."""
    from puma_ray import logs

    core = b"[2026-12-02 07:03:26,453 E 24786 24786] core_worker.cc:2465: Actor ... noise\n"
    fatal = b"[2026-12-02 07:03:26,453 F 24786 24786] core_worker.cc:9: fatal stays\n"
    with logs.session("t", run_dir=str(tmp_path), say=lambda _m: None):
        os.write(2, core)
        os.write(2, b"an error of ours\n")
        os.write(2, fatal)
    err = capfd.readouterr().err
    assert "an error of ours" in err and "fatal stays" in err and "noise" not in err
    (log,) = (tmp_path / "logs").iterdir()
    assert "core_worker.cc:2465: Actor ... noise" in log.read_text()
    os.write(2, core)  # restored: after the session, fd 2 is the real stderr again
    assert "noise" in capfd.readouterr().err
