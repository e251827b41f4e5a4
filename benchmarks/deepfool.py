"""DeepFool side by side: ours, torchattacks and foolbox, in one process, on the same inputs.

Two cases (--case):
- builtin: small_cnn on the builtin data, (a) after brief standard training and (b) fine-tuned
  with l-inf PGD adversarial training (Madry et al., arXiv:1706.06083; eps 8/255). Trained
  weights are cached in bench_out/ (delete them, or pass --retrain, to train again). DeepFool
  needs few steps here (mean 1.4-2.7), so early exits and the shrinking active set do most of
  the work.
- multi-iter: a randomly initialised 4-conv CNN (64-128-128-256 channels, BN, ReLU) on
  uniform-noise images, where every sample needs 4-6 steps (mean >= 4): the per-step cost
  decides. Ours against foolbox, best of --repeats, plus ours without `fold_batchnorm`, with
  `class_grads="batched"`, and on `fuse_conv_bn(model)`.

Settings shared by all implementations: l2, overshoot 0.02, max_iter (steps) 50, all 10 classes.
- foolbox `L2DeepFoolAttack(candidates=10)` clips every iterate to [0, 1] and attacks the clean
  prediction, so it is compared with ours at clip=True, target="predicted".
- torchattacks `DeepFool` attacks the given (true) label and clamps every step; it walks the
  batch one sample at a time and is slow, so it runs on the first --n-torchattacks samples only,
  compared with ours at clip=True, target="true" on those same samples. Its iterations are
  counted per sample with a forward hook.
- Ours is also timed at its defaults (true label, no clipping) and with the top-3 candidate
  approximation (its margin error and rank correlation against exact ours).
Cost in passes = (s/sample) / (mean iters x t_pass), with t_pass the time of one forward +
input-gradient pass per sample at the same batch size: what one step of one active sample
costs. For foolbox, iterations are its loops per batch (it never shrinks the batch). The floor
for exact all-class DeepFool is one forward and K-1 vector-Jacobian products per active sample
and step, (t_fwd + (K-1) t_vjp) / t_pass, with t_fwd and t_vjp measured at the same batch.
It also times ways to get one step's class gradients (see puma_ray/attacks/deepfool.py).

    python benchmarks/deepfool.py                      # both cases, ~7 min on 2 quiet cores
    python benchmarks/deepfool.py --case multi-iter    # ~2 min

Prints markdown tables and writes bench_out/deepfool.json (deepfool_multi_iter.json for
--case multi-iter alone). Results: docs/benchmarks.md, "DeepFool".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from puma_ray.attacks import deepfool, fuse_conv_bn
from puma_ray.attacks.deepfool import CPU_GRAD_BATCH
from puma_ray.config import BuiltinSource
from puma_ray.data.builtin import generate
from puma_ray.models import create_model

CONFIG = {
    "threads": 2,
    "data": {"train_rows": 4000, "seed": 0},  # builtin `train` part; scored rows are test rows
    "standard": {"epochs": 12, "batch": 128, "lr": 0.1},  # SGD+Nesterov, one-cycle schedule
    "robust": {  # PGD-AT fine-tuning of the standard model
        "epochs": 8, "batch": 128, "lr": 0.05, "eps": 8 / 255, "steps": 5, "step": 2.5 / 255,
    },
    "deepfool": {"norm": "l2", "overshoot": 0.02, "max_iter": 50, "classes": 10},
    "topk": 3,
    # --case multi-iter: random-init 4-conv CNN on uniform noise (every sample needs 4-6 steps)
    "multi_iter": {"rows": 96, "model_seed": 0, "data_seed": 1, "repeats": 3},
}


# ----------------------------------------------------------------------------------------------
# Data and models


def builtin_images(part: str, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = BuiltinSource(real_train=max(rows, 1), real_test=max(rows, 1), seed=seed)
    images, labels = generate(src, part, np.arange(rows))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return x, torch.from_numpy(labels)


def pgd_linf(model, x, y, eps, step, steps):
    """l-inf PGD with a random start (Madry et al.), model in eval mode."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def train(model, x, y, cfg, adversarial: bool, log) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    batches = (len(x) + cfg["batch"] - 1) // cfg["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["epochs"] * batches,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(cfg["epochs"]):
        start, correct = time.perf_counter(), 0
        for idx in torch.randperm(len(x), generator=gen).split(cfg["batch"]):
            xb, yb = x[idx], y[idx]
            if adversarial:
                model.eval()
                xb = pgd_linf(model, xb, yb, cfg["eps"], cfg["step"], cfg["steps"])
            model.train()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
        kind = "PGD-AT" if adversarial else "standard"
        log(f"  {kind} epoch {epoch + 1}: train acc {correct / len(x):.3f} "
            f"({time.perf_counter() - start:.0f} s)")
    model.eval()


def trained_models(out_dir: str, retrain: bool, log) -> dict[str, torch.nn.Module]:
    """(a) standard and (b) PGD-AT small_cnn, cached in out_dir keyed by CONFIG."""
    key = {k: CONFIG[k] for k in ("data", "standard", "robust")}
    path = os.path.join(out_dir, "deepfool_models.pt")
    models = {name: create_model("small_cnn", num_classes=10) for name in ("standard", "robust")}
    if not retrain and os.path.exists(path):
        cached = torch.load(path, weights_only=False)
        if cached["key"] == key:
            for name, model in models.items():
                model.load_state_dict(cached[name])
                model.eval()
            log(f"models: loaded from {path}")
            return models
    x, y = builtin_images("train", CONFIG["data"]["train_rows"], CONFIG["data"]["seed"])
    torch.manual_seed(0)
    train(models["standard"], x, y, CONFIG["standard"], adversarial=False, log=log)
    models["robust"].load_state_dict(models["standard"].state_dict())
    train(models["robust"], x, y, CONFIG["robust"], adversarial=True, log=log)
    torch.save({"key": key, **{n: m.state_dict() for n, m in models.items()}}, path)
    return models


def accuracy(model, x, y, eps=None) -> float:
    if eps is not None:
        torch.manual_seed(0)
        x = pgd_linf(model, x, y, eps, eps / 4, 10)
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def four_conv_cnn(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """Conv 64, pool, conv 128, pool, conv 128, conv 256, pool (3x3, BN, ReLU), global average
    pool, linear; random init (PyTorch's defaults), eval mode. 49M MACs per 32x32 image."""
    from torch import nn

    def conv_bn_relu(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    torch.manual_seed(seed)
    return nn.Sequential(
        *conv_bn_relu(3, 64), nn.MaxPool2d(2), *conv_bn_relu(64, 128), nn.MaxPool2d(2),
        *conv_bn_relu(128, 128), *conv_bn_relu(128, 256), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes),
    ).eval()


def uniform_noise(rows: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The implementations


def best_of(repeats: int, fn) -> dict:
    """fn() `repeats` times; the run with the least wall time (results are deterministic)."""
    return min((fn() for _ in range(repeats)), key=lambda r: r["seconds"])


def run_ours(model, x, y, batch, **settings) -> dict:
    margins, iters, converged = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(x), batch):
        res = deepfool(model, x[i : i + batch], y[i : i + batch], norm="l2",
                       overshoot=CONFIG["deepfool"]["overshoot"],
                       max_iter=CONFIG["deepfool"]["max_iter"], **settings)
        margins.append(res.margin)
        iters.append(res.iters)
        converged.append(res.converged)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "margin": torch.cat(margins).numpy(),
            "iters": torch.cat(iters).float().mean().item(),
            "success": torch.cat(converged).float().mean().item()}


def run_foolbox(model, x, batch) -> dict:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    attack = foolbox.attacks.L2DeepFoolAttack(steps=CONFIG["deepfool"]["max_iter"],
                                              overshoot=CONFIG["deepfool"]["overshoot"],
                                              candidates=CONFIG["deepfool"]["classes"])
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    margins, success, loops = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        with torch.inference_mode():
            pred = model(xb).argmax(1)
        calls.clear()
        adv = attack.run(fmodel, xb, foolbox.criteria.Misclassification(pred))
        # Each loop: one forward per candidate but the first; a finished run ends on one check.
        per_loop = CONFIG["deepfool"]["classes"] - 1
        loops.append(len(calls) // per_loop)
        margins.append((adv - xb).flatten(1).norm(dim=1))
        with torch.inference_mode():
            success.append(model(adv).argmax(1) != pred)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    hook.remove()
    return {"seconds": seconds, "cpu_seconds": cpu, "margin": torch.cat(margins).numpy(),
            "iters": float(np.mean(loops)), "success": torch.cat(success).float().mean().item()}


def run_torchattacks(model, x, y) -> dict:
    import torchattacks

    attack = torchattacks.DeepFool(model, steps=CONFIG["deepfool"]["max_iter"],
                                   overshoot=CONFIG["deepfool"]["overshoot"])
    preds = []
    hook = model.register_forward_hook(lambda m, i, out: preds.append(int(out.argmax(1)[0])))
    margins, iters, success = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(len(x)):  # it walks a batch one sample at a time anyway; this counts steps
        preds.clear()
        adv = attack(x[i : i + 1], y[i : i + 1])
        early_stop = preds[-1] != int(y[i])  # its last forward found the sample flipped
        iters.append(len(preds) - early_stop)
        margins.append(float((adv - x[i : i + 1]).norm()))
        with torch.inference_mode():
            success.append(int(model(adv).argmax(1)[0]) != int(y[i]))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    hook.remove()
    return {"seconds": seconds, "cpu_seconds": cpu, "margin": np.array(margins, np.float32),
            "iters": float(np.mean(iters)), "success": float(np.mean(success))}


# ----------------------------------------------------------------------------------------------
# Measurements


def time_pass(model, x) -> float:
    """Seconds per sample of one forward + input-gradient pass at this batch size."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xg).sum(), xg)
        best = min(best, time.perf_counter() - start)
    return best / len(x)


def pass_costs(model, x, classes: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per sample at this batch size: one forward + input-gradient pass (t_pass), a
    grad-enabled forward alone (t_fwd) and one more input-gradient backward from the same
    forward (t_vjp, retain_graph); the floor of exact DeepFool per active sample and step in
    passes is (t_fwd + (classes - 1) t_vjp) / t_pass."""
    def forward():
        xg = x.detach().requires_grad_(True)
        return xg, model(xg)

    def vjps(count):
        xg, logits = forward()
        for j in range(count):
            grad_out = torch.zeros_like(logits)
            grad_out[:, j % classes] = 1.0
            torch.autograd.grad(logits, xg, grad_out, retain_graph=True)

    timed = {"fwd": forward, "one": lambda: vjps(1), "many": lambda: vjps(classes - 1)}
    best = {name: float("inf") for name in timed}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    n = len(x)
    t_fwd, t_pass = best["fwd"] / n, best["one"] / n
    t_vjp = (best["many"] - best["one"]) / (classes - 2) / n
    return {"t_pass": t_pass, "t_fwd": t_fwd, "t_vjp": t_vjp,
            "floor_passes": (t_fwd + (classes - 1) * t_vjp) / t_pass}


def class_gradient_strategies(model, x, y) -> dict[str, float]:
    """Seconds for one DeepFool step's K-1 class gradients of a batch, several ways."""
    from torch.func import functional_call, jacrev, vmap

    num_classes = CONFIG["deepfool"]["classes"]
    n, rows = len(x), torch.arange(len(x))
    classes = torch.arange(num_classes).expand(n, num_classes)
    others = classes[classes != y[:, None]].view(n, num_classes - 1)
    grad_out = torch.zeros(num_classes - 1, n, num_classes)
    for j in range(num_classes - 1):
        grad_out[j, rows, others[:, j]] = 1.0
        grad_out[j, rows, y] = -1.0

    def backward_loop(rows=n, memory_format=torch.contiguous_format):
        out = []
        for xc, go in zip(x.split(rows), grad_out.split(rows, dim=1), strict=True):
            xg = xc.contiguous(memory_format=memory_format).requires_grad_(True)
            logits = model(xg)
            out += [torch.autograd.grad(logits, xg, g, retain_graph=True)[0] for g in go]
        return out

    def grads_batched():
        xg = x.detach().requires_grad_(True)
        return torch.autograd.grad(model(xg), xg, grad_out, is_grads_batched=True)[0]

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def func_jacrev():
        def logits_of(xi):
            return functional_call(model, (params, buffers), (xi[None],))[0]

        jac = vmap(jacrev(logits_of))(x)  # [n, K, C, H, W]; the differences are then cheap
        return jac[rows[:, None], others] - jac[rows, y][:, None]

    out = {}
    strategies = {
        f"backward loop, {CPU_GRAD_BATCH}-row chunks, channels_last (kept)":
            lambda: backward_loop(rows=CPU_GRAD_BATCH, memory_format=torch.channels_last),
        f"backward loop, {CPU_GRAD_BATCH}-row chunks": lambda: backward_loop(rows=CPU_GRAD_BATCH),
        f"backward loop, {n} rows": backward_loop,
        "is_grads_batched": grads_batched,
        "torch.func vmap(jacrev)": func_jacrev,
    }
    out = {name: float("inf") for name in strategies}
    for _ in range(3):  # interleaved, best of 3: the machine is shared
        for name, fn in strategies.items():
            start = time.perf_counter()
            fn()
            out[name] = min(out[name], time.perf_counter() - start)
    return out


def agreement(ours: np.ndarray, peer: np.ndarray) -> dict:
    """Spearman over all samples; median |ours - peer| / peer over samples with peer > 0."""
    positive = peer > 0
    rel = np.abs(ours[positive] - peer[positive]) / peer[positive]
    return {"spearman": float(spearmanr(ours, peer).statistic),
            "median_rel_diff": float(np.median(rel)) if positive.any() else float("nan"),
            "p95_rel_diff": float(np.quantile(rel, 0.95)) if positive.any() else float("nan")}


def row(name, settings, n, r, t_pass, vs=None) -> dict:
    per_sample = r["seconds"] / n
    units = per_sample / (r["iters"] * t_pass) if r["iters"] else float("nan")
    return {"impl": name, "settings": settings, "n": n, "samples_per_s": n / r["seconds"],
            "cpu_ms_per_sample": 1e3 * r["cpu_seconds"] / n, "mean_iters": r["iters"],
            "success": r["success"], "cost_units": units,
            **(vs or {})}


def bench_model(label, model, x, y, args, log) -> dict:
    n, n_ta, batch, k = len(x), args.n_torchattacks, args.batch_size, CONFIG["topk"]
    classes = CONFIG["deepfool"]["classes"]
    out = {"clean_acc": accuracy(model, x, y), "pgd10_acc": accuracy(model, x, y, 8 / 255)}
    log(f"{label}: clean acc {out['clean_acc']:.3f}, PGD-10 (8/255) acc {out['pgd10_acc']:.3f}")
    costs = pass_costs(model, x[:batch], classes)
    t_pass = costs["t_pass"]
    t_pass_ta = time_pass(model, x[:1])
    deepfool(model, x[:8], y[:8])  # warm-up
    rows = []

    exact = run_ours(model, x, y, batch)
    rows.append(row("ours", "default (true label, no clip)", n, exact, t_pass))
    log(f"  ours default: {n / exact['seconds']:.1f} samples/s")
    topk = run_ours(model, x, y, batch, candidates=k)
    rows.append(row("ours", f"top-{k} candidates", n, topk, t_pass,
                    {"vs": "ours default", **agreement(topk["margin"], exact["margin"])}))
    fb_ours = run_ours(model, x, y, batch, clip=True, target="predicted")
    rows.append(row("ours", "clip, predicted (foolbox's)", n, fb_ours, t_pass))
    log(f"  ours foolbox settings: {n / fb_ours['seconds']:.1f} samples/s")
    fused = run_ours(fuse_conv_bn(model), x, y, batch, clip=True, target="predicted")
    vs_fb_ours = {"vs": "ours clip, predicted", **agreement(fused["margin"], fb_ours["margin"])}
    rows.append(row("ours", "clip, predicted, fuse_conv_bn(model)", n, fused, t_pass, vs_fb_ours))
    log(f"  ours fuse_conv_bn: {n / fused['seconds']:.1f} samples/s")
    fb = run_foolbox(model, x, batch)
    rows.append(row("foolbox L2DeepFoolAttack", "candidates=10", n, fb, t_pass,
                    {"vs": "ours clip, predicted", **agreement(fb_ours["margin"], fb["margin"])}))
    log(f"  foolbox: {n / fb['seconds']:.1f} samples/s")
    ta_ours = run_ours(model, x[:n_ta], y[:n_ta], batch, clip=True, target="true")
    rows.append(row("ours", f"clip, true label (first {n_ta})", n_ta, ta_ours, t_pass))
    ta = run_torchattacks(model, x[:n_ta], y[:n_ta])
    rows.append(row("torchattacks DeepFool", f"first {n_ta} samples", n_ta, ta, t_pass_ta,
                    {"vs": "ours clip, true label", **agreement(ta_ours["margin"], ta["margin"])}))
    log(f"  torchattacks: {n_ta / ta['seconds']:.2f} samples/s")
    out.update({
        "t_pass_per_sample": t_pass, "t_pass_batch1": t_pass_ta, "rows": rows,
        "floor_passes": costs["floor_passes"], "t_fwd": costs["t_fwd"], "t_vjp": costs["t_vjp"],
        "speedup_vs_foolbox": fb["seconds"] / fb_ours["seconds"],
        "speedup_vs_torchattacks": ta["seconds"] / ta_ours["seconds"],
        "cpu_speedup_vs_foolbox": fb["cpu_seconds"] / fb_ours["cpu_seconds"],
        "cpu_speedup_vs_torchattacks": ta["cpu_seconds"] / ta_ours["cpu_seconds"],
        "torchattacks_not_adversarial": round((1 - ta["success"]) * n_ta),
        "topk_speedup": exact["seconds"] / topk["seconds"],
    })
    if args.gradient_strategies:
        out["class_gradients_s"] = class_gradient_strategies(model, x[:batch], y[:batch])
    return out


def _table(rows: list[dict]) -> list[str]:
    """The Markdown lines of one results table (header, rule, a line per row)."""
    lines = [
        "| implementation | settings | n | samples/s | CPU ms/sample | mean iters | success "
        "| cost (passes) | vs | Spearman | median rel diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        vs = (f"{r['vs']} | {r['spearman']:.4f} | {r['median_rel_diff']:.2e}"
              if "vs" in r else " | | ")
        lines.append(f"| {r['impl']} | {r['settings']} | {r['n']} | {r['samples_per_s']:.2f} "
                     f"| {r['cpu_ms_per_sample']:.1f} | {r['mean_iters']:.2f} "
                     f"| {r['success']:.3f} | {r['cost_units']:.2f} | {vs} |")
    return lines


def markdown(results: dict) -> str:
    lines = []
    for label, res in results["models"].items():
        lines += [
            f"\n**{label}** (clean acc {res['clean_acc']:.3f}, PGD-10 8/255 acc "
            f"{res['pgd10_acc']:.3f}; one fwd+input-grad pass: "
            f"{res['t_pass_per_sample'] * 1e3:.2f} ms/sample at batch {results['batch_size']}, "
            f"{res['t_pass_batch1'] * 1e3:.2f} ms at batch 1; floor of exact DeepFool "
            f"{res['floor_passes']:.2f} passes per sample-step)\n",
            *_table(res["rows"]),
        ]
        topk = next(r for r in res["rows"] if r["settings"].startswith("top-"))
        lines += [
            "",
            f"Speed-up (wall; CPU time in brackets): {res['speedup_vs_foolbox']:.1f}x "
            f"({res['cpu_speedup_vs_foolbox']:.1f}x) foolbox, "
            f"{res['speedup_vs_torchattacks']:.1f}x ({res['cpu_speedup_vs_torchattacks']:.1f}x) "
            f"torchattacks. torchattacks returned {res['torchattacks_not_adversarial']} of "
            f"{results['n_torchattacks']} outputs that are not adversarial.",
            f"Top-{CONFIG['topk']} candidates: {res['topk_speedup']:.2f}x faster than exact; "
            f"margin error vs exact: median {topk['median_rel_diff']:.1e}, "
            f"95th percentile {topk['p95_rel_diff']:.1e} (relative); Spearman "
            f"{topk['spearman']:.4f}.",
        ]
        if "class_gradients_s" in res:
            grads = ", ".join(f"{k} {v:.2f} s" for k, v in res["class_gradients_s"].items())
            lines.append(f"Class gradients for one step at batch {results['batch_size']}: "
                         f"{grads}.")
    return "\n".join(lines)


def bench_multi_iter(args, log) -> dict:
    """Random-init 4-conv CNN on uniform noise: every sample needs several DeepFool steps."""
    cfg = CONFIG["multi_iter"]
    classes, repeats, n = CONFIG["deepfool"]["classes"], args.repeats, args.n_multi
    model = four_conv_cnn(classes, cfg["model_seed"])
    x = uniform_noise(n, cfg["data_seed"])
    with torch.inference_mode():
        y = model(x).argmax(1)
    costs = pass_costs(model, x, classes)
    log(f"multi-iter: t_pass {costs['t_pass'] * 1e3:.2f} ms/sample at batch {n}; floor "
        f"{costs['floor_passes']:.2f} passes per sample-step")
    deepfool(model, x[:8], y[:8], clip=True, target="predicted")  # warm-up
    t_pass = costs["t_pass"]
    fb_settings = {"clip": True, "target": "predicted"}
    ours = best_of(repeats, lambda: run_ours(model, x, y, n, **fb_settings))
    log(f"  ours: {n / ours['seconds']:.2f} samples/s, mean iters {ours['iters']:.2f}")
    rows = [row("ours", "clip, predicted (foolbox's)", n, ours, t_pass)]
    for settings in ({"fold_batchnorm": False}, {"class_grads": "batched"}):
        r = best_of(repeats, lambda s=settings: run_ours(model, x, y, n, **fb_settings, **s))
        name = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        rows.append(row("ours", f"clip, predicted, {name}", n, r, t_pass,
                        {"vs": "ours", **agreement(r["margin"], ours["margin"])}))
        log(f"  ours {name}: {n / r['seconds']:.2f} samples/s")
    fused = fuse_conv_bn(model)
    r = best_of(repeats, lambda: run_ours(fused, x, y, n, **fb_settings))
    rows.append(row("ours", "clip, predicted, fuse_conv_bn(model)", n, r, t_pass,
                    {"vs": "ours", **agreement(r["margin"], ours["margin"])}))
    log(f"  ours fuse_conv_bn: {n / r['seconds']:.2f} samples/s")
    fb = best_of(repeats, lambda: run_foolbox(model, x, n))
    rows.append(row("foolbox L2DeepFoolAttack", "candidates=10", n, fb, t_pass,
                    {"vs": "ours", **agreement(ours["margin"], fb["margin"])}))
    log(f"  foolbox: {n / fb['seconds']:.2f} samples/s")
    return {"n": n, "repeats": repeats, **costs, "rows": rows,
            "speedup_vs_foolbox": fb["seconds"] / ours["seconds"],
            "cpu_speedup_vs_foolbox": fb["cpu_seconds"] / ours["cpu_seconds"],
            "ours_passes": rows[0]["cost_units"]}


def markdown_multi_iter(res: dict) -> str:
    lines = [
        f"\n**multi-iter** (random-init 4-conv CNN, {res['n']} uniform-noise rows, best of "
        f"{res['repeats']}; at batch {res['n']} one fwd+input-grad pass t_pass = "
        f"{res['t_pass'] * 1e3:.2f} ms/sample, forward {res['t_fwd'] * 1e3:.2f} ms, one more "
        f"VJP {res['t_vjp'] * 1e3:.2f} ms)\n",
        *_table(res["rows"]),
    ]
    lines += [
        "",
        f"Speed-up over foolbox: {res['speedup_vs_foolbox']:.2f}x wall, "
        f"{res['cpu_speedup_vs_foolbox']:.2f}x CPU time. Cost per active sample-step: ours "
        f"{res['ours_passes']:.2f} passes; the floor (1 forward + "
        f"{CONFIG['deepfool']['classes'] - 1} VJPs) {res['floor_passes']:.2f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="scored rows (builtin `test` part)")
    ap.add_argument("--n-torchattacks", type=int, default=64, help="rows for torchattacks")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out-dir", default="bench_out")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached models")
    ap.add_argument("--case", choices=("all", "builtin", "multi-iter"), default="all")
    ap.add_argument("--n-multi", type=int, default=CONFIG["multi_iter"]["rows"],
                    help="rows of the multi-iter case (one batch)")
    ap.add_argument("--repeats", type=int, default=CONFIG["multi_iter"]["repeats"],
                    help="multi-iter case: best of this many runs")
    args = ap.parse_args()
    torch.set_num_threads(CONFIG["threads"])
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    load_start = os.getloadavg()
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "threads": CONFIG["threads"],
                    "torch": torch.__version__, "loadavg_start": load_start},
        "config": CONFIG, "n": args.n, "n_torchattacks": args.n_torchattacks,
        "batch_size": args.batch_size, "models": {},
    }
    text = ""
    if args.case in ("all", "builtin"):
        models = trained_models(args.out_dir, args.retrain, log)
        x, y = builtin_images("test", args.n, CONFIG["data"]["seed"])
        for name, label in (("standard", "(a) standard"), ("robust", "(b) PGD-AT")):
            args.gradient_strategies = name == "robust"  # once is enough
            results["models"][label] = bench_model(label, models[name], x, y, args, log)
        text += markdown(results)
    if args.case in ("all", "multi-iter"):
        results["multi_iter"] = bench_multi_iter(args, log)
        text += "\n" + markdown_multi_iter(results["multi_iter"])
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - started
    print(text)
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {os.getloadavg()}")
    name = "deepfool_multi_iter.json" if args.case == "multi-iter" else "deepfool.json"
    with open(os.path.join(args.out_dir, name), "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
