"""Peak RSS of a benchmark's own process tree, sampled by a thread (shared by the benchmarks).

Only this process and its descendants are counted: a local Ray started by `ray.init` runs its
daemons and workers as children of the driver, so other Ray instances on the same machine
(CI, tests) never leak into the numbers.
"""

from __future__ import annotations

import threading

import psutil


def _is_worker(p: psutil.Process) -> bool:
    """Ray worker processes retitle themselves `ray::<task>` (or `ray::IDLE`)."""
    cmd = p.cmdline()
    return bool(cmd) and (cmd[0].startswith("ray::") or "default_worker.py" in " ".join(cmd))


class RssSampler:
    """Peak RSS of this process (the driver), of the largest Ray worker, and of the whole
    process tree (driver + workers + Ray's own daemons: GCS, raylet, ...)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.driver = self.worker = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        driver = me.memory_info().rss
        tree = driver
        for p in me.children(recursive=True):
            try:
                rss = p.memory_info().rss
                if _is_worker(p):
                    self.worker = max(self.worker, rss)
            except psutil.Error:  # exited between listing and reading
                continue
            tree += rss
        self.driver = max(self.driver, driver)
        self.tree = max(self.tree, tree)

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
