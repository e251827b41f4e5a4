"""PGD robustness per row: pure PyTorch, no Ray, no files.

PGD uses step size 2.5·ε/k (Madry et al. 2018, arXiv:1706.06083) with a random start per
restart; a row is robust only if it is classified correctly and no restart fools the model.
Row i's start in restart r comes from (seed, row_offset + i, r) alone, so a chunked or
distributed evaluation gives every row the start a single pass would: the counts do not depend
on chunking, batch size or what ran before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from puma_ray.attacks.pgd import pgd


def pgd_robust_rows(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 20,
    restarts: int = 1,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    row_offset: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, robust) bool [N] of `model` (put in eval mode) on x [N, C, H, W] in [0, 1],
    y [N]; eps in [0, 1] pixel units. `row_offset`: the index of x[0] among the rows of the
    whole evaluation (the seeds are per row of it). `progress(n)` after every n rows."""
    model.eval()
    correct = torch.zeros(len(x), dtype=torch.bool)
    robust = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        still = ok.clone()
        for r in range(restarts):
            idx = still.nonzero().flatten()
            if len(idx) == 0:
                break
            rows = (idx.cpu() + row_offset + i).to(torch.int64)
            adv = pgd(
                model,
                xb[idx],
                yb[idx],
                eps,
                norm=norm,
                steps=steps,
                step_ratio=2.5 / steps,
                row_seeds=(seed * 1_000_003 + rows) * 64 + r,
            )
            with torch.no_grad():
                still[idx] = model(adv).argmax(1) == yb[idx]
        correct[i : i + len(xb)] = ok.cpu()
        robust[i : i + len(xb)] = still.cpu()
        if progress is not None:
            progress(len(xb))
    return correct, robust


def robust_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    **kwargs,
) -> tuple[float, float]:
    """(clean accuracy, PGD robust accuracy) of `model` on x, y; arguments as
    `pgd_robust_rows`. Robust accuracy is never above clean accuracy."""
    correct, robust = pgd_robust_rows(model, x, y, eps, **kwargs)
    n = max(1, len(x))
    return int(correct.sum()) / n, int(robust.sum()) / n
