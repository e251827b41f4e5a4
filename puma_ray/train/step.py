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
    trades_attack_bn: str = "batch",
    trades_start: str = "auto",
) -> torch.Tensor:
    """The training inputs for one batch: PGD (pgd_at), the TRADES KL maximiser (trades) or x
    itself (standard). `eps` is per sample ([N], pixel units); rows with eps 0 come back equal
    to x, so they train clean. `model` should be the unwrapped module (not DDP).

    PGD runs in eval mode, as the PGD-AT of Wang et al.'s code base (Rice et al.'s runs it in
    train mode). TRADES runs with BatchNorm as `trades_attack_bn` says: `batch` (train mode,
    running statistics frozen: Wang et al. 2023) or `running` (eval mode: Zhang et al. 2019);
    `trades_start` is the `training.trades_start` choice. Neither touches the running
    statistics, so only the training forward(s) update them."""
    if objective == "standard":
        return x
    kw = dict(norm=attack.norm, steps=attack.steps, step_ratio=attack.step_ratio)
    if objective == "pgd_at":
        with _mode(model, "running"):
            return pgd(model, x, y, eps, **kw)
    if objective == "trades":
        if trades_start == "auto":
            trades_start = "uniform" if attack.norm == "linf" else "normal"
        with _mode(model, trades_attack_bn):
            return trades_adv(model, x, eps, start=trades_start, **kw)
    raise ValueError(f"unknown objective {objective!r}")


@contextlib.contextmanager
def _mode(model: nn.Module, bn: str):
    """`running`: eval mode. `batch`: train mode with every BatchNorm's running statistics
    frozen, so each forward normalises with its own batch's statistics and changes no buffer
    (Wang et al.'s `track_bn_stats(model, False)`). The caller's mode is restored after."""
    if bn not in ("batch", "running"):
        raise ValueError(f"unknown BatchNorm mode {bn!r}")
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    model.train(bn == "batch")
    if bn == "batch":
        for m in norms:
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, t in zip(norms, tracked, strict=True):
            m.track_running_stats = t
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
    trades_forward: str = "separate",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, adversarial logits, clean logits or None). PGD-AT and standard training take one
    forward. TRADES is CE(f(x), y) + beta * KL(f(x_adv) || f(x)) (batchmean, the clean softmax
    not detached, as the reference code): with `trades_forward="separate"` the clean and then
    the adversarial batch are two forwards, as Zhang et al.'s and Wang et al.'s code, so
    BatchNorm normalises each batch by its own statistics and updates its running statistics
    twice; "concatenated" is one forward of both (the same FLOPs; BatchNorm mixes the two)."""
    if objective == "trades":
        if trades_forward == "separate":
            clean, adv = model(x).float(), model(x_adv).float()
        elif trades_forward == "concatenated":
            logits = model(torch.cat([x, x_adv])).float()
            clean, adv = logits[: len(x)], logits[len(x) :]
        else:
            raise ValueError(f"unknown trades_forward {trades_forward!r}")
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
    `wrapped`, the DDP module when distributed: two DDP forwards before one backward with
    `trades_forward: separate`), backward, step, lr schedule. The training loop and
    benchmarks/train.py both call this, so the benchmark times exactly the loop's step."""
    with amp():
        x_adv = adversarial_batch(
            model,
            x,
            y,
            eps,
            objective=tcfg.objective,
            attack=tcfg.attack,
            trades_attack_bn=tcfg.trades_attack_bn,
            trades_start=tcfg.trades_start,
        )
        loss, adv_logits, clean_logits = training_loss(
            model if wrapped is None else wrapped,
            x,
            x_adv,
            y,
            objective=tcfg.objective,
            trades_beta=tcfg.trades_beta,
            label_smoothing=tcfg.label_smoothing,
            trades_forward=tcfg.trades_forward,
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
