"""Batched multiclass DeepFool: the per-sample margin PUMA ranks and prunes by.

Moosavi-Dezfooli, Fawzi and Frossard, "DeepFool: a simple and accurate method to fool deep
neural networks", CVPR 2016, arXiv:1511.04599 (Alg. 2; the l-inf step is eqs. 13-14). The
iteration follows the authors' reference code (LTS4/DeepFool): the running total `r_tot` is kept
unclipped, the overshoot is applied to it at every check, x_i = x + (1 + overshoot) * r_tot, and
`STEP_EPS` is added to each step length.

Signed margins (`signed=True`, target "true"): a sample the model already misclassifies gets
minus the distance back into its true class y instead of 0, so the margin order stays
meaningful below zero (PUMA, Maroto and Frossard, arXiv:2405.06298, acts exactly on the lowest
margins). That distance comes from a targeted DeepFool toward y: at each iterate, linearise and
cross the one boundary between y and the class c winning there (f' = f_c - f_y > 0, w =
grad(f_y - f_c); l2 step (f'/||w||_2 + STEP_EPS) w/||w||_2, l-inf (f'/||w||_1 + STEP_EPS)
sign(w)) until y wins, with the same overshoot, max_iter, chunking, active set, autocast and clip
conventions. Exact in one step on an affine model where only c beats y and the nearest point of
that boundary is in y's region; otherwise greedy (it can cross several boundaries in turn):
on random affine models the returned point is in y's region at 1.03x (l2) / 1.09x (l-inf) the
exact distance in the median, 1.7x / 3.3x at worst over 4,800 samples (measured against a
convex program, as in tests/test_deepfool_signed.py). Cost: after the unsigned pass, those
rows repeat their clean forward, then take one forward and one backward per step (one class
pair), against K-1 backward passes per step for the others.

The floor for exact DeepFool over K classes is one forward pass and K-1 vector-Jacobian
products (one input-gradient backward per class other than the label) per sample and step.
How this engine gets there (measured on 2 CPU cores; benchmarks/deepfool.py, docs/benchmarks.md):
- Every sample of the batch moves together, and a sample leaves the batch the moment it flips,
  so finished samples cost nothing.
- One forward per iterate serves both the flip check and the step: it runs with gradients
  enabled, its logits say which samples flipped, and the K-1 backward passes reuse its graph
  (retain_graph) for the samples still in their class. When too many samples of a chunk
  flipped for the wasted backward rows to pay off (flipped x (K-1) > still active), the
  graph is dropped and the survivors are re-packed into fresh chunks and forwarded again.
  The clean forward is the first iterate's.
- A backward of the batch-summed logit difference sum_i (f_k(x_i) - f_y(x_i)) gives every
  sample's own gradient, because in eval mode samples do not interact.
- Eval-mode batch norm runs as one multiply-add (`fold_batchnorm`), whose input gradient is
  one multiply: 6-22% less time per step on a 4-conv BN CNN than torch's batch-norm backward.
- On CPU the passes run in chunks of CPU_GRAD_BATCH rows (cache-sized; ~1.3x faster end to
  end than one 256-row pass on small_cnn), and iterates are kept channels_last (~1.25x: 7.3
  against 9.1 ms/sample). One step's 9 class gradients of 256 samples on the PGD-AT
  small_cnn: 0.56 s this way, 0.61 s on contiguous input, 0.91 s in one 256-row pass, 1.34 s
  as one `is_grads_batched=True` backward, 2.47 s with torch.func `vmap(jacrev)`. On a GPU
  the active set goes in one pass (not yet measured there).
- `class_grads="batched"` (one `is_grads_batched=True` backward for all classes) is also 1.6x
  slower per step on CPU on a 4-conv CNN: under vmap torch still runs the conv and max-pool
  backward once per class. It stays an option for GPUs.
- torch.compile (inductor, dynamic shapes; retain_graph needs
  torch._functorch.config.donated_buffer = False) ran 6.6 against 5.7 ms/sample eager after
  a 15 s compile on small_cnn, so it is not used here; a caller may pass a compiled model.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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
ClassGrads = Literal["loop", "batched"]


@dataclass
class DeepFoolResult:
    """Per-sample DeepFool outcome; every field is indexed like the input batch.

    margin:       float32 [N], norm of the final perturbation in the chosen norm. For samples
                  already misclassified (w.r.t. the target label): 0, or with signed=True
                  minus the norm of the perturbation that brings them back into the label's
                  class (-0.0 where the model gives no gradient at all). Where `converged` is
                  False it is the norm reached after max_iter steps without crossing: read
                  its magnitude as a lower bound, never as a margin.
    adv_class:    int64 [N], the model's prediction at x + perturbation (the clean prediction
                  for already-misclassified samples, signed or not: the class they left;
                  the target label if not converged; under autocast possibly a class whose
                  logit ties with the label's).
    pred:         int64 [N], the model's prediction on the clean input.
    iters:        int64 [N], gradient steps taken (for already-misclassified samples 0, or
                  with signed=True the steps back into the label's class).
    converged:    bool [N], the sample left the target class (signed misclassified samples:
                  reached it) within max_iter steps.
    perturbation: [N, C, H, W] in the accumulation dtype (float32, or float64 for float64
                  input), only when asked for; x + perturbation is the adversarial input
                  (signed misclassified samples: the point back in the label's class).
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
    fold_batchnorm: bool = True,
    class_grads: ClassGrads = "loop",
    signed: bool = False,
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
            margin 0, or negative with signed=True); "predicted" that of the clean
            prediction, as public implementations do.
        return_perturbation: also return the final perturbations (N x image memory).
        autocast_dtype: e.g. torch.bfloat16 to run the model under autocast (meant for GPUs;
            also runs under CPU autocast); logits, gradients and r_tot stay float32. The
            logits are only as fine as the half-precision layer that made them, so from the
            first step on a tie between the label's logit and another's counts as leaving
            the class (else such samples stall until max_iter).
        grad_batch: most rows per forward/backward pass; the active set is split into as few
            chunks as that allows, of even size. None: CPU_GRAD_BATCH on CPU, the whole
            active set on other devices.
            Results do not depend on it (the math is per sample) beyond float rounding.
        fold_batchnorm: run eval-mode batch norm (F.batch_norm with running statistics) as
            x * scale + shift, scale = weight / sqrt(running_var + eps), shift = bias -
            running_mean * scale: the same function up to float rounding, with a one-multiply
            input gradient. Applies only where the input has the statistics' dtype (not to
            bf16 activations under autocast, which keep the native kernel).
        class_grads: "loop" (one backward per class from one forward, retain_graph) or
            "batched" (one `is_grads_batched=True` backward for all classes, K-1 times the
            backward memory; slower on CPU, to be measured on GPUs). Same results.
        signed: with target "true", a misclassified sample's margin is minus its distance back
            into the true class (module docstring) instead of 0; correctly classified samples
            get bit for bit the unsigned result. With target "predicted" a no-op: no sample
            is misclassified w.r.t. its own prediction. The walk back always considers all
            classes (`candidates` and `class_grads` apply to the unsigned rows: it needs one
            class pair per step).

    Returns a DeepFoolResult. Example:
        model.eval()
        margins = deepfool(model, images, labels, norm="linf").margin
    """
    _check_args(
        images, labels, norm, overshoot, max_iter, candidates, target, grad_batch, class_grads
    )
    device = images.device
    acc_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    # channels_last: ~1.25x faster end to end on CPU for small_cnn (the conv backward passes).
    x0 = images.detach().to(acc_dtype).contiguous(memory_format=torch.channels_last)
    labels = labels.detach().to(device=device, dtype=torch.long)
    n = len(x0)
    if n == 0:
        return _empty_result(x0, return_perturbation)
    if grad_batch is None:
        grad_batch = CPU_GRAD_BATCH if device.type == "cpu" else n
    autocast = _autocast(device, autocast_dtype)
    fold = _FoldedBatchNorm() if fold_batchnorm else contextlib.nullcontext()
    scale = 1.0 + overshoot

    def forward(x: torch.Tensor, grad: bool):
        """Widened logits at x; with grad, also the leaf x they were taken from."""
        if not grad:
            with torch.inference_mode(), autocast, fold:
                return None, _widen(model(x))
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with torch.enable_grad(), autocast, fold:
            return x, _widen(model(x))

    pred = torch.empty(n, dtype=torch.long, device=device)
    label = labels if target == "true" else pred
    others: torch.Tensor | None = None
    r_tot = torch.zeros_like(x0)
    iters = torch.zeros(n, dtype=torch.long, device=device)
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    adv_class = torch.empty(n, dtype=torch.long, device=device)

    def walk(idx: torch.Tensor, toward: bool) -> None:
        """Iterate the rows idx from their clean images until they cross: out of the label's
        class (toward=False; its first forward is the clean one of all rows and fills pred and
        others), or into it (toward=True, the misclassified rows of a signed run; their clean
        forward is repeated and not checked: they are known to be outside). Writes r_tot,
        iters, converged and, for toward=False, adv_class."""
        nonlocal others
        # The active (not yet crossed) samples, compacted: batch index, x0, r_tot.
        xa = x0[idx] if toward else x0
        ra = torch.zeros_like(xa)
        x_it = xa  # r_tot is 0: the first iterate is the clean image
        for t in range(max_iter + 1):
            if len(idx) == 0:
                break
            last = t == max_iter  # only the crossing check of the last iterate
            now = None if toward else torch.empty(len(idx), dtype=torch.long, device=device)
            moving = torch.empty(len(idx), dtype=torch.bool, device=device)
            step = None if last else torch.zeros_like(x_it)
            refresh = []
            size = _even_chunk(len(idx), grad_batch)
            for start in range(0, len(idx), size):
                rows = slice(start, start + size)
                graph = forward(x_it[rows], grad=not last)
                logits = graph[1]
                if toward:
                    stays = _outside(logits, label[idx[rows]], t, autocast_dtype is not None)
                else:
                    if t == 0 and start == 0:
                        _check_logits(logits, labels)
                    if t > 0 and autocast_dtype is not None:
                        now[rows] = _leading_class(logits, label[idx[rows]])
                    else:
                        now[rows] = logits.argmax(1)
                    if t == 0:  # the clean forward: predictions, target labels, candidates
                        pred[rows] = now[rows]
                        chunk_others = _other_classes(logits.detach(), label[rows], candidates)
                        if others is None:
                            others = labels.new_empty(n, chunk_others.shape[1])
                        others[rows] = chunk_others
                    stays = now[rows] == label[idx[rows]]
                moving[rows] = stays
                if last:
                    continue
                kept = int(stays.sum())
                if kept == 0:
                    continue
                # Reuse this forward's graph unless its backward rows would be mostly wasted on
                # crossed samples: (K-1) backward rows per crossing (1 toward) against one
                # forward per survivor.
                per_row = 1 if toward else others.shape[1]
                if (len(stays) - kept) * per_row <= kept:
                    step[rows] = steps_at(None, graph, idx[rows], toward)
                else:
                    refresh.append(torch.nonzero(stays).squeeze(1) + start)
                del graph, logits
            if refresh:
                redo = torch.cat(refresh)
                for chunk in redo.split(_even_chunk(len(redo), grad_batch)):
                    step[chunk] = steps_at(x_it[chunk], None, idx[chunk], toward)

            crossed = ~moving
            done = idx[crossed]
            if not toward:
                adv_class[done] = now[crossed]
            converged[done] = True
            r_tot[done] = ra[crossed]
            idx, xa, ra = idx[moving], xa[moving], ra[moving]
            if last:
                break
            ra += step[moving]
            iters[idx] += 1
            x_it = xa + scale * ra
            if clip:
                x_it.clamp_(0.0, 1.0)
        if len(idx):  # max_iter steps without crossing: the norm reached, not a margin
            r_tot[idx] = ra
            if not toward:
                adv_class[idx] = label[idx]

    def steps_at(x: torch.Tensor | None, graph, rows: torch.Tensor, toward: bool):
        """Step of the batch rows `rows` (the chunk x, or the (leaf, logits) graph of a forward
        at x). Away: the DeepFool step over the candidate classes. Toward: across the one
        boundary between the label y and the class c now winning, w = grad(f_y - f_c): the
        negated one-candidate step (one backward)."""
        xg, logits = graph if graph is not None else forward(x, grad=True)
        y = label[rows]
        if not toward:
            return _class_step(logits, xg, y, others[rows], norm, class_grads)
        winner = logits.detach().scatter(1, y[:, None], -torch.inf).argmax(1, keepdim=True)
        return -_class_step(logits, xg, y, winner, norm, "loop")

    walk(torch.arange(n, device=device), toward=False)
    # Misclassified rows crossed at the clean forward (margin 0, iters 0); signed, they walk
    # back into their class and their margin is minus that distance.
    back = torch.nonzero(pred != label).squeeze(1) if signed and target == "true" else None
    if back is not None and len(back):
        converged[back] = False
        walk(back, toward=True)

    perturbation = _iterate(x0, r_tot, scale, clip) - x0 if clip else scale * r_tot
    perturbation = perturbation.contiguous()
    flat = perturbation.flatten(1)
    margin = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    if back is not None:
        margin[back] = -margin[back]
    return DeepFoolResult(
        margin=margin.float(),
        adv_class=adv_class,
        pred=pred,
        iters=iters,
        converged=converged,
        perturbation=perturbation if return_perturbation else None,
    )


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model for scoring, every conv -> batch-norm pair folded into one
    conv (weight * scale, bias * scale + shift; torch.fx dataflow, so only where the conv's
    output feeds nothing but the batch norm).

    The same function up to float rounding (margins agree to ~1e-4 relative in float32; a
    sample on the edge of a flip may take one step more or fewer), and DeepFool's backward
    passes skip one elementwise pass per folded layer. Pre-activation blocks (batch norm after
    an addition) keep theirs, which `deepfool(fold_batchnorm=True)` still handles.

    Arguments:
        model: in eval mode; its parameters are copied, not shared, so load it once and fold
            once (a scoring actor), not per batch.

    Returns a torch.fx.GraphModule with the model's forward only (no forward_features, no
    hooks of the original), or the model itself where torch.fx cannot trace it.
    """
    from torch.fx.experimental.optimization import fuse

    if model.training:
        raise ValueError("fuse_conv_bn needs a model in eval mode (call model.eval() first)")
    try:
        return fuse(model)  # deep-copies the model
    except Exception:  # not symbolically traceable (data-dependent control flow, ...)
        return model


def _leading_class(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The prediction, except that a tie with the label goes to the other class.

    Used under autocast, where logits come out of a half-precision layer: bf16 keeps 8
    significant bits, so near a boundary the label and its rival often round to the same
    logit, argmax keeps the lower class index, and a sample whose label is the lower index
    would stall there until max_iter (each step then has length STEP_EPS). Within the
    arithmetic's resolution a tie is the boundary, so it counts as leaving the class.
    """
    rivals = logits.scatter(1, label[:, None], -torch.inf)
    rival = rivals.argmax(1)
    leaves = rivals.gather(1, rival[:, None]) >= logits.gather(1, label[:, None])
    return torch.where(leaves.squeeze(1), rival, label)


def _outside(logits: torch.Tensor, label: torch.Tensor, t: int, autocast: bool) -> torch.Tensor:
    """bool [n]: a row walking back into its label's class is still outside it.

    Iterate 0 is the clean image, which the clean forward already found outside (it is not
    checked again: a repeated forward may round differently). Under autocast a tie between the
    label's logit and the best rival's counts as inside, the mirror of `_leading_class`: a tie
    is the boundary, so in either direction it counts as having crossed. With argmax instead
    (ties to the lower class index), 9 of 60 misclassified rows of a bf16 test net stalled
    until max_iter in l2 (tests/test_deepfool_signed.py's bf16 case).
    """
    if t == 0:
        return torch.ones_like(label, dtype=torch.bool)
    if not autocast:
        return logits.argmax(1) != label
    rival = logits.scatter(1, label[:, None], -torch.inf).amax(1)
    return logits.gather(1, label[:, None]).squeeze(1) < rival


def _even_chunk(rows: int, most: int) -> int:
    """Rows per chunk: as few chunks of at most `most` rows as needed, of even size (96 rows in
    64-row chunks go as 48 + 48, not 64 + 32; 65 as 33 + 32, not 64 + 1)."""
    chunks = -(-rows // most)
    return -(-rows // chunks)


def _iterate(x: torch.Tensor, r_tot: torch.Tensor, scale: float, clip: bool) -> torch.Tensor:
    x_adv = x + scale * r_tot
    return x_adv.clamp_(0.0, 1.0) if clip else x_adv


def _class_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    label: torch.Tensor,
    others: torch.Tensor,
    norm: Norm,
    class_grads: ClassGrads,
) -> torch.Tensor:
    """One DeepFool step r_i [n, C, H, W] from a forward's graph (leaf x, logits [n, K]).

    For each candidate k != y: f'_k = f_k - f_y and w'_k = grad(f_k - f_y); pick the class with
    the smallest |f'_k| / ||w'_k||_dual (dual of l2 is l2, of l-inf is l1; the first candidate
    wins ties, as in the paper) and step just past its linearised boundary. In the "loop" mode
    the argmin is kept streaming, so only one gradient per sample is held at a time. The graph
    is freed on return.
    """
    n, k_others = others.shape
    rows = torch.arange(n, device=x.device)
    f_diff = (logits.gather(1, others) - logits.gather(1, label[:, None])).detach()
    f_diff = f_diff.abs().to(x.dtype)
    # Cotangent j is +1 at class others[:, j] and -1 at the label, per row: d/dx of
    # sum_i (f_{k_ij}(x_i) - f_{y_i}(x_i)) is every sample's own gradient (no BN mixing).
    grad_out = logits.new_zeros(k_others, n, logits.shape[1])
    grad_out.scatter_(2, others.T.unsqueeze(2), 1.0)
    grad_out[:, rows, label] = -1.0
    view = (-1, *(1,) * (x.dim() - 1))

    def dual_norm(w: torch.Tensor) -> torch.Tensor:
        """Per-sample dual norm over the last 3 (image) dims, strides as they come."""
        return torch.linalg.vector_norm(w, 2 if norm == "l2" else 1, dim=(-3, -2, -1))

    if class_grads == "batched":
        (w_all,) = torch.autograd.grad(logits, x, grad_out, is_grads_batched=True)
        w_norms = dual_norm(w_all)  # [k-1, n]
        # A zero gradient gives no direction to this boundary (ratio inf, never picked).
        ratios = torch.where(w_norms > 0, f_diff.T / w_norms, torch.inf)
        best_ratio, best = ratios.min(dim=0)  # the first minimum: ties go to the first class
        best_w = w_all[best, rows]
        best_w_norm = w_norms[best, rows]
    else:
        best_ratio = torch.full((n,), torch.inf, dtype=x.dtype, device=x.device)
        best_w = torch.zeros_like(x)
        best_w_norm = torch.ones(n, dtype=x.dtype, device=x.device)
        for j in range(k_others):
            (w,) = torch.autograd.grad(logits, x, grad_out[j], retain_graph=j + 1 < k_others)
            w_norm = dual_norm(w)
            ratio = torch.where(w_norm > 0, f_diff[:, j] / w_norm, torch.inf)
            better = ratio < best_ratio  # strict: the first candidate wins ties
            best_ratio = torch.where(better, ratio, best_ratio)
            best_w_norm = torch.where(better, w_norm, best_w_norm)
            best_w = torch.where(better.view(view), w, best_w)
    length = best_ratio + STEP_EPS
    # No usable direction at all (every gradient zero): take no step, the sample stays put.
    length = torch.where(torch.isfinite(best_ratio), length, 0.0).view(view)
    if norm == "l2":
        return length * best_w / best_w_norm.view(view)
    return length * best_w.sign()


class _FoldedBatchNorm(TorchFunctionMode):
    """Eval-mode F.batch_norm as addcmul(shift, x, scale) with per-channel scale and shift.

    Same function to float rounding; the input gradient is grad * scale, one multiply that
    reads no saved activation. Calls in training mode, without running statistics, or whose
    input dtype differs from the statistics' (bf16 activations under autocast) go to torch.
    scale and shift are computed once per module and call of deepfool (the model is not
    changed in between).
    """

    _signature = inspect.signature(F.batch_norm)

    def __init__(self):
        super().__init__()
        self._folded: dict[tuple, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = self._signature.bind(*args, **kwargs).arguments
            x, mean, var = a["input"], a.get("running_mean"), a.get("running_var")
            if (
                not a.get("training", False)
                and mean is not None
                and var is not None
                and x.dim() >= 2
                and x.dtype == var.dtype == mean.dtype
            ):
                scale, shift = self._affine(
                    mean, var, a.get("weight"), a.get("bias"), a.get("eps", 1e-5)
                )
                shape = (1, -1, *(1,) * (x.dim() - 2))
                return torch.addcmul(shift.view(shape), x, scale.view(shape))
        return func(*args, **kwargs)

    def _affine(self, mean, var, weight, bias, eps):
        key = (id(mean), id(var), id(weight), id(bias), eps)
        if key not in self._folded:
            # Plain (non-inference) constants, whether first met under inference_mode or not.
            with torch.inference_mode(False), torch.no_grad():
                scale = torch.rsqrt(var + eps)
                if weight is not None:
                    scale = scale * weight.to(var.dtype)
                shift = -mean * scale
                if bias is not None:
                    shift = shift + bias.to(var.dtype)
            # The tensors are kept with the result, so their ids cannot be reused meanwhile.
            self._folded[key] = (scale, shift, (mean, var, weight, bias))
        return self._folded[key][:2]


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


def _check_args(
    images, labels, norm, overshoot, max_iter, candidates, target, grad_batch, class_grads
):
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
    if class_grads not in ("loop", "batched"):
        raise ValueError(f"class_grads must be 'loop' or 'batched', got {class_grads!r}")


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
