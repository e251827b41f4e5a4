"""Checkpoints that rebuild their own model: arch, options and image shape travel with the weights.

A checkpoint is one `torch.save` archive holding a plain dict (see `save_checkpoint`). It is
published atomically (temporary sibling, then rename) so a crash never leaves half a file under
the final name, and read with `weights_only=True` so opening one never runs pickled code. Local
files are memory-mapped, so reading the meta or fingerprinting a 1 GB WRN-70-16 checkpoint does
not first copy it into RAM. Paths may be local or any URI `puma_ray.storage` understands.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Sequence

import torch
from torch import nn

from puma_ray import storage
from puma_ray.errors import CheckpointError, ConfigError
from puma_ray.models import packaged
from puma_ray.models.registry import create_model
from puma_ray.models.zoo import is_zoo_ref, load_zoo_model, zoo_fingerprint, zoo_meta

FORMAT = "puma_ray.checkpoint/1"
DEFAULT_IMAGE_SHAPE = (32, 32, 3)  # [H, W, C], the order of dataset.json
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_FIELDS = {
    "arch": str,
    "num_classes": int,
    "kwargs": dict,
    "image_shape": (list, tuple),
    "extra": dict,
    "state_dict": dict,
}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    extra: dict | None = None,
    image_shape: Sequence[int] | None = None,
) -> None:
    """Write `model` (as built by `create_model`, possibly wrapped in DDP or torch.compile).

    The file holds {"format", "arch", "num_classes", "kwargs", "image_shape", "extra",
    "state_dict"}; weights are moved to CPU and wrapper prefixes are stripped, so any process can
    load it. `image_shape` is the [H, W, C] of the training images (default 32x32 with the model's
    channels). `extra` (epoch, metrics, ...) may hold only what `weights_only` loading accepts:
    dicts, lists, tuples, str, int, float, bool, None and tensors.
    """
    inner = _unwrap(model)
    missing = [a for a in ("arch", "num_classes", "model_kwargs") if not hasattr(inner, a)]
    if missing:
        raise ValueError(
            f"save_checkpoint needs a model built by create_model (it has no {', '.join(missing)})"
        )
    extra = {} if extra is None else extra
    _check_storable(extra, "extra")
    _check_storable(inner.model_kwargs, "model_kwargs")
    if image_shape is None:
        image_shape = (*DEFAULT_IMAGE_SHAPE[:2], getattr(inner, "in_channels", 3))
    state = {_strip_prefixes(k): v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {
        "format": FORMAT,
        "arch": inner.arch,
        "num_classes": int(inner.num_classes),
        "kwargs": dict(inner.model_kwargs),
        "image_shape": [int(s) for s in image_shape],
        "extra": extra,
        "state_dict": state,
    }
    _write(path, checkpoint)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes, load its weights, move it to `map_location`.

    Returns (model in eval mode, meta) with meta as in `read_checkpoint_meta`. A RobustBench
    reference (`robustbench:...`, `puma_ray.models.zoo`) loads the zoo model instead.
    """
    if is_zoo_ref(path):
        return load_zoo_model(path, map_location)
    checkpoint = _read(path)
    meta = _meta(checkpoint, path)
    try:
        model = create_model(meta["arch"], meta["num_classes"], **meta["kwargs"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from e
    state = {_strip_prefixes(k): v for k, v in checkpoint["state_dict"].items()}
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit {meta['arch']} ({problem})")
    model.load_state_dict(state)
    if map_location is not None:
        model.to(map_location)
    return model.eval(), meta


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's description, without building the model (local files are memory-mapped,
    so their weights are not read either).

    Keys: path, format, arch, num_classes, kwargs, image_shape ([H, W, C]), extra.
    """
    if is_zoo_ref(path):
        return zoo_meta(path)
    return _meta(_read(path), path)


def check_compatible(meta: dict, num_classes: int, image_shape: Sequence[int]) -> None:
    """Raise CheckpointError (one line, naming the checkpoint) if it cannot serve this dataset.

    `image_shape` is the dataset's [H, W, C]; `meta` comes from `read_checkpoint_meta`.
    """
    where = meta.get("path", "checkpoint")
    problems = []
    if int(meta["num_classes"]) != int(num_classes):
        ours = meta["num_classes"]
        problems.append(f"model has {ours} classes but the dataset has {num_classes}")
    trained, given = _shape(meta["image_shape"]), _shape(image_shape)
    if trained != given:
        problems.append(f"model was trained on {trained} images but the dataset's are {given}")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}")


def model_fingerprint(path: str | os.PathLike) -> str:
    """32 hex chars of sha256 over arch, num_classes, kwargs and every tensor's bytes.

    Tensors are hashed in sorted key order with their dtype and shape, so saving the same weights
    twice gives the same fingerprint, whatever the archive's byte layout. A RobustBench
    reference's is the sha256 of its weights file.
    """
    if is_zoo_ref(path):
        return zoo_fingerprint(path)
    checkpoint = _read(path)
    digest = hashlib.sha256()
    header = {k: checkpoint[k] for k in ("arch", "num_classes", "kwargs")}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    state = checkpoint["state_dict"]
    for key in sorted(state):
        tensor = state[key].detach().contiguous().reshape(-1)
        digest.update(f"|{key}|{tensor.dtype}|{list(state[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _check_storable(value, where: str) -> None:
    """Fail at save time, not at the next load, on values `weights_only` loading refuses."""
    # Exact types: numpy scalars subclass float but do not load with weights_only.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(key).__name__}")
            _check_storable(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {type(value).__name__}; checkpoints hold only dicts, "
        "lists, tuples, str, int, float, bool, None and tensors (convert numpy values first)"
    )


def _write(path: str | os.PathLike, checkpoint: dict) -> None:
    if not storage.is_local(path):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        storage.atomic_write_bytes(path, buffer.getvalue())
        return
    # Locally, stream straight to a sibling file: no in-memory copy of a large model's bytes.
    local = storage.resolve(path)[1]
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: str | os.PathLike) -> dict:
    """The checkpoint dict with tensors on CPU (memory-mapped when local), validated. A
    `puma_ray:<file>` name reads the checkpoint shipped in the package."""
    path = packaged.resolve(path)
    if not storage.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        if storage.is_local(path):
            local = storage.resolve(path)[1]
            if not zipfile.is_zipfile(local):
                raise CheckpointError(f"{path}: not a puma_ray checkpoint (not a torch.save file)")
            checkpoint = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        else:
            data = io.BytesIO(storage.read_bytes(path))
            checkpoint = torch.load(data, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise CheckpointError(f"{path}: not a puma_ray checkpoint ({reason[:160]})") from e
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        what = "a dict without 'format'" if isinstance(checkpoint, dict) else type(checkpoint)
        raise CheckpointError(
            f"{path}: not a puma_ray checkpoint (found {what}; write it with save_checkpoint)"
        )
    if checkpoint["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {checkpoint['format']!r} is not "
            f"supported (this version reads {FORMAT})"
        )
    for field, kind in _FIELDS.items():
        if not isinstance(checkpoint.get(field), kind):
            raise CheckpointError(f"{path}: not a puma_ray checkpoint (bad or missing {field!r})")
    problem = _content_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{path}: not a puma_ray checkpoint ({problem})")
    return checkpoint


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _content_problem(checkpoint: dict) -> str:
    """'' when the fields hold what readers index and convert; else what does not, so a bad file
    is one CheckpointError here instead of an AttributeError in whatever reads it first."""
    if not _is_count(checkpoint["num_classes"]):
        return f"num_classes is {checkpoint['num_classes']!r}, not a positive integer"
    shape = checkpoint["image_shape"]
    if len(shape) != 3 or not all(_is_count(s) for s in shape):
        return f"image_shape is {repr(list(shape))[:80]}, not [H, W, C] positive integers"
    if not all(isinstance(k, str) for k in checkpoint["kwargs"]):
        return "kwargs has a key that is not a string"
    for key, value in checkpoint["state_dict"].items():
        if not isinstance(key, str):
            return f"state_dict has a key that is not a string ({key!r})"
        if not isinstance(value, torch.Tensor):
            return f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor"
    return ""


def _meta(checkpoint: dict, path) -> dict:
    return {
        "path": os.fspath(path),
        "format": checkpoint["format"],
        "arch": checkpoint["arch"],
        "num_classes": checkpoint["num_classes"],
        "kwargs": dict(checkpoint["kwargs"]),
        "image_shape": [int(s) for s in checkpoint["image_shape"]],
        "extra": checkpoint["extra"],
    }


def _state_mismatch(expected: dict, found: dict) -> str:
    """'' when `found` has exactly the keys and shapes of `expected`, else what differs."""
    parts = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            parts.append(f"{label} {keys[0]}{more}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{k} is {list(found[k].shape)} in the file but {list(expected[k].shape)} in the model"
        )
    return "; ".join(parts)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)
