"""One writer per run directory: the run-dir lock every writing command takes.

Local run directories (and `file://`): `<run_dir>/.puma-ray.lock`, created with
O_CREAT|O_EXCL and holding JSON {pid, host, command, started}. A second writer is refused with
one line naming the holder. A lock whose holder is gone (same host, its pid no longer alive, or
alive but started after the lock was taken: a reused pid) is stale and taken over, with a log
line saying so; a holder on another host cannot be checked, so its lock stays until it exits
(or someone deletes the file).

Object stores (s3://, gs://): no exclusive create, so the lock is a lease object with an expiry
that the holder renews from a background thread. A newcomer may take over a lease only after it
expired; it writes its own lease, waits a moment and reads it back, so of two newcomers racing
for the same expired lease only the last writer proceeds. Host clocks must agree to well within
LEASE_S.

The lock is reentrant within a process (`run` takes it, then calls stages that take it again),
and `covers(uri)` tells a stage whether this process holds the lock of a directory above `uri`,
which is what allows it to remove stale temp files there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from puma_ray import storage
from puma_ray.errors import RunDirLocked

LOCK_NAME = ".puma-ray.lock"
LEASE_S = 120.0  # object-store lease length; renewed every LEASE_S / 4
SETTLE_S = 2.0  # wait before reading a new lease back (a racing newcomer's write lands first)
UNREADABLE_GRACE_S = 10.0  # a lock file still empty after this is a crash between create/write


@dataclass
class _Held:
    path: str  # the lock file / lease object
    key: str  # normalised run dir
    token: str
    count: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_held: dict[str, _Held] = {}
_mutex = threading.Lock()


def _key(run_dir: str) -> str:
    local = storage.local_path(run_dir)
    return os.path.realpath(local) if local is not None else run_dir.rstrip("/")


def covers(uri: str) -> bool:
    """Whether this process holds the lock of `uri` or of a directory above it."""
    key = _key(uri)
    with _mutex:
        return any(key == k or key.startswith(k.rstrip("/") + "/") for k in _held)


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me(command: str, token: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": " ".join(sys.argv[:8])[:300],
        "pid_start": _proc_start(os.getpid()),
        "token": token,
    }


def _describe(holder: dict) -> str:
    return (
        f"`puma-ray {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('started', '?')})"
    )


def _stale_reason(holder: dict) -> str | None:
    """Why a local lock's holder is gone, or None while it may be alive."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "it names no valid pid"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is no longer running"
    except PermissionError:  # alive, another user's
        return None
    recorded, current = holder.get("pid_start"), _proc_start(pid)
    if recorded and current and recorded != current:
        return f"pid {pid} is now a different process"
    return None


def _read_lock(path: str) -> dict | None:
    """The holder recorded in a local lock file; {} if unreadable; None if it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_over(path: str, holder: dict) -> bool:
    """Remove the stale lock `holder`, unless it changed hands meanwhile: a guard file keeps two
    newcomers from both removing it (the second would remove the first's fresh lock)."""
    guard = path + ".takeover"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(guard) > UNREADABLE_GRACE_S:
                os.unlink(guard)  # left by a newcomer that died while taking over
        return False
    os.close(fd)
    try:
        if _read_lock(path) == holder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        return False
    finally:
        os.unlink(guard)


def _refuse(run_dir: str, path: str, holder: dict) -> RunDirLocked:
    if "expires" in holder:  # an object-store lease
        until = time.strftime("%H:%M:%S", time.localtime(float(holder["expires"])))
        gone = f"its lease runs until {until} unless renewed"
    else:
        gone = f"if that process is gone, delete {path}"
    return RunDirLocked(f"{run_dir}: locked by {_describe(holder)}; wait for it to finish ({gone})")


def _acquire_local(run_dir: str, command: str, log: Callable[[str], None]) -> _Held:
    local = storage.local_path(run_dir)
    os.makedirs(local, exist_ok=True)
    path = os.path.join(local, LOCK_NAME)
    token = uuid.uuid4().hex
    me = _me(command, token)
    deadline = time.monotonic() + UNREADABLE_GRACE_S + 5
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if not holder:  # created, not yet written (or its writer died in between)
                try:
                    age = time.time() - os.path.getmtime(path)
                except FileNotFoundError:
                    continue  # released meanwhile
                old = age > UNREADABLE_GRACE_S
                reason = f"an unreadable lock file, {age:.0f}s old" if old else None
            else:
                reason = _stale_reason(holder)
                if reason is None:
                    raise _refuse(run_dir, path, holder) from None
            if reason is not None and _take_over(path, holder):
                who = _describe(holder) if holder else "an unknown process"
                log(f"lock: taking over the stale lock of {who} on {run_dir}: {reason}")
            if time.monotonic() > deadline:
                raise RunDirLocked(
                    f"{run_dir}: could not take the lock {path} (it keeps changing hands); retry"
                ) from None
            time.sleep(0.1)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return _Held(path=path, key=_key(run_dir), token=token)


def _release_local(held: _Held) -> None:
    holder = _read_lock(held.path)
    if holder and holder.get("token") == held.token:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(held.path)


def _read_lease(uri: str) -> dict | None:
    try:
        lease = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return lease if isinstance(lease, dict) else {}


def _write_lease(uri: str, me: dict, ttl: float) -> None:
    body = {**me, "expires": time.time() + ttl}
    storage.atomic_write_bytes(uri, json.dumps(body).encode())


def _acquire_lease(
    run_dir: str,
    command: str,
    log: Callable[[str], None],
    *,
    ttl: float = LEASE_S,
    settle: float = SETTLE_S,
) -> _Held:
    uri = storage.join(run_dir, LOCK_NAME)
    token = uuid.uuid4().hex
    me = _me(command, token)
    current = _read_lease(uri)
    if current and current.get("expires", 0) > time.time():
        raise _refuse(run_dir, uri, current)
    if current:
        log(f"lock: taking over the expired lease of {_describe(current)} on {run_dir}")
    _write_lease(uri, me, ttl)
    time.sleep(settle)
    won = _read_lease(uri) or {}
    if won.get("token") != token:
        raise _refuse(run_dir, uri, won)
    held = _Held(path=uri, key=_key(run_dir), token=token)

    def renew() -> None:
        while not held.stop.wait(ttl / 4):
            try:
                lease = _read_lease(uri) or {}
                if lease.get("token") != token:
                    log(
                        f"lock: warning: the lease on {run_dir} was taken by {_describe(lease)} "
                        "(this process could not renew it in time); results may mix"
                    )
                    return
                _write_lease(uri, me, ttl)
            except Exception as e:  # a network hiccup: try again at the next tick
                log(f"lock: warning: renewing the lease on {run_dir} failed ({e})")

    held.thread = threading.Thread(target=renew, name="puma-ray-lease", daemon=True)
    held.thread.start()
    return held


def _release_lease(held: _Held) -> None:
    held.stop.set()
    if held.thread is not None:
        held.thread.join(timeout=10)
    with contextlib.suppress(Exception):
        if (_read_lease(held.path) or {}).get("token") == held.token:
            storage.delete(held.path)


@contextlib.contextmanager
def run_dir_lock(
    run_dir: str, command: str, *, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the lock of `run_dir` for `command` (refusing with RunDirLocked while another
    process holds it). Reentrant within a process."""
    key = _key(run_dir)
    with _mutex:
        held = _held.get(key)
        if held is not None:
            held.count += 1
    if held is None:
        acquire = _acquire_local if storage.is_local(run_dir) else _acquire_lease
        held = acquire(run_dir, command, log)
        with _mutex:
            _held[key] = held
    try:
        yield
    finally:
        with _mutex:
            held.count -= 1
            last = held.count == 0
            if last:
                _held.pop(key, None)
        if last:
            if storage.is_local(run_dir):
                _release_local(held)
            else:
                _release_lease(held)
