"""Evaluation benchmark on the demo's trained model (a finished `puma-ray run` run dir):

1. `puma-ray evaluate`'s cost, before and after evaluation moved to chunks on Ray workers: the
   old path (PGD-20 on the 500 test rows in the driver, one 500-row batch, torch's threads) and
   the new one (`run_evaluate` with Ray initialised: `evaluation.chunk_rows` 250, two 1-thread
   tasks on 2 CPUs), best of `--repeats`, the same numbers required.
2. AutoAttack (standard, l-inf 8/255) on the same 500 rows with the reference implementation
   (pyautoattack, through `puma_ray.attacks.autoattack`) and with the torchattacks port
   (`torchattacks.AutoAttack`, the `bench` extra): robust accuracy and wall time of each.

    python benchmarks/evaluate.py --run-dir runs/demo [--skip-autoattack | --autoattack-only]
        [--out bench_out]

Writes `<out>/evaluate.json`; the numbers go to docs/benchmarks.md with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _old_path(cfg, run_dir: str, model_path: str) -> tuple[float, tuple[float, float]]:
    """What `puma-ray evaluate` did before: every row in the driver, one pass."""
    from puma_ray.evaluate import load_split_rows, robust_accuracy
    from puma_ray.models import load_checkpoint

    start = time.perf_counter()
    model, _ = load_checkpoint(model_path)
    x, y = load_split_rows(os.path.join(run_dir, "data", "test"), cfg.evaluation.subset)
    a, ev = cfg.training.attack, cfg.evaluation
    acc = robust_accuracy(
        model, x, y, a.epsilon, norm=a.norm, steps=ev.pgd_steps, batch_size=ev.batch_size,
        seed=cfg.seed,
    )  # fmt: skip
    return time.perf_counter() - start, acc


def _new_path(cfg, run_dir: str, model_path: str, name: str) -> tuple[float, tuple[float, float]]:
    from puma_ray import storage
    from puma_ray.evaluate import run_evaluate

    storage.delete(os.path.join(run_dir, name))  # no chunk kept from an earlier repeat
    start = time.perf_counter()
    s = run_evaluate(cfg, run_dir, model_path, name=name, log=lambda _m: None, use_ray=True)
    return time.perf_counter() - start, (s.clean_acc, s.pgd_acc)


def _autoattack(cfg, run_dir: str, model_path: str) -> dict:
    import torch
    import torchattacks

    from puma_ray.attacks.autoattack import autoattack
    from puma_ray.evaluate import load_split_rows
    from puma_ray.models import load_checkpoint

    model, _ = load_checkpoint(model_path)
    model.eval()
    x, y = load_split_rows(os.path.join(run_dir, "data", "test"), cfg.evaluation.subset)
    eps = cfg.training.attack.epsilon
    out = {"rows": len(x), "load_before": _load()}
    start = time.perf_counter()
    ref = autoattack(
        model, x, y, eps, norm="linf", version="standard", batch_size=500, seed=0,
        log=lambda m: print(m, flush=True),
    )  # fmt: skip
    out["reference"] = {
        "wall_s": time.perf_counter() - start,
        "robust_acc": ref.robust_acc,
        "stages": ref.accuracies(),
        "stage_seconds": ref.stage_seconds,
    }
    print(json.dumps(out["reference"]), flush=True)  # a result even if the port is stopped
    start = time.perf_counter()
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10)
    robust = 0
    for i in range(0, len(x), 500):
        adv = attack(x[i : i + 500], y[i : i + 500])
        with torch.no_grad():
            robust += int((model(adv).argmax(1) == y[i : i + 500]).sum())
    out["torchattacks"] = {
        "wall_s": time.perf_counter() - start,
        "robust_acc": robust / len(x),
        "version": torchattacks.__version__,
    }
    out["load_after"] = _load()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--repeats", type=int, default=3)
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-autoattack", action="store_true")
    skip.add_argument("--autoattack-only", action="store_true", help="part 2 alone")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    from puma_ray.config import load_config

    cfg = load_config(None, ["tracking.tracking_uri=none"])
    model_path = os.path.join(args.run_dir, "train", "model.pt")
    results: dict = {"load_before": _load()}
    if not args.autoattack_only:
        _evaluate_paths(cfg, args, model_path, results)
    if not args.skip_autoattack:
        results["autoattack"] = _autoattack(cfg, args.run_dir, model_path)
        print(json.dumps(results["autoattack"], indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "evaluate.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


def _evaluate_paths(cfg, args, model_path: str, results: dict) -> None:
    from puma_ray.runtime import ensure_ray

    old = [_old_path(cfg, args.run_dir, model_path) for _ in range(args.repeats)]
    ensure_ray(cfg.ray)
    new = [_new_path(cfg, args.run_dir, model_path, "bench_evaluate") for _ in range(args.repeats)]
    assert len({acc for _, acc in old + new}) == 1, (old, new)  # the same numbers every way
    results["old_driver_s"] = min(t for t, _ in old)
    results["new_chunks_s"] = min(t for t, _ in new)
    results["accuracy"] = old[0][1]
    results["load_after"] = _load()
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
