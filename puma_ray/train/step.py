"""One optimiser step of adversarial training as pure tensor code (no Ray, no I/O): the batch
augmentation, the attack that makes the training inputs, the PGD-AT / TRADES loss, the step
itself, the lr and eps schedules, the weight-decay groups and the EMA of the weights. The
training loop and benchmarks/train.py both call `train_step`, so the benchmark times exactly
the loop's step."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from puma_ray.attacks.pgd import pgd, trades_adv
from puma_ray.config import AttackConfig, TrainingConfig


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
