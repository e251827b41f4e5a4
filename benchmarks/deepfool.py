"""DeepFool side by side: ours, torchattacks and foolbox, in one process, on the same inputs.

Models: small_cnn on the builtin data, (a) after brief standard training and (b) fine-tuned
with l-inf PGD adversarial training (Madry et al., arXiv:1706.06083; eps 8/255). Robust models
need more DeepFool iterations, so (b) is the case that matters. Trained weights are cached in
bench_out/ (delete them, or pass --retrain, to train again).

Settings shared by all implementations: l2, overshoot 0.02, max_iter (steps) 50, all 10 classes.
- foolbox `L2DeepFoolAttack(candidates=10)` clips every iterate to [0, 1] and attacks the clean
  prediction, so it is compared with ours at clip=True, target="predicted".
- torchattacks `DeepFool` attacks the given (true) label and clamps every step; it walks the
  batch one sample at a time and is slow, so it runs on the first --n-torchattacks samples only,
  compared with ours at clip=True, target="true" on those same samples. Its iterations are
  counted per sample with a forward hook.
- Ours is also timed at its defaults (true label, no clipping) and with the top-3 candidate
  approximation (its margin error and rank correlation against exact ours).
Cost in model-pass units = (s/sample) / (mean iters x (candidates + 1) x t_pass), with t_pass the
time of one forward + input-gradient pass per sample at the same batch size: how close an
implementation is to a naive exact DeepFool that spends candidates + 1 such passes per step.
For foolbox, iterations are its loops per batch (it never shrinks the batch).
It also times ways to get one step's class gradients (see puma_ray/attacks/deepfool.py).

    python benchmarks/deepfool.py    # ~5 min on 2 quiet cores, incl. training the models

Prints markdown tables and writes bench_out/deepfool.json. Results: docs/benchmarks.md, "DeepFool".
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

from puma_ray.attacks import deepfool
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


# ----------------------------------------------------------------------------------------------
# The implementations


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


def row(name, settings, n, r, t_pass, candidates, vs=None) -> dict:
    per_sample = r["seconds"] / n
    units = per_sample / (r["iters"] * (candidates + 1) * t_pass) if r["iters"] else float("nan")
    return {"impl": name, "settings": settings, "n": n, "samples_per_s": n / r["seconds"],
            "cpu_ms_per_sample": 1e3 * r["cpu_seconds"] / n, "mean_iters": r["iters"],
            "success": r["success"], "cost_units": units,
            **(vs or {})}


def bench_model(label, model, x, y, args, log) -> dict:
    n, n_ta, batch, k = len(x), args.n_torchattacks, args.batch_size, CONFIG["topk"]
    classes = CONFIG["deepfool"]["classes"]
    out = {"clean_acc": accuracy(model, x, y), "pgd10_acc": accuracy(model, x, y, 8 / 255)}
    log(f"{label}: clean acc {out['clean_acc']:.3f}, PGD-10 (8/255) acc {out['pgd10_acc']:.3f}")
    t_pass = time_pass(model, x[:batch])
    t_pass_ta = time_pass(model, x[:1])
    deepfool(model, x[:8], y[:8])  # warm-up
    rows = []

    exact = run_ours(model, x, y, batch)
    rows.append(row("ours", "default (true label, no clip)", n, exact, t_pass, classes))
    log(f"  ours default: {n / exact['seconds']:.1f} samples/s")
    topk = run_ours(model, x, y, batch, candidates=k)
    rows.append(row("ours", f"top-{k} candidates", n, topk, t_pass, k,
                    {"vs": "ours default", **agreement(topk["margin"], exact["margin"])}))
    fb_ours = run_ours(model, x, y, batch, clip=True, target="predicted")
    rows.append(row("ours", "clip, predicted (foolbox's)", n, fb_ours, t_pass, classes))
    log(f"  ours foolbox settings: {n / fb_ours['seconds']:.1f} samples/s")
    fb = run_foolbox(model, x, batch)
    rows.append(row("foolbox L2DeepFoolAttack", "candidates=10", n, fb, t_pass, classes,
                    {"vs": "ours clip, predicted", **agreement(fb_ours["margin"], fb["margin"])}))
    log(f"  foolbox: {n / fb['seconds']:.1f} samples/s")
    ta_ours = run_ours(model, x[:n_ta], y[:n_ta], batch, clip=True, target="true")
    rows.append(row("ours", f"clip, true label (first {n_ta})", n_ta, ta_ours, t_pass, classes))
    ta = run_torchattacks(model, x[:n_ta], y[:n_ta])
    rows.append(row("torchattacks DeepFool", f"first {n_ta} samples", n_ta, ta, t_pass_ta, classes,
                    {"vs": "ours clip, true label", **agreement(ta_ours["margin"], ta["margin"])}))
    log(f"  torchattacks: {n_ta / ta['seconds']:.2f} samples/s")
    out.update({
        "t_pass_per_sample": t_pass, "t_pass_batch1": t_pass_ta, "rows": rows,
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


def markdown(results: dict) -> str:
    lines = []
    for label, res in results["models"].items():
        lines += [
            f"\n**{label}** (clean acc {res['clean_acc']:.3f}, PGD-10 8/255 acc "
            f"{res['pgd10_acc']:.3f}; one fwd+input-grad pass: "
            f"{res['t_pass_per_sample'] * 1e3:.2f} ms/sample at batch {results['batch_size']}, "
            f"{res['t_pass_batch1'] * 1e3:.2f} ms at batch 1)\n",
            "| implementation | settings | n | samples/s | CPU ms/sample | mean iters | success "
            "| cost (passes) | vs | Spearman | median rel diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in res["rows"]:
            vs = (f"{r['vs']} | {r['spearman']:.4f} | {r['median_rel_diff']:.2e}"
                  if "vs" in r else " | | ")
            lines.append(f"| {r['impl']} | {r['settings']} | {r['n']} | {r['samples_per_s']:.2f} "
                         f"| {r['cpu_ms_per_sample']:.1f} | {r['mean_iters']:.2f} "
                         f"| {r['success']:.3f} | {r['cost_units']:.2f} | {vs} |")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="scored rows (builtin `test` part)")
    ap.add_argument("--n-torchattacks", type=int, default=64, help="rows for torchattacks")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out-dir", default="bench_out")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached models")
    args = ap.parse_args()
    torch.set_num_threads(CONFIG["threads"])
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    load_start = os.getloadavg()
    models = trained_models(args.out_dir, args.retrain, log)
    x, y = builtin_images("test", args.n, CONFIG["data"]["seed"])
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "threads": CONFIG["threads"],
                    "torch": torch.__version__, "loadavg_start": load_start},
        "config": CONFIG, "n": args.n, "n_torchattacks": args.n_torchattacks,
        "batch_size": args.batch_size, "models": {},
    }
    for name, label in (("standard", "(a) standard"), ("robust", "(b) PGD-AT")):
        args.gradient_strategies = name == "robust"  # once is enough
        results["models"][label] = bench_model(label, models[name], x, y, args, log)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - started
    text = markdown(results)
    print(text)
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {os.getloadavg()}")
    with open(os.path.join(args.out_dir, "deepfool.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
