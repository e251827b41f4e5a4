"""Checkpoints shipped inside the package, named `puma_ray:<file>` wherever a checkpoint path
goes (`margin_model.checkpoint: puma_ray:demo_margin_model.pt`).

The name is resolved where the file is read (a scoring actor, the driver), not when the config
is loaded: on a cluster each node finds the file in its own copy of the package, and the name
in the config and its fingerprints is the same on every machine. The file's content hash is
part of every stage fingerprint that reads it, like any given checkpoint's.
"""

from __future__ import annotations

import os
from importlib.resources import files

from puma_ray.errors import CheckpointError

PREFIX = "puma_ray:"


def is_packaged(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def resolve(ref):
    """The file a `puma_ray:<file>` name stands for (under puma_ray/assets/); any other path
    unchanged."""
    if not is_packaged(ref):
        return ref
    name = ref[len(PREFIX) :]
    path = str(files("puma_ray") / "assets" / name)
    if os.sep in name or "/" in name or not os.path.isfile(path):
        have = sorted(p.name for p in (files("puma_ray") / "assets").iterdir() if p.is_file())
        raise CheckpointError(
            f"{ref}: no packaged checkpoint of that name (packaged: {', '.join(have) or 'none'})"
        )
    return path
