"""Peak RSS of a benchmark's own process tree, sampled by a thread (shared by the benchmarks).

Only this process and its descendants are counted: a local Ray started by `ray.init` runs its
daemons and workers as children of the driver, so other Ray instances on the same machine
(CI, tests) never leak into the numbers.

RSS also counts the pages of Ray's shared-memory object store that a process has touched; as
blocks stream through, a worker touches more of the store until it has cycled through all of
it, so RSS grows with the rows processed up to the store's size even when nothing leaks. The
*private* figures (Linux `RssAnon`: heap, stacks, torch buffers) exclude those pages: they are
the ones that must stay flat as the row count grows.
"""

from __future__ import annotations

import threading

import psutil


def _is_worker(p: psutil.Process) -> bool:
    """Ray worker processes retitle themselves `ray::<task>` (or `ray::IDLE`)."""
    cmd = p.cmdline()
    return bool(cmd) and (cmd[0].startswith("ray::") or "default_worker.py" in " ".join(cmd))


def _private(p: psutil.Process) -> int:
    """Anonymous resident memory (bytes) from /proc/<pid>/status; RSS where that is missing."""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return p.memory_info().rss


class RssSampler:
    """Peak RSS of this process (the driver), of the largest Ray worker, and of the whole
    process tree (driver + workers + Ray's own daemons: GCS, raylet, ...); the same three for
    private memory (`driver_private`, `worker_private`, `tree_private`)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.driver = self.worker = self.tree = 0
        self.driver_private = self.worker_private = self.tree_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        driver, driver_private = me.memory_info().rss, _private(me)
        tree, tree_private = driver, driver_private
        for p in me.children(recursive=True):
            try:
                rss, private = p.memory_info().rss, _private(p)
                if _is_worker(p):
                    self.worker = max(self.worker, rss)
                    self.worker_private = max(self.worker_private, private)
            except psutil.Error:  # exited between listing and reading
                continue
            tree += rss
            tree_private += private
        self.driver = max(self.driver, driver)
        self.tree = max(self.tree, tree)
        self.driver_private = max(self.driver_private, driver_private)
        self.tree_private = max(self.tree_private, tree_private)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
