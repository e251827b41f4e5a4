"""The folders prune writes and what marks them finished: `kept/` and `extrapolated/` under the
run directory, their manifests (written last; `_read_manifest`), the fingerprint that makes a
rerun with the same inputs a no-op, and which files make a folder of an older version prune's
to replace (`_KEPT_LEGACY`)."""

from __future__ import annotations

import hashlib
import json

from puma_ray import outputs, storage
from puma_ray.errors import DataError

FORMAT = "puma_ray.kept/1"
EXTRAPOLATED_FORMAT = "puma_ray.extrapolated/2"  # 2: estimates for every row, flags
MANIFEST = "manifest.json"


# What a kept / extrapolated folder of a version before the output marker holds: its manifest,
# or (interrupted) only shard files, their temp files and the histogram.
_OWN_PARTS = outputs.only_files(
    r"\.?(part-\d{5,}\.parquet|margin_hist\.png)(\.tmp-[0-9a-f]{8})?|manifest\.json\.tmp-[0-9a-f]{8}"
)
_KEPT_LEGACY = outputs.either(outputs.manifest_with(format=FORMAT), _OWN_PARTS)


def kept_dir(run_dir: str) -> str:
    return storage.join(run_dir, "kept")


def extrapolated_dir(run_dir: str) -> str:
    return storage.join(run_dir, "extrapolated")


def kept_files(kept_uri: str) -> tuple[list[str], dict]:
    """(shard URIs, manifest) of a finished kept set; refuses one without its manifest (an
    interrupted prune). Read these files rather than the directory: it also holds the manifest
    and the histogram PNG."""
    manifest = _read_manifest(storage.join(kept_uri, MANIFEST))
    if manifest is None:
        raise DataError(f"{kept_uri}: no finished kept set (run `puma-ray prune` first)")
    return [storage.join(kept_uri, s["file"]) for s in manifest["shards"]], manifest


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_manifest(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError:
        raise DataError(f"{path}: unreadable manifest") from None
