"""`puma-ray train`: adversarial training on the kept set (or the full set, for the margin model)
with Ray Train (DDP), per-sample epsilon, checkpoints every epoch and automatic resume.

The loop, `train_loop(config)`, is a plain function of a dict. `run_train` hands it to
`ray.train.torch.TorchTrainer` (CPU workers with gloo, GPU workers with nccl), or calls it in this
process when `ray.num_workers == 0` (for debugging), through the same `_Session` interface.

- Data: Ray Data streams the Parquet shards; Ray Train splits them across workers with an equal
  streaming split, so the workers see disjoint rows and never hold a full copy. With real and
  synthetic rows, each source is its own stream and every batch holds `real_fraction` real rows
  (`epoch_plan`); streams reshuffle every pass through a local shuffle buffer. Images are
  decoded and augmented (random crop with 4 pixels of padding + horizontal flip) as whole-batch
  tensor ops.
- Objectives: PGD-AT (Madry et al. 2018, arXiv:1706.06083) and TRADES (Zhang et al. 2019,
  arXiv:1901.08573) with the per-sample eps of the kept set (`eps` column; PUMA shrinks it for
  the lowest-margin samples), or `training.attack.epsilon` for every row of an unpruned set.
  The attack runs on the unwrapped model in eval mode, so BatchNorm statistics come from the
  training forward only and DDP sees exactly one forward/backward per step.
- Optimiser: SGD-Nesterov, weight decay only on conv/linear weights (not BatchNorm or biases),
  linear warm-up then cosine (or one-cycle / constant) stepped per batch; label smoothing; an
  optional EMA of the weights with the usual warm-up decay min(d, (1+t)/(10+t)).
- Epoch length follows the dataset (kept-set) size, so pruning saves compute, or is a fixed
  number of samples (`epoch_length: fixed`); `eps_warmup_epochs` ramps every sample's eps in.
- `training.batch_size` is the global batch, split equally over the workers (a batch that does
  not split is refused), so the batch and the lr schedule's steps do not depend on the worker
  count (`batch_plan`); checkpoints record them, and a resume that would change them is refused.
- Every epoch all ranks call `ray.train.report(metrics, checkpoint)`; only rank 0 writes the
  checkpoint (model, EMA, optimiser, scheduler, epoch, torch RNG, metric history, batch plan).
  The Ray run is named `<name>-<fingerprint of every input>`, so rerunning the same inputs
  resumes from the last checkpoint (or is a no-op once `summary.json` exists), changed inputs
  never resume a stale one, and `force=True` deletes the run's checkpoints and starts over.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from puma_ray import storage
from puma_ray.attacks.pgd import pgd, trades_adv
from puma_ray.config import AttackConfig, PipelineConfig, TrainingConfig
from puma_ray.data import SOURCES, dataset_dirs, decode_images, open_dataset
from puma_ray.errors import ConfigError, PumaRayError

STATE_FILE = "state.pt"
# Beside STATE_FILE in every checkpoint: its epoch and batch plan, small enough for the driver to
# read before it resumes (state.pt holds the weights and the optimiser).
META_FILE = "plan.json"


class TrainingError(PumaRayError):
    """Training could not run or finish (bad inputs, or failures beyond `max_failures`)."""


# ----------------------------------------------------------------------------------------------
# Batch-level pieces: pure tensor code, tested directly.


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after 4-pixel reflect padding, then a random horizontal flip, for a whole
    NCHW batch at once (per-sample offsets via one gather, no Python loop over samples)."""
    n, _, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [n, 1, 1, w]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def adversarial_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor | float,
    *,
    objective: str,
    attack: AttackConfig,
) -> torch.Tensor:
    """The training inputs for one batch: PGD (pgd_at), the TRADES KL maximiser (trades) or x
    itself (standard). `eps` is per sample ([N], pixel units); rows with eps 0 come back equal
    to x, so they train clean. `model` should be the unwrapped module (not DDP)."""
    if objective == "standard":
        return x
    was_training = model.training
    model.eval()
    try:
        kw = dict(norm=attack.norm, steps=attack.steps, step_ratio=attack.step_ratio)
        if objective == "pgd_at":
            return pgd(model, x, y, eps, **kw)
        if objective == "trades":
            return trades_adv(model, x, eps, **kw)
        raise ValueError(f"unknown objective {objective!r}")
    finally:
        model.train(was_training)


def training_loss(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    objective: str,
    trades_beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, adversarial logits, clean logits or None). PGD-AT and standard training take one
    forward; TRADES forwards clean and adversarial inputs as one batch (one DDP forward)."""
    if objective == "trades":
        logits = model(torch.cat([x, x_adv])).float()
        clean, adv = logits[: len(x)], logits[len(x) :]
        ce = F.cross_entropy(clean, y, label_smoothing=label_smoothing)
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return ce + trades_beta * kl, adv, clean
    logits = model(x_adv).float()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits, None


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    tcfg: TrainingConfig,
    opt: torch.optim.Optimizer,
    sched,
    *,
    wrapped: nn.Module | None = None,
    amp=contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimiser step of adversarial training: attack (on `model`), loss (through
    `wrapped`, the DDP module when distributed), backward, step, lr schedule. The training loop
    and benchmarks/train.py both call this, so the benchmark times exactly the loop's step."""
    with amp():
        x_adv = adversarial_batch(model, x, y, eps, objective=tcfg.objective, attack=tcfg.attack)
        loss, adv_logits, clean_logits = training_loss(
            model if wrapped is None else wrapped,
            x,
            x_adv,
            y,
            objective=tcfg.objective,
            trades_beta=tcfg.trades_beta,
            label_smoothing=tcfg.label_smoothing,
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss, adv_logits, clean_logits


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based) of `total`."""
    if schedule == "onecycle":
        peak = max(1, int(0.3 * total)) if warmup == 0 else warmup
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total - step) / max(1, total - peak))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def eps_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of every sample's training eps at optimiser step `step` (0-based): a linear
    ramp to 1 over `warmup_steps` (0: always 1). PGD-AT from scratch at the full radius can sit
    at chance on hard data; starting from small balls lets the robust features form first."""
    if step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BatchNorm parameters and biases are 1-D."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class EMA:
    """Exponential moving average of weights (and a copy of BN buffers), with warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# ----------------------------------------------------------------------------------------------
# Where the loop runs: Ray Train workers, or this process.


class _Session:
    """What the loop needs from its runner; `_RaySession` and `_LocalSession` implement it."""

    rank = 0
    world_size = 1

    def data(self, stream: str):
        """The iterable (Ray `DataIterator` or `Dataset`) of one stream of the `EpochPlan`."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict | None:
        raise NotImplementedError

    def report(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def log(self, msg: str) -> None:
        """A progress line; a Ray Train worker's stdout reaches the driver (log_to_driver)."""
        print(msg, flush=True)


def _load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_meta(directory: str, state: dict) -> None:
    meta = {"epoch": int(state["epoch"]), "batch_plan": state.get("batch_plan")}
    tmp = os.path.join(directory, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(directory, META_FILE))


class _RaySession(_Session):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        # Ray Train logs every report (metrics dict and all) at INFO from a logger named after
        # its file, which RunConfig's LoggingConfig does not reach; the loop logs each epoch.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    def log(self, msg: str) -> None:
        # not print(): Ray Train patches it to log *and* echo, so each line would show twice
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    def data(self, stream: str):
        import ray.train

        return ray.train.get_dataset_shard(stream)

    def checkpoint_state(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return _load_state(os.path.join(d, STATE_FILE))

    def report(self, metrics: dict, state: dict | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0 and state is not None:
                torch.save(state, os.path.join(d, STATE_FILE))
                _write_meta(d, state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def all_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


class _LocalSession(_Session):
    """num_workers=0: the loop in this process; checkpoints in a plain directory."""

    def __init__(self, datasets: dict, ckpt_dir: str, log: Callable[[str], None] = print):
        self.datasets = datasets
        self.ckpt_dir = ckpt_dir
        self.reports: list[dict] = []
        self.log = log

    def data(self, stream: str):
        return self.datasets[stream]

    def checkpoint_state(self) -> dict | None:
        path = os.path.join(self.ckpt_dir, STATE_FILE)
        return _load_state(path) if os.path.exists(path) else None

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            tmp = os.path.join(self.ckpt_dir, STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(self.ckpt_dir, STATE_FILE))
            _write_meta(self.ckpt_dir, state)


# ----------------------------------------------------------------------------------------------
# The loop.


def _batch_tensors(batch, image_shape, has_eps: bool, uniform_eps: float):
    """pyarrow batch -> (ids int64 [n], x float [n,C,H,W] in [0,1], y int64 [n], eps [n])."""
    images = decode_images(batch["image"], image_shape)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(batch["label"].to_numpy().astype(np.int64))
    ids = batch["id"].to_numpy().astype(np.int64)
    if has_eps:
        eps = torch.from_numpy(batch["eps"].to_numpy().astype(np.float32))
    else:
        eps = torch.full((len(y),), float(uniform_eps), dtype=torch.float32)
    return ids, x.contiguous(), y, eps


def _passes(data, batch_size: int, seed: int, first_pass: int, *, endless: bool, name: str):
    """pyarrow batches of one stream, reshuffled every pass (local shuffle buffer of 4 batches,
    at least 256 rows); each pass ends with a smaller batch. An endless stream starts its next
    pass when one ends, so a small real set recurs within an epoch of a large synthetic one."""
    p = first_pass
    while True:
        rows = 0
        for batch in data.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=False,
            local_shuffle_buffer_size=min(max(batch_size * 4, 256), 10_000),
            local_shuffle_seed=seed + p * 31,
        ):
            rows += len(batch)
            yield batch
        if not endless:
            return
        if rows == 0:
            raise TrainingError(f"the {name} stream gave this worker no rows")
        p += 1


def _exact(batches, n: int):
    """Re-cut a stream of tables into tables of exactly n rows (a pass's short last batch is
    topped up from the next pass), so a mixed batch keeps its real:synthetic ratio."""
    buf: list[pa.Table] = []
    have = 0
    for table in batches:
        buf.append(table)
        have += len(table)
        while have >= n:
            joined = buf[0] if len(buf) == 1 else pa.concat_tables(buf)
            yield joined.slice(0, n)
            rest = joined.slice(n)
            buf, have = ([rest] if len(rest) else []), len(rest)


def stream_files(
    files: list[str], file_sources: list[dict | None], streams
) -> dict[str, tuple[list[str], bool]]:
    """Which shard files feed each stream of an `EpochPlan`: {stream: (files, filter_rows)}.
    A file goes to the real / synthetic stream when it holds rows of that source (by its
    per-source counts); `filter_rows` is set when some file also holds the other source, or
    its counts are unknown (None), so rows must be filtered by the `source` column."""
    out = {}
    for stream in streams:
        if stream not in SOURCES:
            out[stream] = (list(files), False)
            continue
        chosen, mixed = [], False
        for f, counts in zip(files, file_sources, strict=True):
            if counts is None:
                chosen.append(f)
                mixed = True
            elif counts.get(stream, 0) > 0:
                chosen.append(f)
                mixed |= sum(counts.values()) > counts[stream]
        out[stream] = (chosen, mixed)
    return out


def _maybe_fail(config: dict, session: _Session, epoch: int, at: str = "step") -> None:
    """Test hook: kill rank `fail.rank` once in epoch `fail.epoch`, a few seconds after its first
    step (so the previous epoch's checkpoint has been registered, as for a real death), or with
    `fail.at: "report"` just before the epoch's report (after rank 0 logged it to MLflow)."""
    fail = config.get("debug_fail")
    if not fail or session.rank != fail["rank"] or epoch != fail["epoch"]:
        return
    if fail.get("at", "step") != at:
        return
    marker = fail["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write("failed once\n")
    time.sleep(fail.get("delay_s", 3.0))
    os._exit(1)  # a hard worker death, as a preempted node would give


def _epoch_line(name: str, epochs: int, m: dict) -> str:
    test = ""
    if "test_clean_acc" in m:
        test = f", test clean {m['test_clean_acc']:.3f} robust {m['test_robust_acc']:.3f}"
    return (
        f"[{name}] epoch {m['epoch']}/{epochs}: loss {m['train_loss']:.4f}, train clean "
        f"{m['train_clean_acc']:.3f} adv {m['train_adv_acc']:.3f}{test}, "
        f"{m['samples_per_s']:.0f} samples/s, {m['epoch_s']:.0f} s"
    )


def train_loop(config: dict, session: _Session | None = None) -> list[dict]:
    """The training loop of one worker (or of the only process). `config` is plain data, built
    by `run_train`; returns the metrics history (rank 0)."""
    from puma_ray.evaluate import load_test_subset, robust_accuracy
    from puma_ray.models import create_model

    session = session or _RaySession()
    tcfg = TrainingConfig.model_validate(config["training"])
    ev = config["evaluation"]
    rank, world = session.rank, session.world_size
    image_shape = config["image_shape"]
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    model = create_model(config["arch"], config["num_classes"], **config["model_kwargs"])
    ddp = world > 1
    if ddp:
        import ray.train.torch

        wrapped = ray.train.torch.prepare_model(model)
    else:
        wrapped = model
    if not ddp and config.get("use_gpu") and torch.cuda.is_available():
        model.cuda()
    device = next(model.parameters()).device
    # bf16 autocast on GPU (no loss scaling needed, unlike fp16); CPU runs stay in fp32.
    use_amp = tcfg.amp and device.type == "cuda"

    def amp():
        if use_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    plan = epoch_plan(config["source_rows"], tcfg, world)
    bplan = batch_plan(config["source_rows"], config["num_rows"], tcfg, world)
    steps_per_epoch, total_steps = bplan["steps_per_epoch"], bplan["total_steps"]
    warmup = int(round(tcfg.warmup_epochs * steps_per_epoch))
    eps_warmup = int(round(tcfg.eps_warmup_epochs * steps_per_epoch))
    opt = torch.optim.SGD(
        param_groups(model, tcfg.weight_decay),
        lr=tcfg.lr,
        momentum=tcfg.momentum,
        nesterov=tcfg.nesterov and tcfg.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, tcfg.schedule)
    )
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    history: list[dict] = []
    start_epoch, device_seconds = 0, 0.0
    state = session.checkpoint_state()
    if state is not None:
        # run_train checks this before it starts; here for checkpoints it could not list
        check_resume(state.get("batch_plan"), bplan, "the checkpoint to resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        device_seconds = float(state["device_seconds"])
        history = list(state["history"])
    test = None
    if rank == 0 and config.get("test_uri"):
        test = load_test_subset(config["test_uri"], ev["train_subset"])
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    debug_dir = config.get("debug_dir")

    def stream(name: str, first_pass: int, endless: bool):
        seed = tcfg.seed * 7919 + rank + 100_003 * list(plan.batch).index(name)
        n = plan.batch[name]
        batches = _passes(session.data(name), n, seed, first_pass, endless=endless, name=name)
        return _exact(batches, n) if endless else batches

    # fixed-step epochs draw from endless streams that carry on across epochs
    endless = {k: stream(k, start_epoch, True) for k in plan.batch} if plan.steps else None

    def epoch_batches(epoch: int):
        if endless is None:
            yield from stream("train", epoch, False)
            return
        for _ in range(plan.steps):
            parts = [next(endless[k]) for k in plan.batch]
            yield parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    for epoch in range(start_epoch, tcfg.epochs):
        gen.manual_seed(tcfg.seed * 100003 + epoch * 1000 + rank)
        wrapped.train()
        t0 = time.perf_counter()
        sums = np.zeros(5)  # loss*n, clean correct, adv correct, n, batches
        seen: list[tuple[np.ndarray, np.ndarray]] = []
        for batch in epoch_batches(epoch):
            ids, x, y, eps = _batch_tensors(
                batch, image_shape, config["has_eps"], config["uniform_eps"]
            )
            x, y, eps = x.to(device), y.to(device), eps.to(device)
            ramp = eps_factor(sched.last_epoch, eps_warmup)  # the scheduler counts steps
            if ramp < 1:
                eps = eps * ramp
            if tcfg.augment:
                x = augment_batch(x, gen)
            loss, adv_logits, clean_logits = train_step(
                model, x, y, eps, tcfg, opt, sched, wrapped=wrapped, amp=amp
            )
            if ema is not None:
                ema.update(model)
            if sums[4] == 0:
                _maybe_fail(config, session, epoch)
            if clean_logits is None and tcfg.objective != "standard":
                with torch.no_grad(), amp():
                    model.eval()
                    clean_logits = model(x).float()
                    model.train()
            if clean_logits is None:
                clean_logits = adv_logits
            n = len(y)
            sums += [
                float(loss.detach()) * n,
                float((clean_logits.argmax(1) == y).sum()),
                float((adv_logits.argmax(1) == y).sum()),
                n,
                1,
            ]
            if debug_dir:
                seen.append((ids, batch["source"].to_numpy(zero_copy_only=False) == "real"))
        seconds = time.perf_counter() - t0
        if debug_dir:
            os.makedirs(debug_dir, exist_ok=True)
            np.savez(
                os.path.join(debug_dir, f"ids-epoch{epoch}-rank{rank}.npz"),
                ids=np.concatenate([i for i, _ in seen]) if seen else np.zeros(0, np.int64),
                real=np.concatenate([r for _, r in seen]) if seen else np.zeros(0, bool),
                batch_real=np.array([r.sum() for _, r in seen], np.int64),
                batch_rows=np.array([len(i) for i, _ in seen], np.int64),
            )
        loss_sum, clean_c, adv_c, n, batches = session.all_sum(sums.tolist())
        device_seconds += session.all_sum([seconds])[0]
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, n),
            "train_clean_acc": clean_c / max(1, n),
            "train_adv_acc": adv_c / max(1, n),
            "lr": opt.param_groups[0]["lr"],
            "eps_factor": eps_factor(sched.last_epoch - 1, eps_warmup),  # at the epoch's last step
            "samples_per_s": n / max(seconds, 1e-9),
            "epoch_s": seconds,
            "device_seconds": device_seconds,
            "train_rows": int(n),
            "steps": int(batches) // world,  # optimiser steps (every rank takes the same)
            "attempt_start_epoch": start_epoch,  # > 0: this epoch ran after a resume
        }
        eval_model = ema.model if ema is not None else model
        if test is not None:
            clean, robust = robust_accuracy(
                eval_model,
                test[0],
                test[1],
                tcfg.attack.epsilon,
                norm=tcfg.attack.norm,
                steps=ev["pgd_steps"],
                batch_size=ev["batch_size"],
                device=device,
                seed=tcfg.seed,
            )
            metrics.update(test_clean_acc=clean, test_robust_acc=robust)
        history.append(metrics)
        if rank == 0:
            session.log(_epoch_line(config.get("name", "train"), tcfg.epochs, metrics))
        checkpoint = None
        if rank == 0:
            checkpoint = {
                "epoch": epoch,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "device_seconds": device_seconds,
                "history": history,
                "batch_plan": bplan,
            }
            if config.get("mlflow") is not None:
                from puma_ray import tracking

                # an epoch rerun after a resume was logged by the attempt that ran it first
                tracking.safe(config["mlflow"].log_new_metrics, metrics, epoch + 1)
        _maybe_fail(config, session, epoch, at="report")
        session.report(metrics, checkpoint)
    return history


# ----------------------------------------------------------------------------------------------
# The stage.


@dataclass
class TrainSummary:
    name: str
    dataset: str
    model_path: str
    epochs: int
    rows: int
    workers: int
    objective: str
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    skipped: bool = False
    fingerprint: str = ""
    ray_run_path: str | None = None
    mlflow_run_id: str | None = None
    wall_s: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        f = self.final
        head = "up to date, nothing to do" if self.skipped else f"{self.wall_s:.1f} s"
        lines = [
            f"train {self.name}: {self.objective} on the {self.dataset} set "
            f"({self.rows} rows, {self.workers or 'in-process'} workers), {head}",
        ]
        if self.resumed_from_epoch:
            lines.append(f"  resumed after epoch {self.resumed_from_epoch}")
        lines.append(
            f"  {'epoch':>5} {'loss':>8} {'clean':>7} {'adv':>7} {'test':>7} {'robust':>7} "
            f"{'lr':>9} {'samples/s':>10}"
        )
        for m in self.history[-10:]:
            lines.append(
                f"  {m['epoch']:>5} {m['train_loss']:>8.4f} {m['train_clean_acc']:>7.4f} "
                f"{m['train_adv_acc']:>7.4f} {m.get('test_clean_acc', float('nan')):>7.4f} "
                f"{m.get('test_robust_acc', float('nan')):>7.4f} {m['lr']:>9.2e} "
                f"{m['samples_per_s']:>10.1f}"
            )
        if f:
            lines.append(f"  device-seconds {f['device_seconds']:.1f}")
        lines.append(f"  model: {self.model_path}")
        return "\n".join(lines)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs(cfg: PipelineConfig, run_dir: str, dataset: str, kept_dir: str | None) -> dict:
    """Shard files, row count and fingerprint of the training data."""
    train_uri, test_uri = dataset_dirs(run_dir)
    full = open_dataset(train_uri)
    info = full.info
    if dataset == "full":
        return dict(
            files=full.files,
            file_sources=[dict(sh.rows_per_source) for sh in info.shards],
            source_rows=dict(info.rows_per_source),
            rows=full.num_rows,
            has_eps=False,
            fingerprint=info.fingerprint,
            image_shape=list(info.image_shape),
            num_classes=info.num_classes,
            test_uri=test_uri,
        )
    if dataset != "kept":
        raise ConfigError(f"--dataset {dataset}: expected 'kept' or 'full'")
    from puma_ray.prune import kept_dir as default_kept_dir
    from puma_ray.prune import kept_files

    files, manifest = kept_files(kept_dir or default_kept_dir(run_dir))
    rows = int(manifest["counts"]["kept"])
    if rows == 0:
        raise TrainingError(f"{kept_dir or default_kept_dir(run_dir)}: the kept set is empty")
    per_source = manifest["counts"].get("per_source", {})
    return dict(
        files=files,
        # None: a kept set written before per-file counts (its files are filtered by source)
        file_sources=[sh.get("rows_per_source") for sh in manifest["shards"]],
        source_rows={s: int(c["kept"]) for s, c in per_source.items()},
        rows=rows,
        has_eps=True,
        fingerprint=manifest["fingerprint"],
        image_shape=list(info.image_shape),
        num_classes=info.num_classes,
        test_uri=test_uri,
    )


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError, OSError):
        return None


def run_train(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    dataset: Literal["kept", "full"] = "kept",
    name: str = "train",
    kept_dir: str | None = None,
    mlflow_parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
    debug_dir: str | None = None,
    debug_fail: dict | None = None,
    ray_run_name: str | None = None,
    ray_storage_path: str | None = None,
    callbacks: list | None = None,
    mlflow_run_name: str | None = None,
    force: bool = False,
) -> TrainSummary:
    """Train on the kept set (per-sample eps) or the full sample set (uniform eps); write
    `<run_dir>/<name>/model.pt` and then `summary.json`. Rerunning with the same inputs is a
    no-op once finished and resumes from the last epoch checkpoint otherwise. `force` trains
    from epoch 0 in a new MLflow run: it first deletes this run's summary, model and
    checkpoints (the Ray Train run directory and the in-process checkpoint), nothing else.

    `debug_dir` makes every rank save the sample ids it trained on per epoch; `debug_fail`
    ({"rank", "epoch", "marker"}, optional "at": "step" | "report") kills one worker once
    (tests of failure recovery).

    For sweeps (each Tune trial drives its own TorchTrainer): `ray_run_name` and
    `ray_storage_path` replace the Ray Train run's `<name>-<fingerprint>` and
    `<run_dir>/ray_train` (a stable name is what resumes a restarted trial), `callbacks` are
    extra `ray.train.UserCallback`s such as Tune's `TuneReportCallback`, and
    `mlflow_run_name` names the MLflow run (default `name`)."""
    from puma_ray.models import save_checkpoint

    start = time.perf_counter()
    # the recipe is cfg.model / cfg.training: the margin model is trained with
    # `pipeline.margin_model_config(cfg)`, and the unpruned baseline of `--compare` with cfg itself
    model_cfg, tcfg = cfg.model, cfg.training
    inp = _inputs(cfg, run_dir, dataset, kept_dir)
    num_classes = cfg.data.num_classes or inp["num_classes"]
    fp = _fingerprint(
        {
            "data": inp["fingerprint"],
            "dataset": dataset,
            "model": model_cfg.model_dump(),
            "training": tcfg.model_dump(),
            "num_classes": num_classes,
            # not the worker count or evaluation settings: they change neither the recipe nor
            # the global batch, so a finished model stays valid; a checkpoint is resumed on
            # other workers only if its batch plan is the same (`check_resume`)
        }
    )
    out_dir = storage.join(run_dir, name)
    model_path = storage.join(out_dir, "model.pt")
    summary_path = storage.join(out_dir, "summary.json")
    old = _read_json(summary_path)
    if (
        not force
        and old is not None
        and old.get("fingerprint") == fp
        and storage.exists(model_path)
    ):
        summary = TrainSummary(**{**old, "skipped": True})
        log(summary.format())
        return summary

    world = max(1, cfg.ray.num_workers)
    try:
        current_plan = batch_plan(inp["source_rows"], inp["rows"], tcfg, world)
    except ConfigError as e:
        msg = str(e)
        if name == "margin_model":  # its recipe is margin_model.train in the config file
            msg = msg.replace("training.", "margin_model.train.")
        raise ConfigError(f"train {name}: {msg}") from None
    if ray_storage_path is None:
        ray_storage_path = (
            os.path.join(storage.local_path(run_dir), "ray_train")
            if storage.is_local(run_dir)
            else storage.join(run_dir, "ray_train")
        )
    ray_name = ray_run_name or f"{name}-{fp}"
    ray_run = storage.join(ray_storage_path, ray_name)
    local_ckpt = (
        os.path.join(storage.local_path(out_dir), f"local-{fp}")
        if storage.is_local(out_dir)
        else None
    )
    if force:
        log(f"train {name}: forced: deleting its summary, model and checkpoints, from epoch 0")
        # the summary first: an interrupted forced run must not look finished
        for path in (summary_path, model_path, ray_run, local_ckpt):
            if path is not None:
                storage.delete(path)
    # a resume on another worker count must not silently change the batch or the lr schedule
    for where, meta in _checkpoint_metas(local_ckpt if cfg.ray.num_workers == 0 else ray_run):
        check_resume(meta.get("batch_plan"), current_plan, where)

    from puma_ray import tracking

    storage.makedirs(out_dir)
    run_file = storage.join(out_dir, "mlflow_run.json")
    prev = {} if force else _read_json(run_file) or {}
    run = tracking.start_run(
        cfg.tracking,
        run_dir,
        run_name=mlflow_run_name or name,
        params={
            "dataset": dataset,
            "rows": inp["rows"],
            "model": model_cfg.model_dump(),
            "training": tcfg.model_dump(mode="json"),
            "workers": cfg.ray.num_workers,
        },
        tags={"puma_ray.stage": "train", "puma_ray.fingerprint": fp},
        parent_run_id=mlflow_parent_run_id,
        resume_run_id=prev.get("run_id") if prev.get("fingerprint") == fp else None,
        log=log,
    )
    if run is not None:
        storage.atomic_write_bytes(
            run_file, json.dumps({"run_id": run.run_id, "fingerprint": fp}).encode()
        )
    ev = cfg.evaluation
    loop_config = {
        "name": name,
        "training": tcfg.model_dump(mode="json"),
        "arch": model_cfg.arch,
        "model_kwargs": dict(model_cfg.kwargs),
        "num_classes": num_classes,
        "image_shape": inp["image_shape"],
        "num_rows": inp["rows"],
        "source_rows": inp["source_rows"],
        "has_eps": inp["has_eps"],
        "uniform_eps": tcfg.attack.epsilon,
        "test_uri": inp["test_uri"],
        "evaluation": {
            "pgd_steps": ev.epoch_pgd_steps,
            "batch_size": ev.batch_size,
            "train_subset": min(ev.subset or ev.epoch_subset, ev.epoch_subset),
        },
        "mlflow": run,
        "use_gpu": cfg.ray.use_gpu,
        "debug_dir": debug_dir,
        "debug_fail": debug_fail,
    }
    columns = ["id", "image", "label", "source"] + (["eps"] if inp["has_eps"] else [])
    log(
        f"train {name}: {tcfg.objective} on {inp['rows']} {dataset} rows, {tcfg.epochs} epochs, "
        f"{cfg.ray.num_workers or 'in-process'} workers (run {ray_name})"
    )
    from puma_ray.runtime import ensure_ray, read_parquet

    ensure_ray(cfg.ray)
    from ray.data.expressions import col

    plan = epoch_plan(inp["source_rows"], tcfg, world)
    datasets = {}
    for stream, (files, filter_rows) in stream_files(
        inp["files"], inp["file_sources"], plan.batch
    ).items():
        ds = read_parquet(files).select_columns(columns)  # page checksums verified
        ds = ds.filter(expr=col("source") == stream) if filter_rows else ds
        # the batch order (and so the model) must not depend on which read task ends first
        ds.context.execution_options.preserve_order = True
        datasets[stream] = ds
    status = "FAILED"
    ray_path = None
    try:
        if cfg.ray.num_workers == 0:
            session = _LocalSession(datasets, local_ckpt or tempfile.mkdtemp(), log)
            prior = session.checkpoint_state()
            resumed = int(prior["epoch"]) + 1 if prior else 0
            try:
                history = train_loop(loop_config, session)
            except Exception as e:
                _raise_if_corrupt(e, name, inp["files"])
                raise
            state = session.checkpoint_state()
        else:
            state, history, resumed, ray_path = _fit(
                cfg,
                tcfg,
                loop_config,
                datasets,
                name,
                storage_path=ray_storage_path,
                run_name=ray_name,
                callbacks=callbacks,
                files=inp["files"],
            )
        if state is None:
            raise TrainingError(f"train {name}: finished without a checkpoint")
        model = _model_from_state(model_cfg, num_classes, state)
        save_checkpoint(
            model_path,
            model,
            image_shape=inp["image_shape"],
            extra={
                "epochs": tcfg.epochs,
                "dataset": dataset,
                "fingerprint": fp,
                "metrics": {k: float(v) for k, v in (history[-1] if history else {}).items()},
            },
        )
        status = "FINISHED"
    finally:
        if run is not None:
            tracking.safe(run.finish, status, log=log)
    summary = TrainSummary(
        name=name,
        dataset=dataset,
        model_path=model_path,
        epochs=tcfg.epochs,
        rows=inp["rows"],
        workers=cfg.ray.num_workers,
        objective=tcfg.objective,
        history=history,
        resumed_from_epoch=resumed,
        fingerprint=fp,
        ray_run_path=ray_path,
        mlflow_run_id=run.run_id if run else None,
        wall_s=time.perf_counter() - start,
    )
    storage.atomic_write_bytes(summary_path, json.dumps(summary.to_dict(), indent=1).encode())
    log(summary.format())
    return summary


def _model_from_state(model_cfg, num_classes: int, state: dict) -> nn.Module:
    """The final weights: the EMA when one was kept, else the raw model."""
    from puma_ray.models import create_model

    model = create_model(model_cfg.arch, num_classes, **model_cfg.kwargs)
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    model.load_state_dict(weights)
    return model.eval()


def _ordered_ingest():
    """Ray Train's ingest options with `preserve_order`: each worker's batches then arrive in
    the files' order, whatever the read tasks' finishing order, so a run (and a resumed run)
    sees the same batches."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def _fit(
    cfg: PipelineConfig,
    tcfg: TrainingConfig,
    loop_config: dict,
    datasets: dict,
    name,
    *,
    storage_path: str,
    run_name: str,
    callbacks=None,
    files: list[str] | None = None,
):
    """Run the loop under TorchTrainer; returns (final state, history, resumed epoch, path)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resumed = _last_reported_epoch(storage.join(storage_path, run_name))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={
                "CPU": cfg.ray.cpus_per_worker,
                **({"GPU": 1} if cfg.ray.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.checkpoints_to_keep),
            # the loop prints one line per epoch; Ray Train's INFO lines repeat every report
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=_ordered_ingest(),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # WorkerGroupError / ControllerError after retries ran out
        _raise_if_corrupt(e, name, files)
        raise TrainingError(f"train {name}: failed after {tcfg.max_failures} retries: {e}") from e
    if result.checkpoint is None:
        return None, [], resumed, result.path
    with result.checkpoint.as_directory() as d:
        state = _load_state(os.path.join(d, STATE_FILE))
    return state, list(state["history"]), resumed, result.path


def _raise_if_corrupt(e: BaseException, name: str, files: list[str] | None) -> None:
    """A Parquet page that failed its checksum: one line naming the shards' directory (Ray's
    error does not say which file), instead of a worker traceback."""
    from puma_ray.errors import DataError
    from puma_ray.runtime import is_checksum_error

    if is_checksum_error(e):
        where = os.path.dirname(files[0]) if files else "the training shards"
        raise DataError(
            f"{where}: a Parquet page of a shard failed its checksum (train {name}): the data "
            "is corrupt; rebuild it (`puma-ray ingest --force`, then prune)"
        ) from None


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
