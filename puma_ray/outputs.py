"""Which directories a command may clear, and the temporary files a killed one leaves behind.

The rule: a command clears a directory only if it is absent, empty, or puma-ray's own output of
the same kind: it holds the marker `.puma-ray-output` (JSON `{kind, created}`, written when a
command creates the directory) naming that kind, or, for directories written before markers
existed, that stage's own manifest. Anything else is someone's data: the command refuses in one
line and touches nothing. Clearing keeps the marker, so a clear that is interrupted half-way
leaves a directory that is still recognisably ours.

Temporary files: every writer publishes `NAME` by writing `NAME.tmp-<8 hex>` (shards and kept
files: `.NAME.tmp-<8 hex>`) and renaming it; a killed process leaves that file behind. A command
that holds the run-dir lock (`puma_ray.locking`) removes them from the directories it owns; a
live writer's temp file looks the same, which is why only the lock holder may.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable

import pyarrow.fs as pafs

from puma_ray import storage
from puma_ray.errors import OutputDirError

MARKER = ".puma-ray-output"
TMP_PATTERN = re.compile(r"^.+\.tmp-[0-9a-f]{8}$")
# Files only puma-ray writes: a directory holding one of them (or the marker) is ours to sweep
# for stale temp files. Clearing asks more: the marker of the same kind or that kind's manifest.
OWN_FILES = ("manifest.json", "dataset.json", "state.json", "summary.json", "mlflow_run.json")

# Recognises a directory of one kind written before markers existed: (its uri, names in it).
Legacy = Callable[[str, set[str]], bool]


def manifest_with(**expected: str) -> Legacy:
    """A `Legacy` test: `manifest.json` exists and its fields start with the expected values."""

    def test(uri: str, names: set[str]) -> bool:
        if "manifest.json" not in names:
            return False
        m = _read_json(storage.join(uri, "manifest.json"))
        return all(str(m.get(k, "")).startswith(v) for k, v in expected.items())

    return test


def only_files(pattern: str) -> Legacy:
    """A `Legacy` test: every entry's name matches `pattern` (a stage's own file names; an
    interrupted older version left no manifest, but nothing else either)."""
    regex = re.compile(pattern)
    return lambda uri, names: all(regex.fullmatch(n) for n in names)


def either(*tests: Legacy) -> Legacy:
    return lambda uri, names: any(t(uri, names) for t in tests)


def _read_json(uri: str) -> dict:
    try:
        value = json.loads(storage.read_bytes(uri))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _listing(uri: str, hint: str) -> list[pafs.FileInfo] | None:
    """The entries of directory `uri`; None if it does not exist."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise OutputDirError(f"{uri}: is a file, not a directory; refusing to replace it — {hint}")
    return fs.get_file_info(pafs.FileSelector(path))


def check_clearable(
    uri: str, kind: str, *, legacy: Legacy | None = None, hint: str = "choose another --out-dir"
) -> None:
    """Raise OutputDirError unless `uri` is absent, empty, or puma-ray's `kind` output."""
    entries = _listing(uri, hint)
    if not entries:
        return
    names = {e.base_name for e in entries}
    if MARKER in names:
        found = _read_json(storage.join(uri, MARKER)).get("kind")
        if found == kind:
            return
        raise OutputDirError(
            f"{uri}: holds puma-ray {found or 'unknown'} output, not {kind}; refusing to clear "
            f"it — {hint}"
        )
    if legacy is not None and legacy(uri, names):
        return
    raise OutputDirError(
        f"{uri}: not empty and not written by puma-ray (no manifest or marker); refusing to "
        f"clear it — {hint}"
    )


def claim(uri: str, kind: str) -> None:
    """Create `uri` if needed and mark it as puma-ray's `kind` output. Call `check_clearable`
    first: the marker is what later allows clearing the directory."""
    storage.makedirs(uri)
    marker = storage.join(uri, MARKER)
    if not storage.exists(marker):
        body = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        storage.atomic_write_bytes(marker, json.dumps(body).encode())


def clear(
    uri: str,
    kind: str,
    *,
    legacy: Legacy | None = None,
    hint: str = "choose another --out-dir",
    first: Iterable[str] = ("manifest.json",),
    mark: bool = True,
) -> None:
    """Empty `uri` for a redo (refusing a directory that is not ours): the manifest(s) in `first`
    go first, so nothing half-cleared looks complete, then everything but the marker.

    `mark=False` for directories recognised by `legacy` alone that must not hold a marker."""
    check_clearable(uri, kind, legacy=legacy, hint=hint)
    if mark:
        claim(uri, kind)
    for name in first:
        storage.delete(storage.join(uri, name))
    fs, path = storage.resolve(uri)
    for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if entry.base_name == MARKER:
            continue
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
        else:
            fs.delete_file(entry.path)


def _entries_if_dir(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return fs.get_file_info(pafs.FileSelector(path))


def owned(uri: str) -> bool:
    """Whether `uri` is a directory puma-ray wrote: it holds the marker or one of OWN_FILES."""
    return any(i.base_name == MARKER or i.base_name in OWN_FILES for i in _entries_if_dir(uri))


def remove_stale_tmp(uri: str, *, only: Iterable[str] | None = None) -> list[str]:
    """Delete the `*.tmp-<8 hex>` files directly under `uri` (of the names in `only`, if given)
    and return their paths. Only the run-dir lock holder may call this, on a directory it owns."""
    fs, _ = storage.resolve(uri)
    bases = None if only is None else set(only)
    removed = []
    for info in _entries_if_dir(uri):
        name = info.base_name
        if info.type != pafs.FileType.File or not TMP_PATTERN.match(name):
            continue
        if bases is not None and name.lstrip(".").rsplit(".tmp-", 1)[0] not in bases:
            continue
        try:
            fs.delete_file(info.path)
        except FileNotFoundError:
            continue
        removed.append(info.path)
    return removed
