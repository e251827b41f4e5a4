"""Batched multiclass DeepFool: the per-sample margin PUMA ranks and prunes by.

Moosavi-Dezfooli, Fawzi and Frossard, "DeepFool: a simple and accurate method to fool deep
neural networks", CVPR 2016, arXiv:1511.04599 (Alg. 2; the l-inf step is eqs. 13-14). The
iteration follows the authors' reference code (LTS4/DeepFool): the running total `r_tot` is kept
unclipped, the overshoot is applied to it at every check, x_i = x + (1 + overshoot) * r_tot, and
`STEP_EPS` is added to each step length.

How it spends compute (all measured on 2 CPU cores; see benchmarks/deepfool.py and
docs/benchmarks.md):
- Every sample of the batch moves together, and a sample leaves the batch the moment it flips,
  so finished samples cost nothing.
- Each iterate is first checked for a flip with one forward pass under `torch.inference_mode`;
  only samples still in their class then get one grad-enabled forward and one backward per
  candidate class other than the label (retain_graph), all from that single forward.
- A backward of the batch-summed logit difference sum_i (f_k(x_i) - f_y(x_i)) gives every
  sample's own gradient, because in eval mode samples do not interact. One step's 9 class
  gradients of 256 samples on the PGD-AT small_cnn: 0.56 s this way (in 64-row chunks on
  channels_last input), 0.61 s on contiguous input, 0.91 s in one 256-row pass, 1.34 s as one
  `is_grads_batched=True` backward, 2.47 s with torch.func `vmap(jacrev)`.
- So on CPU the gradient passes run in chunks of CPU_GRAD_BATCH rows (cache-sized; ~1.3x
  faster end to end than one 256-row pass), and iterates are kept channels_last (~1.25x
  faster end to end: 7.3 against 9.1 ms/sample, margins equal to ~1e-6 relative). Neither is
  measured on a GPU (none on the benchmark machine); there the active set goes in one pass,
  and channels_last is PyTorch's advice for conv nets under AMP.
- torch.compile (inductor, dynamic shapes; retain_graph needs
  torch._functorch.config.donated_buffer = False) ran 6.6 against 5.7 ms/sample eager after
  a 15 s compile, so it is not used; a caller may still pass a compiled model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# Added to every step length, as in the reference code ("added 1e-4 for numerical stability").
# Without it an affine model stops exactly on its boundary (a tie, no flip) and every later
# step has length 0. It is in input units (pixels in [0, 1]): each step goes 1e-4 (in the
# chosen norm) past the linearised boundary, which adds at most (1 + overshoot) * 1e-4 * iters
# to a margin; on an affine model the margin is exactly (1 + overshoot) * (distance + 1e-4).
STEP_EPS = 1e-4

# Rows per gradient pass on CPU. The K-1 backward passes re-read the forward's saved
# activations; in chunks of 64 these stay in cache. On small_cnn (2 cores) one step's class
# gradients cost 2.8 ms/sample in chunks of 48-64 against 3.6 at 96 and 5.4 at 256.
CPU_GRAD_BATCH = 64

Norm = Literal["l2", "linf"]
Target = Literal["true", "predicted"]


@dataclass
class DeepFoolResult:
    """Per-sample DeepFool outcome; every field is indexed like the input batch.

    margin:       float32 [N], norm of the final perturbation in the chosen norm. 0 for samples
                  already misclassified (w.r.t. the target label). Where `converged` is
                  False it is the norm reached after max_iter steps without leaving the
                  class: read it as a lower bound, never as a margin.
    adv_class:    int64 [N], the model's prediction at x + perturbation (the clean prediction
                  for already-misclassified samples, the target label if not converged).
    pred:         int64 [N], the model's prediction on the clean input.
    iters:        int64 [N], gradient steps taken (0 for already-misclassified samples).
    converged:    bool [N], the sample left the target class within max_iter steps.
    perturbation: [N, C, H, W] in the accumulation dtype (float32, or float64 for float64
                  input), only when asked for; x + perturbation is the adversarial input.
    """

    margin: torch.Tensor
    adv_class: torch.Tensor
    pred: torch.Tensor
    iters: torch.Tensor
    converged: torch.Tensor
    perturbation: torch.Tensor | None = None


def deepfool(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: Norm = "l2",
    overshoot: float = 0.02,
    max_iter: int = 50,
    candidates: int | None = None,
    clip: bool = False,
    target: Target = "true",
    return_perturbation: bool = False,
    autocast_dtype: torch.dtype | None = None,
    grad_batch: int | None = None,
) -> DeepFoolResult:
    """Per-sample DeepFool margins (the distance to the nearest decision boundary) of a batch.

    Arguments:
        model: maps [N, C, H, W] pixels to [N, K] logits; used in the mode it is in (the caller
            sets eval(): in train mode BatchNorm mixes samples and margins become wrong).
            Its parameters are not touched; gradients are taken w.r.t. the input only.
        images: [N, C, H, W] float pixels in [0, 1].
        labels: [N] integer class labels in [0, K).
        norm: "l2" (Alg. 2) or "linf" (eqs. 13-14: ratio |f'|/||w'||_1, step along sign(w')).
        overshoot: eta; iterates are x + (1 + eta) * r_tot, and the margin includes the factor.
        max_iter: gradient steps per sample before giving up (then converged is False).
        candidates: None for all K classes (exact), or k >= 2: the target label and the k-1
            classes with the highest clean logits (the reference code's approximation for
            many classes). k >= K is exactly the same as None.
        clip: keep iterates in the [0, 1] image box (r_tot itself stays unclipped).
        target: "true" measures the margin of the true label (a misclassified sample has
            margin 0); "predicted" that of the clean prediction, as public implementations do.
        return_perturbation: also return the final perturbations (N x image memory).
        autocast_dtype: e.g. torch.bfloat16 to run the model under autocast (meant for GPUs);
            logits, gradients and r_tot stay float32.
        grad_batch: rows per gradient pass; the active set is split into chunks of this size.
            None: CPU_GRAD_BATCH on CPU, the whole active set on other devices. Results do
            not depend on it (the math is per sample).

    Returns a DeepFoolResult. Example:
        model.eval()
        margins = deepfool(model, images, labels, norm="linf").margin
    """
    _check_args(images, labels, norm, overshoot, max_iter, candidates, target, grad_batch)
    device = images.device
    acc_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    # channels_last: ~1.25x faster end to end on CPU for small_cnn (the conv backward passes).
    x0 = images.detach().to(acc_dtype).contiguous(memory_format=torch.channels_last)
    labels = labels.detach().to(device=device, dtype=torch.long)
    n = len(x0)
    if n == 0:
        return _empty_result(x0, return_perturbation)
    autocast = _autocast(device, autocast_dtype)
    scale = 1.0 + overshoot
    if grad_batch is None:
        grad_batch = CPU_GRAD_BATCH if device.type == "cpu" else n

    def iterate(x: torch.Tensor, r_tot: torch.Tensor) -> torch.Tensor:
        x_adv = x + scale * r_tot
        return x_adv.clamp_(0.0, 1.0) if clip else x_adv

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(x).argmax(1)

    with torch.inference_mode(), autocast:
        clean_logits = _widen(model(x0))
    _check_logits(clean_logits, labels)
    pred = clean_logits.argmax(1)
    label = labels if target == "true" else pred
    others = _other_classes(clean_logits, label, candidates)

    r_tot = torch.zeros_like(x0)
    iters = torch.zeros(n, dtype=torch.long, device=device)
    converged = pred != label
    adv_class = pred.clone()
    active = torch.nonzero(~converged).squeeze(1)
    x_adv = x0[active]  # r_tot is 0, and the clean forward was this iterate's flip check

    for _ in range(max_iter):
        if len(active) == 0:
            break
        chunks = [t.split(grad_batch) for t in (x_adv, label[active], others[active])]
        steps = [_step(model, *chunk, norm, autocast) for chunk in zip(*chunks, strict=True)]
        r_tot[active] += torch.cat(steps)
        iters[active] += 1
        x_adv = iterate(x0[active], r_tot[active])
        now = predict(x_adv)
        flipped = now != label[active]
        done = active[flipped]
        adv_class[done] = now[flipped]
        converged[done] = True
        active, x_adv = active[~flipped], x_adv[~flipped]

    perturbation = (iterate(x0, r_tot) - x0 if clip else scale * r_tot).contiguous()
    flat = perturbation.flatten(1)
    margin = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return DeepFoolResult(
        margin=margin.float(),
        adv_class=adv_class,
        pred=pred,
        iters=iters,
        converged=converged,
        perturbation=perturbation if return_perturbation else None,
    )


def _step(
    model: nn.Module,
    x: torch.Tensor,
    label: torch.Tensor,
    others: torch.Tensor,
    norm: Norm,
    autocast,
) -> torch.Tensor:
    """One DeepFool step r_i [n, C, H, W] at iterates x, none of which has left its class.

    For each candidate k != y: f'_k = f_k - f_y and w'_k = grad(f_k - f_y); pick the class with
    the smallest |f'_k| / ||w'_k||_dual (dual of l2 is l2, of l-inf is l1) and step just past
    its linearised boundary. The argmin is kept streaming, so only one gradient per sample
    is held at a time.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), autocast:
        logits = _widen(model(x))
    n, k_others = others.shape
    f_diff = (logits.gather(1, others) - logits.gather(1, label[:, None])).detach()
    rows = torch.arange(n, device=x.device)
    best_ratio = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    best_w = torch.zeros_like(x)
    best_w_norm = torch.ones(n, dtype=x.dtype, device=x.device)
    for j in range(k_others):
        # d/dx of sum_i (f_{k_ij}(x_i) - f_{y_i}(x_i)) = per-sample gradients (no BN mixing).
        grad_out = torch.zeros_like(logits)
        grad_out[rows, others[:, j]] = 1.0
        grad_out[rows, label] = -1.0
        (w,) = torch.autograd.grad(logits, x, grad_out, retain_graph=j + 1 < k_others)
        w_flat = w.flatten(1)
        w_norm = w_flat.norm(dim=1) if norm == "l2" else w_flat.abs().sum(dim=1)
        ratio = f_diff[:, j].abs().to(x.dtype) / w_norm
        # A zero gradient gives no direction to this boundary (ratio inf, never picked).
        ratio = torch.where(w_norm > 0, ratio, torch.inf)
        better = ratio < best_ratio  # strict: the first candidate wins ties, as in the paper
        best_ratio = torch.where(better, ratio, best_ratio)
        best_w_norm = torch.where(better, w_norm, best_w_norm)
        best_w = torch.where(better.view(-1, *(1,) * (x.dim() - 1)), w, best_w)
    length = best_ratio + STEP_EPS
    # No usable direction at all (every gradient zero): take no step, the sample stays put.
    length = torch.where(torch.isfinite(best_ratio), length, 0.0).view(-1, *(1,) * (x.dim() - 1))
    if norm == "l2":
        return length * best_w / best_w_norm.view_as(length)
    return length * best_w.sign()


def _other_classes(logits: torch.Tensor, label: torch.Tensor, candidates: int | None):
    """[N, k-1] candidate classes other than the label, in ascending class order (so k = K
    reproduces the all-classes result exactly, ties included)."""
    n, num_classes = logits.shape
    if candidates is None or candidates >= num_classes:
        classes = torch.arange(num_classes, device=logits.device).expand(n, num_classes)
        return classes[classes != label[:, None]].view(n, num_classes - 1)
    scores = logits.nan_to_num(nan=-torch.inf)
    scores[torch.arange(n, device=logits.device), label] = -torch.inf
    # topk picks the k-1 highest other classes; ascending order matches the exact path's
    top = scores.topk(candidates - 1, dim=1, sorted=False).indices
    return top.sort(dim=1).values


def _widen(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) to float32; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _empty_result(x0: torch.Tensor, return_perturbation: bool) -> DeepFoolResult:
    long = torch.zeros(0, dtype=torch.long, device=x0.device)
    return DeepFoolResult(
        margin=torch.zeros(0, device=x0.device),
        adv_class=long,
        pred=long.clone(),
        iters=long.clone(),
        converged=torch.zeros(0, dtype=torch.bool, device=x0.device),
        perturbation=torch.zeros_like(x0) if return_perturbation else None,
    )


def _check_args(images, labels, norm, overshoot, max_iter, candidates, target, grad_batch):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D NCHW tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point pixels in [0, 1], got {images.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor of class indices, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if len(labels) != len(images):
        raise ValueError(f"labels must have one entry per image: {len(labels)} for {len(images)}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if target not in ("true", "predicted"):
        raise ValueError(f"target must be 'true' or 'predicted', got {target!r}")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if candidates is not None and (
        isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2
    ):
        raise ValueError(
            f"candidates must be None (all classes) or an integer >= 2 (the target label and "
            f"at least one other class), got {candidates!r}"
        )
    if grad_batch is not None and (
        isinstance(grad_batch, bool) or not isinstance(grad_batch, int) or grad_batch < 1
    ):
        raise ValueError(f"grad_batch must be None or a positive integer, got {grad_batch!r}")


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"model must return [N, K] logits with K >= 2, got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"labels must be in [0, {num_classes}) for a {num_classes}-class model: "
            f"labels[{first}] = {int(labels[first])}"
        )
