"""How an epoch is built, and what a resume must not change: the per-worker batches and steps
of an epoch (`epoch_plan`), the steps the lr schedule counts (`schedule_steps`), the batch plan
a checkpoint records (`batch_plan`) and the check of a resumed checkpoint against it
(`check_resume`). Plain arithmetic on the config: no Ray, no tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from puma_ray.config import TrainingConfig
from puma_ray.data import SOURCES
from puma_ray.errors import ConfigError, PumaRayError


class TrainingError(PumaRayError):
    """Training could not run or finish (bad inputs, or failures beyond `max_failures`)."""


@dataclass(frozen=True)
class EpochPlan:
    """How one worker draws its batches. `batch` maps a stream name to rows per step from it:
    {"train": b} is one stream over every row, {"real": r, "synthetic": s} mixes the two sources
    in a fixed ratio. `steps` is the number of optimiser steps per epoch, or None for "one pass
    over the stream" (epochs then end where the data does, with a smaller last batch)."""

    batch: dict[str, int]
    steps: int | None


def epoch_plan(source_rows: dict[str, int], tcfg: TrainingConfig, world: int) -> EpochPlan:
    """Per-worker batches and steps per epoch for `source_rows` ({"real": n, "synthetic": m}
    rows of the training set) on `world` workers.

    `training.batch_size` is the global batch; it must split equally over the workers (a
    ConfigError otherwise: with unequal shares the DDP ranks would wait on each other).
    With both sources present and `real_fraction` set, every batch holds round(f*b) real rows
    and the rest synthetic, each drawn from its own stream that restarts when it runs out (the
    0.3 real : 0.7 synthetic batches of Wang et al. 2023, arXiv:2302.04638); when the workers
    cannot share those real rows equally each takes round(f*b/n). An epoch is then a
    number of steps: as many samples as the set has (`epoch_length: kept`, so pruning saves
    compute), or `samples_per_epoch` (`fixed`; Wang et al. count 50k). Without mixing and with
    `kept`, an epoch is exactly one pass."""
    if tcfg.batch_size % world:
        raise ConfigError(
            f"training.batch_size={tcfg.batch_size} is not a multiple of ray.num_workers={world}: "
            "the global batch must split equally over the workers"
        )
    per_worker = tcfg.batch_size // world
    rows = sum(source_rows.values())
    mixed = tcfg.real_fraction is not None and all(source_rows.get(s, 0) > 0 for s in SOURCES)
    if mixed:
        n_real = round(tcfg.real_fraction * tcfg.batch_size)
        n_real = n_real // world if n_real % world == 0 else round(tcfg.real_fraction * per_worker)
        batch = {"real": n_real, "synthetic": per_worker - n_real}
        batch = {k: v for k, v in batch.items() if v > 0}
    else:
        batch = {"train": per_worker}
    global_batch = tcfg.batch_size
    if tcfg.epoch_length == "fixed":
        return EpochPlan(batch, max(1, math.ceil(tcfg.samples_per_epoch / global_batch)))
    if mixed:
        return EpochPlan(batch, max(1, math.ceil(rows / global_batch)))
    return EpochPlan(batch, None)


def schedule_steps(num_rows: int, tcfg: TrainingConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) that the lr schedule and the warm-ups count: from the
    set's size (or `samples_per_epoch`) and the global batch only. No worker count goes in, so a
    run resumed on other workers keeps its schedule."""
    samples = tcfg.samples_per_epoch if tcfg.epoch_length == "fixed" else num_rows
    per_epoch = max(1, math.ceil(samples / tcfg.batch_size))
    return per_epoch, per_epoch * tcfg.epochs


def batch_plan(
    source_rows: dict[str, int], num_rows: int, tcfg: TrainingConfig, world: int
) -> dict[str, Any]:
    """What a checkpoint records of how it was trained and a resume must not change: the global
    batch, its rows per stream, and the lr schedule's steps (`workers` is for the message)."""
    plan = epoch_plan(source_rows, tcfg, world)
    per_epoch, total = schedule_steps(num_rows, tcfg)
    return {
        "global_batch": tcfg.batch_size,
        "rows_per_step": {k: v * world for k, v in plan.batch.items()},
        "steps_per_epoch": per_epoch,
        "total_steps": total,
        "workers": world,
    }


_PLAN_KEYS = ("global_batch", "rows_per_step", "steps_per_epoch", "total_steps")


def check_resume(saved: dict | None, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint whose batch plan differs from this run's (e.g. another
    worker count that splits the real rows of a mixed batch differently): the optimiser and lr
    schedule would silently continue with another recipe. Checkpoints without a plan pass."""
    if not saved or all(saved.get(k) == current.get(k) for k in _PLAN_KEYS):
        return

    def describe(p: dict) -> str:
        rows = " + ".join(f"{n} {k}" for k, n in sorted(p.get("rows_per_step", {}).items()))
        return (
            f"a global batch of {p.get('global_batch')} ({rows} rows per step) and "
            f"{p.get('total_steps')} lr-schedule steps"
        )

    raise TrainingError(
        f"{where}: this checkpoint was trained on {saved.get('workers')} workers with "
        f"{describe(saved)}, but ray.num_workers={current['workers']} gives {describe(current)}; "
        f"resume with ray.num_workers={saved.get('workers')}, or start over with --force"
    )
