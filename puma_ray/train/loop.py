"""The training loop of one worker (or of the only process): `train_loop(config, session)`, a
plain function of a dict that `run_train` builds. Ray Train's `TorchTrainer` pickles it by
reference and runs it on every worker, so it stays a module-level function (also importable as
`puma_ray.train.train_loop`); with `ray.num_workers: 0` it runs in the driver's process.

Every epoch: draw the batches of the `EpochPlan`, take the optimiser steps (`step.train_step`),
sum the metrics over the ranks, evaluate on the validation subset (rank 0), then report with a
checkpoint that rank 0 writes (and logs to MLflow)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from puma_ray.config import TrainingConfig
from puma_ray.train.plan import EpochPlan, batch_plan, check_resume, epoch_plan
from puma_ray.train.session import _RaySession, _Session
from puma_ray.train.step import EMA, augment_batch, eps_factor, lr_factor, param_groups, train_step
from puma_ray.train.streams import _batch_tensors, _exact, _passes


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
    val = ""
    if "val/epoch_clean_acc" in m:
        val = f", val clean {m['val/epoch_clean_acc']:.3f} robust {m['val/epoch_robust_acc']:.3f}"
    return (
        f"[{name}] epoch {m['epoch']}/{epochs}: loss {m['train_loss']:.4f}, train clean "
        f"{m['train_clean_acc']:.3f} adv {m['train_adv_acc']:.3f}{val}, "
        f"{m['samples_per_s']:.0f} samples/s, {m['epoch_s']:.0f} s"
    )


def train_loop(config: dict, session: _Session | None = None) -> list[dict]:
    """The training loop of one worker (or of the only process). `config` is plain data, built
    by `run_train`; returns the metrics history (rank 0)."""
    from puma_ray.evaluate import load_split_rows

    session = session or _RaySession()
    tcfg = TrainingConfig.model_validate(config["training"])
    ev = config["evaluation"]
    rank, world = session.rank, session.world_size
    state = session.checkpoint_state()
    # fine-tuning loads its initial weights only when starting: a resume loads its checkpoint
    init = config.get("init_from") if state is None else None
    model, wrapped, device, amp = _model(config, tcfg, world, init)
    plan = epoch_plan(config["source_rows"], tcfg, world)
    bplan = batch_plan(config["source_rows"], config["num_rows"], tcfg, world)
    steps_per_epoch, total_steps = bplan["steps_per_epoch"], bplan["total_steps"]
    eps_warmup = int(round(tcfg.eps_warmup_epochs * steps_per_epoch))
    opt, sched, ema = _optimiser(model, tcfg, steps_per_epoch, total_steps)
    w = _Worker(model, wrapped, device, amp, opt, sched, ema)
    start_epoch, device_seconds, history = _resume(state, bplan, w)
    val = None
    if rank == 0 and config.get("val_uri"):
        val = load_split_rows(config["val_uri"], ev["train_subset"])
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    debug_dir = config.get("debug_dir")
    epoch_batches = _epoch_batches(session, plan, tcfg.seed, rank, start_epoch)

    for epoch in range(start_epoch, tcfg.epochs):
        gen.manual_seed(tcfg.seed * 100003 + epoch * 1000 + rank)
        wrapped.train()
        t0 = time.perf_counter()
        progress = _progress(config, session, tcfg, epoch, steps_per_epoch)
        sums, seen = _train_epoch(
            config,
            session,
            tcfg,
            w,
            epoch_batches(epoch),
            epoch,
            gen,
            eps_warmup,
            bool(debug_dir),
            progress,
        )
        seconds = time.perf_counter() - t0
        if debug_dir:
            _save_ids(debug_dir, epoch, rank, seen)
        metrics = _epoch_metrics(
            session, w, sums, seconds, device_seconds, epoch, start_epoch, world, eps_warmup
        )
        device_seconds = metrics["device_seconds"]
        eval_model = ema.model if ema is not None else model
        if val is not None:
            metrics.update(_val_metrics(eval_model, val, tcfg, ev, device))
        history.append(metrics)
        if rank == 0:
            session.log(_epoch_line(config.get("name", "train"), tcfg.epochs, metrics))
        checkpoint = None
        if rank == 0:
            checkpoint = _checkpoint(epoch, w, device_seconds, history, bplan)
            if config.get("mlflow") is not None:
                from puma_ray import tracking

                # an epoch rerun after a resume was logged by the attempt that ran it first
                tracking.safe(config["mlflow"].log_new_metrics, metrics, epoch + 1)
        _maybe_fail(config, session, epoch, at="report")
        session.report(metrics, checkpoint)
    return history


# ----------------------------------------------------------------------------------------------
# Its steps, in the order the loop takes them.


@dataclass
class _Worker:
    """One worker's model and what steps it: the module itself (attacked, checkpointed, the
    EMA's source), its DDP wrapper (`wrapped`; the module itself on one worker), the device,
    the autocast context, the optimiser, the per-step lr schedule and the EMA (or None)."""

    model: nn.Module
    wrapped: nn.Module
    device: torch.device
    amp: Callable[[], Any]
    opt: torch.optim.Optimizer
    sched: Any
    ema: EMA | None


def _model(config: dict, tcfg: TrainingConfig, world: int, init: str | None = None):
    """(model, DDP-wrapped model, device, autocast context): the same initial weights on every
    rank (a random init, or those of `init`: `training.init_from`); DDP over the workers when
    there are several, the GPU in-process with `use_gpu`."""
    from puma_ray.train.init import initial_model

    if tcfg.deterministic:
        deterministic_kernels()
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    model = initial_model(config["arch"], config["num_classes"], config["model_kwargs"], init)
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

    return model, wrapped, device, amp


def deterministic_kernels() -> None:
    """What PyTorch offers for bitwise-reproducible GPU training (its "Reproducibility" notes):
    deterministic algorithms (an op without one raises), cuDNN without autotuning, and the
    cuBLAS workspace setting that must be in the environment before the first cuBLAS call."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _optimiser(model: nn.Module, tcfg: TrainingConfig, steps_per_epoch: int, total_steps: int):
    """(optimiser, lr schedule stepped per batch, EMA or None) of `model`."""
    warmup = int(round(tcfg.warmup_epochs * steps_per_epoch))
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
    return opt, sched, ema


def _resume(state: dict | None, bplan: dict, w: _Worker) -> tuple[int, float, list[dict]]:
    """Load the checkpoint `state` (if any) into the model, optimiser, schedule, EMA and torch
    RNG; returns (first epoch to run, device-seconds so far, metrics history so far)."""
    if state is None:
        return 0, 0.0, []
    # run_train checks this before it starts; here for checkpoints it could not list
    check_resume(state.get("batch_plan"), bplan, "the checkpoint to resume")
    w.model.load_state_dict(state["model"])
    w.opt.load_state_dict(state["optimizer"])
    w.sched.load_state_dict(state["scheduler"])
    if w.ema is not None and state.get("ema") is not None:
        w.ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"]) + 1, float(state["device_seconds"]), list(state["history"])


def _progress(config: dict, session: _Session, tcfg: TrainingConfig, epoch: int, steps: int):
    """Rank 0's progress line within the epoch (steps done, rate, ETA) every
    `logs.progress_every_s()` seconds, through the same `session.log` as the epoch line; None
    on the other ranks."""
    if session.rank != 0:
        return None
    from puma_ray.logs import Progress

    what = f"[{config.get('name', 'train')}] epoch {epoch + 1}/{tcfg.epochs}"
    return Progress(steps, what, session.log, unit="steps")


def _epoch_batches(session: _Session, plan: EpochPlan, seed: int, rank: int, start_epoch: int):
    """epoch -> a generator of that epoch's pyarrow batches: one pass over the "train" stream,
    or (fixed-step epochs) `plan.steps` batches from endless streams that carry on across
    epochs, each batch joined from one part per stream. The endless streams are opened here."""

    def stream(name: str, first_pass: int, endless: bool):
        stream_seed = seed * 7919 + rank + 100_003 * list(plan.batch).index(name)
        n = plan.batch[name]
        batches = _passes(
            session.data(name), n, stream_seed, first_pass, endless=endless, name=name
        )
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

    return epoch_batches


def _train_epoch(
    config: dict,
    session: _Session,
    tcfg: TrainingConfig,
    w: _Worker,
    batches,
    epoch: int,
    gen: torch.Generator,
    eps_warmup: int,
    keep_ids: bool,
    progress=None,
):
    """The optimiser steps of one epoch over `batches`: (sums [loss*n, clean correct, adv
    correct, n, batches] of this rank, and with `keep_ids` the (ids, is-real) of each batch).
    `progress` (a `logs.Progress`, or None) counts the steps."""
    sums = np.zeros(5)  # loss*n, clean correct, adv correct, n, batches
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in batches:
        ids, x, y, eps = _batch_tensors(
            batch, config["image_shape"], config["has_eps"], config["uniform_eps"]
        )
        x, y, eps = x.to(w.device), y.to(w.device), eps.to(w.device)
        ramp = eps_factor(w.sched.last_epoch, eps_warmup)  # the scheduler counts steps
        if ramp < 1:
            eps = eps * ramp
        if tcfg.augment:
            x = augment_batch(x, gen)
        loss, adv_logits, clean_logits = train_step(
            w.model, x, y, eps, tcfg, w.opt, w.sched, wrapped=w.wrapped, amp=w.amp
        )
        if w.ema is not None:
            w.ema.update(w.model)
        if sums[4] == 0:
            _maybe_fail(config, session, epoch)
        if clean_logits is None and tcfg.objective != "standard":
            with torch.no_grad(), w.amp():
                w.model.eval()
                clean_logits = w.model(x).float()
                w.model.train()
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
        if keep_ids:
            seen.append((ids, batch["source"].to_numpy(zero_copy_only=False) == "real"))
        if progress is not None:
            progress.update()
    return sums, seen


def _save_ids(debug_dir: str, epoch: int, rank: int, seen: list) -> None:
    """Test hook (`debug_dir`): the sample ids this rank trained on in `epoch`, per batch."""
    os.makedirs(debug_dir, exist_ok=True)
    np.savez(
        os.path.join(debug_dir, f"ids-epoch{epoch}-rank{rank}.npz"),
        ids=np.concatenate([i for i, _ in seen]) if seen else np.zeros(0, np.int64),
        real=np.concatenate([r for _, r in seen]) if seen else np.zeros(0, bool),
        batch_real=np.array([r.sum() for _, r in seen], np.int64),
        batch_rows=np.array([len(i) for i, _ in seen], np.int64),
    )


def _epoch_metrics(
    session: _Session,
    w: _Worker,
    sums: np.ndarray,
    seconds: float,
    device_seconds: float,
    epoch: int,
    start_epoch: int,
    world: int,
    eps_warmup: int,
) -> dict:
    """The epoch's training metrics, summed over the ranks (two collectives, the same on every
    rank); `device_seconds` in them is the running total including this epoch."""
    loss_sum, clean_c, adv_c, n, batches = session.all_sum(sums.tolist())
    device_seconds += session.all_sum([seconds])[0]
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(1, n),
        "train_clean_acc": clean_c / max(1, n),
        "train_adv_acc": adv_c / max(1, n),
        "lr": w.opt.param_groups[0]["lr"],
        "eps_factor": eps_factor(w.sched.last_epoch - 1, eps_warmup),  # at the epoch's last step
        "samples_per_s": n / max(seconds, 1e-9),
        "epoch_s": seconds,
        "device_seconds": device_seconds,
        "train_rows": int(n),
        "steps": int(batches) // world,  # optimiser steps (every rank takes the same)
        "attempt_start_epoch": start_epoch,  # > 0: this epoch ran after a resume
    }


def _val_metrics(model: nn.Module, val, tcfg: TrainingConfig, ev: dict, device) -> dict:
    """Clean and PGD-robust accuracy of `model` on the validation subset (rank 0): what
    ASHA and a reader of the per-epoch curve decide on, so never the test split."""
    from puma_ray.evaluate import robust_accuracy

    clean, robust = robust_accuracy(
        model,
        val[0],
        val[1],
        tcfg.attack.epsilon,
        norm=tcfg.attack.norm,
        steps=ev["pgd_steps"],
        batch_size=ev["batch_size"],
        device=device,
        seed=tcfg.seed,
    )
    return {"val/epoch_clean_acc": clean, "val/epoch_robust_acc": robust}


def _checkpoint(epoch: int, w: _Worker, device_seconds: float, history: list, bplan: dict):
    """What rank 0 saves as `state.pt` after `epoch` (see `checkpoints`)."""
    return {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in w.model.state_dict().items()},
        "ema": w.ema.state_dict() if w.ema is not None else None,
        "optimizer": w.opt.state_dict(),
        "scheduler": w.sched.state_dict(),
        "rng": torch.get_rng_state(),
        "device_seconds": device_seconds,
        "history": history,
        "batch_plan": bplan,
    }
