"""Paths and URIs through pyarrow's filesystem layer, so a run directory can be local, NFS or s3://.

Every writer in the project publishes with `atomic_write_bytes` (temp name, then rename) so a reader
never sees a half-written file under its final name. On object stores the rename is a copy, which is
still all-or-nothing per object; manifests are written last so an interrupted stage is never taken
for a finished one.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI (file://, s3://, gs://...)."""
    uri = os.fspath(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the scheme."""
    base = os.fspath(base)
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def is_local(uri: str | os.PathLike) -> bool:
    uri = os.fspath(uri)
    return "://" not in uri or uri.startswith("file://")


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def atomic_write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary sibling, then move it onto `uri` in one step."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if "://" in os.fspath(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def delete(uri: str | os.PathLike) -> None:
    """Delete a file or a directory tree if it exists."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Sorted paths (in the filesystem's own form) of the files directly under a directory."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
