"""What an epoch checkpoint holds on disk and how it is read back: `state.pt` (weights,
optimiser, scheduler, EMA, RNG, history, batch plan) and beside it `plan.json` (epoch and batch
plan, small enough for the driver to read before it resumes), in a Ray Train checkpoint or the
in-process checkpoint directory; and the final `model.pt` written from the last one."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from puma_ray import storage

if TYPE_CHECKING:
    from torch import nn

    from puma_ray.config import PipelineConfig

STATE_FILE = "state.pt"
# Beside STATE_FILE in every checkpoint: its epoch and batch plan, small enough for the driver to
# read before it resumes (state.pt holds the weights and the optimiser).
META_FILE = "plan.json"


def _load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_meta(directory: str, state: dict) -> None:
    meta = {"epoch": int(state["epoch"]), "batch_plan": state.get("batch_plan")}
    tmp = os.path.join(directory, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(directory, META_FILE))


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError, OSError):
        return None


def _checkpoint_metas(path: str | None) -> list[tuple[str, dict]]:
    """(checkpoint dir, {"epoch", "batch_plan"}) of every checkpoint under `path`: a Ray Train
    run directory (its `checkpoint_*` folders) or an in-process checkpoint directory. Reads
    `plan.json`; older checkpoints without it fall back to their state (local paths only)."""
    if path is None or not storage.exists(path):
        return []
    import pyarrow.fs as pafs

    fs, base = storage.resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    dirs = [path] + [
        storage.join(path, name)
        for name in sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint")
        )
    ]
    out = []
    for d in dirs:
        meta = _read_json(storage.join(d, META_FILE))
        if meta is None and storage.is_local(d):
            state_path = os.path.join(storage.local_path(d), STATE_FILE)
            if os.path.exists(state_path):
                try:
                    meta = {"epoch": int(_load_state(state_path)["epoch"])}
                except Exception:
                    meta = None
        if meta is not None:
            out.append((d, meta))
    return out


def _last_reported_epoch(run_path: str) -> int:
    """Epochs already checkpointed by an earlier attempt of this Ray run (0 if none)."""
    return max((int(m["epoch"]) + 1 for _, m in _checkpoint_metas(run_path)), default=0)


def save_final_model(
    model_path: str,
    cfg: PipelineConfig,
    net: dict,
    num_classes: int,
    state: dict,
    history: list[dict],
    inp: dict,
    *,
    dataset: str,
    fp: str,
) -> None:
    """The final model (`model.pt`) from the last checkpoint's state; `net` is the arch and
    options trained (`init.init_model`)."""
    from puma_ray.models import save_checkpoint

    model = model_from_state(net["arch"], net["model_kwargs"], num_classes, state)
    save_checkpoint(
        model_path,
        model,
        image_shape=inp["image_shape"],
        extra={
            "epochs": cfg.training.epochs,
            "dataset": dataset,
            "fingerprint": fp,
            "metrics": {k: float(v) for k, v in (history[-1] if history else {}).items()},
        },
    )


def model_from_state(arch: str, kwargs: dict, num_classes: int, state: dict) -> nn.Module:
    """The final weights: the EMA when one was kept, else the raw model."""
    from puma_ray.models import create_model

    model = create_model(arch, num_classes, **kwargs)
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    model.load_state_dict(weights)
    return model.eval()
