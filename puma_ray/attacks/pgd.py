"""PGD and the TRADES inner maximisation with a per-sample epsilon.

PUMA trains its lowest-margin samples at a smaller epsilon, so every attack here takes `eps` as
a tensor with one radius per sample (a float is broadcast). The step size scales with each
sample's radius (`step_ratio * eps_i`), so a sample with eps_i = 0 stays exactly clean and a
sample with a small ball is not thrown around by a step meant for a large one.

Both attacks differentiate with respect to the input only (`torch.autograd.grad`), so they never
touch the model's parameter gradients, and they leave the model in the mode the caller chose
(PGD-AT recipes differ on train vs eval mode during the attack; the trainer decides).
Pure PyTorch: no Ray here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2"]
_TINY = 1e-12


def per_sample_eps(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`eps` as a tensor of shape [N, 1, 1, 1] on x's device (float32; float64 for float64
    inputs); checks it is finite and >= 0."""
    n = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    e = torch.as_tensor(eps, dtype=dtype, device=x.device)
    if e.ndim == 0:
        e = e.expand(n)
    if e.shape != (n,):
        raise ValueError(f"eps must be a scalar or have shape ({n},), got {tuple(e.shape)}")
    if not torch.isfinite(e).all() or (e < 0).any():
        raise ValueError("eps must be finite and >= 0")
    return e.view(n, *([1] * (x.ndim - 1)))


def _norm2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    scale = torch.clamp(eps / (_norm2(delta) + _TINY), max=1.0)
    return delta * scale


def _step(grad: torch.Tensor, alpha: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / (_norm2(grad) + _TINY)


def _row_draws(x: torch.Tensor, row_seeds: torch.Tensor, normal: bool) -> torch.Tensor:
    """Noise shaped like x whose row i depends only on row_seeds[i] (not on the batch it is in),
    so a chunked or distributed evaluation draws the same random starts as one pass."""
    out = torch.empty(x.shape, dtype=torch.float32)
    g = torch.Generator()
    for i, seed in enumerate(row_seeds.tolist()):
        g.manual_seed(int(seed))
        if normal:
            out[i].normal_(generator=g)
        else:
            out[i].uniform_(generator=g)
    return out.to(device=x.device, dtype=x.dtype)


def _random_start(
    x: torch.Tensor, eps: torch.Tensor, norm: Norm, row_seeds: torch.Tensor | None = None
) -> torch.Tensor:
    if row_seeds is not None:
        if norm == "linf":
            return (_row_draws(x, row_seeds, False) * 2 - 1) * eps
        direction = _row_draws(x, row_seeds, True)
        direction = direction / (_norm2(direction) + _TINY)
        # the radius from a second, independent stream of the same row seed
        radius = _row_draws(x[:, :1, :1, :1], row_seeds + 0x5EED, False).view(-1)
        return direction * radius.view(-1, *([1] * (x.ndim - 1))) * eps
    if norm == "linf":
        return (torch.rand_like(x) * 2 - 1) * eps
    direction = torch.randn_like(x)
    direction = direction / (_norm2(direction) + _TINY)
    radius = torch.rand(x.shape[0], device=x.device).view(-1, *([1] * (x.ndim - 1)))
    return direction * radius * eps


def _check(norm: str, steps: int) -> None:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _run(model, x, eps, loss_fn, *, norm: Norm, steps: int, step_ratio: float, start):
    """Projected gradient ascent on `loss_fn(model(x + delta))` inside each sample's ball and
    the [0, 1] box. Returns the detached adversarial input."""
    eps_t = per_sample_eps(eps, x)
    alpha = eps_t * step_ratio
    x = x.detach()
    delta = _project(start(x, eps_t), eps_t, norm)
    delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(delta + _step(grad, alpha, norm), eps_t, norm)
            delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_ratio: float = 0.25,
    random_start: bool = True,
    row_seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Untargeted PGD (Madry et al. 2018) maximising cross-entropy, with per-sample radii.

    Args:
        x: inputs in [0, 1], NCHW. y: labels [N].
        eps: radius per sample ([N] tensor) or one float, in [0, 1] pixel units.
        step_ratio: step size as a fraction of each sample's eps (0.25 with 10 steps is the
            usual 2/255 for 8/255).
        row_seeds: [N] int64; when given, row i's random start is drawn from its own seed
            (reproducible evaluation), else from torch's global generator (training).
    Returns: adversarial inputs (detached), inside each sample's ball and [0, 1].
    """
    _check(norm, steps)

    def loss_fn(logits):
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def start(x, e):
        return _random_start(x, e, norm, row_seeds) if random_start else torch.zeros_like(x)

    return _run(model, x, eps, loss_fn, norm=norm, steps=steps, step_ratio=step_ratio, start=start)


def trades_adv(
    model: torch.nn.Module,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_ratio: float = 0.25,
    start: Literal["normal", "uniform"] = "normal",
) -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al. 2019, arXiv:1901.08573): maximise
    KL(p(x) || p(x')) over each sample's ball, p(x) computed once by the model as the caller
    left it (eval mode: running BatchNorm statistics; train mode: the clean batch's own).

    Args:
        start: `normal` 0.001·N(0, 1), as Zhang et al.'s code (and Wang et al.'s l2 code);
            `uniform` in each sample's ball, as Wang et al.'s l-inf code (arXiv:2302.04638).
    Returns: adversarial inputs (detached), inside each sample's ball and [0, 1].
    """
    _check(norm, steps)
    if start not in ("normal", "uniform"):
        raise ValueError(f"start must be 'normal' or 'uniform', got {start!r}")
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)

    def loss_fn(logits):
        return F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum")

    def draw(x, e):
        if start == "uniform":
            return _random_start(x, e, norm)
        return 0.001 * torch.randn_like(x)

    return _run(model, x, eps, loss_fn, norm=norm, steps=steps, step_ratio=step_ratio, start=draw)
