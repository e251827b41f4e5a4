"""Paths and URIs through pyarrow's filesystem layer, so a run directory can be local, NFS or s3://.

Every writer in the project publishes with `atomic_write_bytes` (temp name, then rename) so a reader
never sees a half-written file under its final name. On object stores the rename is a copy, which is
still all-or-nothing per object; manifests are written last so an interrupted stage is never taken
for a finished one.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from puma_ray.errors import ConfigError

# Object stores whose paths are `bucket/key`. Building their filesystem is not free: without a
# `?region=` in the URI, pyarrow asks S3 for the bucket's region (a network round trip) every
# time, and a stage resolves one URI per shard, manifest and existence check.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI (file://, s3://, gs://...).

    One filesystem object per bucket and process is reused; a URI with options in a query
    string (`s3://b/k?region=...&endpoint_override=...`) or %-escapes is left to pyarrow."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    try:
        if scheme in _BUCKET_SCHEMES and rest and not any(c in rest for c in "?#%"):
            bucket = rest.split("/", 1)[0]
            return _bucket_filesystem(scheme, bucket), rest.rstrip("/")
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:  # e.g. an unescaped space: file:///a b is file:///a%20b
        raise ConfigError(f"{uri}: not a URI pyarrow can open ({e})") from None
    except OSError as e:  # hdfs:// without libhdfs/a JVM, an unreachable endpoint
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(
            f"{uri}: cannot reach the {scheme}:// filesystem from here ({reason}); "
            "use a local path, NFS, s3:// or gs://"
        ) from None


def local_path(uri: str | os.PathLike) -> str | None:
    """The absolute local path of a plain path or a `file://` URI; None for any other URI.

    For code that needs the OS path of a run directory (e.g. `os.path.join` or a library that
    takes only local paths): `os.path.abspath("file:///x")` is a relative path named `file:`."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file://"):
        return resolve(uri)[1]
    return None


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the scheme."""
    base = os.fspath(base)
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def is_local(uri: str | os.PathLike) -> bool:
    """True for a plain path or a `file://` URI (see `local_path` for its OS path)."""
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


HASH_CACHE = ".puma-ray-hashes.json"


def _stat_key(uri: str) -> list | None:
    """What changes whenever a file's bytes do: size and mtime, plus (locally) ctime and inode,
    which a rewrite changes even when it restores the mtime. None if the file does not exist."""
    local = local_path(uri)
    if local is not None:
        try:
            st = os.stat(local)
        except OSError:  # absent or unreadable: the stage reading it says so in its own words
            return None
        return [local, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError:  # unreachable or forbidden: the stage reading it says so in its own words
        return None
    if info.type != pafs.FileType.File:
        return None
    return [os.fspath(uri), info.size, info.mtime_ns]


def content_hash(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str | None:
    """sha256 of a file's bytes (streamed), None if it does not exist or cannot be read.

    With `cache_dir`, the hash is kept in `<cache_dir>/.puma-ray-hashes.json` under the file's
    size, mtime, ctime and inode, so an unchanged multi-GB source is not read again on every
    run, while a file rewritten in place (even with its old mtime) is."""
    import hashlib
    import json

    uri = os.fspath(uri)
    key = _stat_key(uri)
    if key is None:
        return None
    cache_uri = join(cache_dir, HASH_CACHE) if cache_dir is not None else None
    cache: dict = {}
    if cache_uri is not None and exists(cache_uri):
        try:
            cache = json.loads(read_bytes(cache_uri))
        except ValueError:
            cache = {}
    hit = cache.get(key[0])
    if hit and hit.get("stat") == key:
        return hit["sha256"]
    digest = hashlib.sha256()
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    except OSError:  # unreadable: the stage reading it says so in its own words
        return None
    sha = digest.hexdigest()
    if cache_uri is not None and _stat_key(uri) == key:  # not modified while it was read
        cache[key[0]] = {"stat": key, "sha256": sha}
        atomic_write_bytes(cache_uri, json.dumps(cache, indent=1).encode())
    return sha
