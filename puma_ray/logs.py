"""What a command prints: our own lines, as they are; the internals of Ray (Core, Data, Train,
Tune) and MLflow in a log file of the run instead (`-v` shows them as well); and `Progress`
lines inside long loops.

A quiet session (`session(command)`, what the CLI and `puma_ray.api` open unless `verbose`)
routes four sources to `<run_dir>/logs/<command>-<time>.log`, a file created on its first line:
- the Python loggers of Ray, Ray Data and MLflow (`LIBRARY_LOGGERS`): their console handlers
  keep only ERROR and above, every record at INFO and above goes to the file;
- warnings raised inside those packages (or of Ray's deprecation categories);
- the stdout/stderr of Ray's worker processes, which Ray forwards to the driver as
  "(RayTrainWorker pid=...) line": a line is sent to the file when it is a log record below
  ERROR in Ray's or MLflow's format, a Ray Core (C++) log line, a Python warning from those
  packages with its source line, one of Ray Data's plain progress messages, or any line of a
  batch from one of Ray's own actors and tasks that shows no error. Everything else (our epoch,
  progress and summary lines from Train workers and Tune trials, tracebacks, raylet and
  autoscaler events) is printed as Ray prints it.
What is not reached: a Ray Tune status table (printed with `print`; the sweep passes Tune
`verbose=0` unless verbose, see `is_verbose`), and the C++ core of the driver itself, which
writes to file descriptor 2 directly.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# Progress.

# Seconds between progress lines of a long loop (training steps, evaluation batches). An
# environment variable rather than a config field: the training fingerprints hash the whole
# training section, and how often a run reports must not make it retrain.
PROGRESS_ENV = "PUMA_RAY_PROGRESS_EVERY_S"
PROGRESS_EVERY_S = 30.0


def progress_every_s() -> float:
    """`PUMA_RAY_PROGRESS_EVERY_S` if set (0: a line after every update), else 30 s."""
    value = os.environ.get(PROGRESS_ENV)
    try:
        return max(0.0, float(value)) if value else PROGRESS_EVERY_S
    except ValueError:
        return PROGRESS_EVERY_S


def duration(seconds: float) -> str:
    """`45s`, `12m05s`, `3h02m`: an ETA or an elapsed time, short."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 100 else f"{r:.1f}" if r >= 1 else f"{r:.2f}"


class Progress:
    """A line `what: done/total unit (p%), rate unit/s, ETA t` at most every `every_s` seconds
    while a loop of known length runs, so a long epoch or evaluation is never silent for longer
    (job logs are no TTY, so no bar).

        progress = Progress(len(batches), "[train] epoch 3/8", log, unit="steps")
        for batch in batches:
            ...
            progress.update()          # or update(n) for n units at once

    `clock` (seconds, monotonic) is injectable for tests; `every_s=None` reads
    `progress_every_s()`. Nothing is printed before the first interval has passed."""

    def __init__(
        self,
        total: int,
        what: str,
        log: Callable[[str], None],
        *,
        every_s: float | None = None,
        unit: str = "rows",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.what, self.log, self.unit, self.clock = total, what, log, unit, clock
        self.every_s = progress_every_s() if every_s is None else every_s
        self.done = 0
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.done)
        eta = duration(left / rate) if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
            f"{_rate(rate)} {self.unit}/s, ETA {eta}"
        )


# ----------------------------------------------------------------------------------------------
# Which lines are Ray's and MLflow's own.

LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "huey")
LIBRARY_LOGGERS += ("sqlalchemy.engine",)
# packages whose warnings are internals (matched as a path component of the warning's file)
_INTERNAL_PATH = re.compile(r"[/\\](ray|mlflow|alembic|sqlalchemy|huey)[/\\]")
_LEVELS_BELOW_ERROR = r"(?:TRACE|DEBUG|INFO|WARNING|WARN)"
# log records below ERROR, in the formats of Ray's Python loggers ("2026-12-02 06:05:15,752<TAB>
# INFO worker.py:1 -- ..."), MLflow's ("2026/12/02 06:05:15 INFO mlflow.store.db.utils: ...")
# and Ray Core's C++ logs ("[2026-12-02 06:05:15,752 E 123 456] core_worker.cc:1: ...", all but
# F: fatal); a traceback may follow them
_QUIET_RECORDS = [
    re.compile(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}\s+{_LEVELS_BELOW_ERROR} \S+:\d+ -- "),
    re.compile(
        rf"^\d{{4}}/\d\d/\d\d \d\d:\d\d:\d\d {_LEVELS_BELOW_ERROR} (mlflow|alembic|sqlalchemy)"
    ),
    re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] "),
]
# Ray Data's console messages, which a worker prints without the record format
_QUIET_MESSAGES = [
    re.compile(r"^\S+\s+Dataset \S+ execution (finished|failed)"),
    re.compile(r"^Progress bars (for operators )?disabled"),
    re.compile(r"^Progress will be logged because"),
    re.compile(r"^Estimated parquet (encoding ratio|reader batch size)"),
    re.compile(r"^(Starting execution of|Execution plan of) Dataset "),
    re.compile(r"^\[dataset\]"),
    re.compile(r"^Tip: use `ray status`"),
]
_WARNING_LINE = re.compile(r"^(?P<path>\S+\.py):\d+: (?P<category>\w*Warning): ")
# a traceback after a record (our own tables are indented by two spaces, never four)
_TRACEBACK = re.compile(
    r'^(Traceback \(most recent call last\):|  File "|    |\S*(Error|Exception)(: |$))'
)
_ERRORISH = re.compile(r"Traceback \(most recent call last\)|\b(ERROR|CRITICAL|FATAL)\b|\w+Error\b")
# Ray's own actors and tasks (Ray Data operators, Train and Tune machinery): what they print is
# theirs, unless it shows an error
_RAY_SOURCES = re.compile(
    r"^(SplitCoordinator|TrainController|PreemptionWatcher|SynchronizationActor|DatasetManager|"
    r"PlacementGroupCleaner|ActorLocationTracker|FooterReader|AutoscalingRequester|_\w+Actor|"
    r"_StatsManager\w*|MapWorker\(.*|Map\(.*|MapBatches\(.*|Read\w*|Write\w*|ListFiles|"
    r"_fetch_parquet_file_info|_split_single_block|.*->.*)$"
)


def is_internal_warning(category: type, filename: str) -> bool:
    """A warning raised in Ray's or MLflow's code, or one of Ray's deprecation warnings (whose
    stacklevel can point at the caller's file)."""
    ray_category = category.__module__.startswith("ray") or category.__name__.startswith("Ray")
    return ray_category or bool(_INTERNAL_PATH.search(filename or ""))


def split_worker_lines(lines: list[str], source: str = "") -> tuple[list[str], list[str]]:
    """(shown, hidden): one batch of a Ray worker's output lines, as Ray forwards it to the
    driver, split into ours (and errors) and Ray's or MLflow's internals (see the module doc).
    `source` is the batch's actor or task name ("" when Ray gives none)."""
    if source and _RAY_SOURCES.match(source) and not any(_ERRORISH.search(x) for x in lines):
        return [], list(lines)
    shown, hidden = [], []
    after = None  # "record": a traceback may follow; "warning": its source line follows
    for line in lines:
        warning = _WARNING_LINE.match(line)
        if any(p.match(line) for p in _QUIET_RECORDS):
            quiet, after = True, "record"
        elif warning is not None and (
            _INTERNAL_PATH.search(warning["path"]) or warning["category"].startswith("Ray")
        ):
            quiet, after = True, "warning"
        elif after == "record" and _TRACEBACK.match(line):
            quiet = True
        elif after == "warning" and line[:1].isspace():
            quiet, after = True, None
        else:
            quiet, after = any(p.match(line) for p in _QUIET_MESSAGES), None
        (hidden if quiet else shown).append(line)
    return shown, hidden


# ----------------------------------------------------------------------------------------------
# The log file.


class _Sink(logging.Handler):
    """The log file of a quiet session: created on the first line; lines that come before its
    path is known are kept and written then."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(self.FORMAT))
        self.path: str | None = None
        self.lines = 0
        self._file = None
        self._pending: list[str] = []

    def set_path(self, path: str) -> None:
        with self._guard():
            self.path = path

    def write_line(self, text: str) -> None:
        with self._guard():
            if self.path is None:
                self._pending.append(text)
                return
            if self._file is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
            for line in [*self._pending, text]:
                self._file.write(line.rstrip("\n") + "\n")
                self.lines += 1
            self._pending.clear()
            self._file.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:  # a log line must never break the work
            self.handleError(record)

    def close(self) -> None:
        with self._guard():
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()

    @contextlib.contextmanager
    def _guard(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


def log_path(run_dir: str, command: str, now: float | None = None) -> str:
    """`<run_dir>/logs/<command>-<YYYYmmdd-HHMMSS>.log`; for a remote run dir (s3://, gs://)
    the same name under the system's temporary folder (a log file is appended line by line)."""
    from puma_ray.storage import local_path

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = local_path(run_dir)
    if base is None:
        import tempfile

        base = os.path.join(tempfile.gettempdir(), "puma-ray")
    return os.path.join(base, "logs", f"{command}-{stamp}.log")


# ----------------------------------------------------------------------------------------------
# Sessions.


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()


@dataclass
class LogSession:
    command: str
    verbose: bool
    say: Callable[[str], None]
    sink: _Sink = field(default_factory=_Sink)
    path: str | None = None
    _handlers: list = field(default_factory=list)  # console handlers given _ERRORS_ONLY
    _loggers: list = field(default_factory=list)  # loggers given the sink
    _showwarning: Callable | None = None
    _hook: _AfterImport | None = None
    _ray_printer: Callable | None = None  # Ray's printer of worker output, while replaced
    _ray_filter: Callable | None = None  # ours, once installed
    _core_filter: _CoreLogFilter | None = None  # fd 2 through a pipe, while installed

    def set_run_dir(self, run_dir: str) -> None:
        """Name the log file after the run dir, and say where it is (once)."""
        if self.verbose or self.path is not None:
            return
        self.path = log_path(run_dir, self.command)
        self.sink.set_path(self.path)
        self.say(f"logs: Ray and MLflow messages go to {self.path} (-v shows them here)")


_SESSION: LogSession | None = None
_LOCK = threading.RLock()


@contextlib.contextmanager
def session(
    command: str,
    *,
    verbose: bool = False,
    run_dir: str | None = None,
    say: Callable[[str], None] = print,
) -> Iterator[LogSession]:
    """Route Ray's and MLflow's internals to the run's log file while the block runs (not with
    `verbose`); reentrant: an inner session joins the outer one. Everything is restored at the
    end, so a notebook's later cells print as before."""
    global _SESSION
    with _LOCK:
        outer = _SESSION
        if outer is None:
            _SESSION = LogSession(command, verbose, say)
            if not verbose:
                _install(_SESSION)
    s = _SESSION
    try:
        if run_dir is not None:
            s.set_run_dir(run_dir)
        yield s
    finally:
        if outer is None:
            with _LOCK:
                if not s.verbose:
                    _uninstall(s)
                s.sink.close()
                _SESSION = None


def set_run_dir(run_dir: str) -> None:
    """Tell the active session (if any) where the run dir is: its log file goes there."""
    if _SESSION is not None:
        _SESSION.set_run_dir(run_dir)


def is_verbose() -> bool:
    """Whether library output is shown as is: no quiet session is active (e.g. a stage function
    called directly), or it was opened with `verbose`. For Ray Tune's `verbose` setting."""
    return _SESSION is None or _SESSION.verbose


def attach_ray() -> None:
    """Called by `runtime.ensure_ray` once Ray is up: route Ray's loggers (now imported) and the
    worker output Ray forwards to this driver through the active quiet session."""
    with _LOCK:
        s = _SESSION
        if s is None or s.verbose:
            return
        _route_loggers(s)
        _filter_worker_output(s)


# Ray's C++ core writes its log records to this process's stderr (file descriptor 2) directly,
# past Python: e.g. Ray Data's actor pools make the driver print "Actor ... has constructor
# arguments in the object store and max_restarts > 0" at level E on every scoring run. A quiet
# session passes fd 2 through a pipe and sends exactly such records (a C++ source location in
# Ray's record format, any level but fatal) to the log file; every other byte goes to the real
# stderr unchanged, and everything is drained and restored when the session ends.
_CORE_RECORD = re.compile(
    rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] \w+\.cc:\d+: "
)


class _CoreLogFilter:
    def __init__(self, sink: _Sink):
        self.sink = sink
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="puma-ray-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line + b"\n")
        if pending:
            self._emit(pending)
        os.close(self.read)

    def _emit(self, line: bytes) -> None:
        if _CORE_RECORD.match(line):
            self.sink.write_line(line.decode("utf-8", "replace"))
        else:
            os.write(self.saved, line)

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # the pipe's last write end closes: the pump reads to the end
        self.thread.join(timeout=5)
        os.close(self.saved)


def _install(s: LogSession) -> None:
    try:
        s._core_filter = _CoreLogFilter(s.sink)
    except OSError:  # no fd 2 to redirect (an embedded interpreter): records stay visible
        s._core_filter = None
    _route_loggers(s)
    s._hook = _AfterImport(("ray", "ray.data", "mlflow"), lambda: _route_loggers(s))
    sys.meta_path.insert(0, s._hook)
    s._showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_internal_warning(category, filename):
            text = warnings.formatwarning(message, category, filename, lineno, line)
            s.sink.write_line(text.rstrip("\n"))
        else:
            s._showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    # worker output is filtered from the command's `ensure_ray` on (`attach_ray`): a Ray this
    # process started before (a notebook, the tests) may be printing someone else's work


def _uninstall(s: LogSession) -> None:
    if s._core_filter is not None:
        s._core_filter.close()
        s._core_filter = None
    if s._hook in sys.meta_path:
        sys.meta_path.remove(s._hook)
    if s._showwarning is not None:
        warnings.showwarning = s._showwarning
    for handler in s._handlers:
        handler.removeFilter(_ERRORS_ONLY)
    for logger in s._loggers:
        logger.removeHandler(s.sink)
    s._handlers.clear()
    s._loggers.clear()
    if s._ray_printer is not None:
        _swap_ray_printer(lambda current: s._ray_printer if current is s._ray_filter else None)
        s._ray_printer = None


def _route_loggers(s: LogSession) -> None:
    """Console handlers of the library loggers keep ERROR and above; the sink gets the rest.
    Idempotent; run again after a library is imported (MLflow replaces its handlers then)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if console and handler is not s.sink and _ERRORS_ONLY not in handler.filters:
                handler.addFilter(_ERRORS_ONLY)
                s._handlers.append(handler)
        # a logger that propagates reaches the sink through its parent
        if logger.handlers and not logger.propagate and s.sink not in logger.handlers:
            logger.addHandler(s.sink)
            s._loggers.append(logger)


def _filter_worker_output(s: LogSession) -> None:
    """Replace Ray's printer of forwarded worker output with one that sends internals to the
    sink (`split_worker_lines`) and hands the rest to Ray's printer, which formats and
    de-duplicates as before. Ray 2.x internals (`ray._private`); without them, nothing changes."""
    if s._ray_printer is not None and _current_ray_printer() is s._ray_filter:
        return
    try:
        from ray.util.debug import log_once

        log_once("log_dedup_warning")  # Ray's one-time "Ray deduplicates logs..." hint
    except ImportError:
        pass

    def swap(current):
        if current is None or getattr(current, "_puma_ray", False):
            return None
        s._ray_printer = current
        return s._ray_filter

    def ray_filter(data: dict) -> None:
        printer = s._ray_printer
        if data.get("pid") in ("autoscaler", "raylet"):  # cluster events: shown as they are
            printer(data)
            return
        source = data.get("actor_name") or data.get("task_name") or ""
        shown, hidden = split_worker_lines(list(data.get("lines") or []), source)
        if hidden:
            where = f"({source + ' ' if source else ''}pid={data.get('pid')}) "
            try:
                for line in hidden:
                    s.sink.write_line(where + line)
            except OSError:  # this runs in Ray's log thread: a full disk must not end it
                pass
        if shown:
            printer({**data, "lines": shown})

    ray_filter._puma_ray = True
    s._ray_filter = ray_filter
    _swap_ray_printer(swap)


def _dispatcher():
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def _current_ray_printer():
    d = _dispatcher()
    return None if d is None else dict(d.handlers).get("ray_print_logs")


def _swap_ray_printer(new_for: Callable) -> None:
    """Replace Ray's "ray_print_logs" handler by `new_for(current)` (None: leave it), under the
    dispatcher's lock so that no batch is lost in between."""
    d = _dispatcher()
    if d is None:
        return
    with d._lock:
        handlers = []
        for name, handler in d.handlers:
            if name == "ray_print_logs":
                handler = new_for(handler) or handler
            handlers.append((name, handler))
        d.handlers = handlers


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `callback` right after one of `names` is first imported: MLflow sets its loggers'
    handlers in its `__init__`, replacing any routing made before."""

    def __init__(self, names, callback: Callable[[], None]):
        self.pending = {n for n in names if n not in sys.modules}
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, pending, callback = loader.exec_module, self.pending, self.callback

        def exec_then_route(module):
            exec_module(module)
            pending.discard(fullname)  # once imported (a find_spec alone imports nothing)
            callback()

        loader.exec_module = exec_then_route
        return spec
