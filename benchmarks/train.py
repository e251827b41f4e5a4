"""Training throughput: the Ray Train loop (`puma-ray train`, DDP over CPU workers) vs a plain
single-process PyTorch loop doing the same PGD-AT steps on the same number of cores.

Both train `small_cnn` with PGD-AT (--steps attack steps, per-sample eps from a uniform kept
set) on builtin data with batch --batch, random crop + flip. The plain loop holds every image
in memory as one tensor and uses --cpus torch threads in this process; Ray Train runs --cpus
workers with one CPU (so one torch thread) each, streaming the shards with Ray Data. Throughput
is taken from each epoch's steady state (epochs after the first, so worker start-up, the first
Ray Data read and the per-epoch test evaluation are excluded; the plain loop is timed the same
way); end-to-end wall time is reported too.

    python benchmarks/train.py --rows 2048 --epochs 3 --cpus 2

Prints a markdown table; writes bench_out/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch


def _plain(cfg, run_dir: str, epochs: int, threads: int) -> dict:
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.models import create_model
    from puma_ray.train import augment_batch, lr_factor, param_groups, train_step

    torch.set_num_threads(threads)
    tcfg = cfg.training
    ds = open_dataset(dataset_dirs(run_dir)[0])
    batches = list(ds.iter_batches(batch_size=4096, columns=["image", "label"]))
    x_all = torch.from_numpy(np.concatenate([b.images for b in batches])).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(np.concatenate([b.labels for b in batches]).astype(np.int64))
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, 10)
    opt = torch.optim.SGD(
        param_groups(model, tcfg.weight_decay), lr=tcfg.lr, momentum=0.9, nesterov=True
    )
    steps = (len(y_all) + tcfg.batch_size - 1) // tcfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps * epochs, steps, tcfg.schedule)
    )
    gen = torch.Generator().manual_seed(0)
    rates, start = [], time.perf_counter()
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        perm = torch.randperm(len(y_all), generator=gen)
        for i in range(0, len(perm), tcfg.batch_size):
            idx = perm[i : i + tcfg.batch_size]
            x = augment_batch(x_all[idx].float().div_(255), gen)
            y = y_all[idx]
            eps = torch.full((len(y),), tcfg.attack.epsilon)
            train_step(model, x, y, eps, tcfg, opt, sched)
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return {"rates": rates, "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from puma_ray.config import load_config
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune
    from puma_ray.train import run_train

    run_dir = os.path.abspath(os.path.join(args.out_dir, "train_bench"))
    shutil.rmtree(run_dir, ignore_errors=True)
    common = [
        f"data.sources=[{{type: builtin, real_train: {args.rows // 2}, real_test: 256, "
        f"synthetic: {args.rows - args.rows // 2}}}]",
        "data.rows_per_shard=1024",
        "pruning.strategy=none",
        "pruning.eps_rule=none",
        f"training.epochs={args.epochs}",
        f"training.batch_size={args.batch}",
        f"training.attack.steps={args.steps}",
        "evaluation.subset=128",
        "evaluation.pgd_steps=3",
        "tracking.tracking_uri=none",
        f"ray.num_cpus={args.cpus + 1}",  # one slot beyond the workers for Ray Data reads
    ]
    cfg = load_config(None, common)
    ray.init(address="local", num_cpus=args.cpus + 1, include_dashboard=None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_ingest(cfg, run_dir, parallel=False, log=lambda _m: None)
    run_prune(cfg, run_dir, parallel=False, log=lambda _m: None)

    results = {}
    t0 = time.perf_counter()
    ray_cfg = load_config(None, common + [f"ray.num_workers={args.cpus}", "ray.cpus_per_worker=1"])
    s = run_train(ray_cfg, run_dir, name="bench_ray", log=lambda _m: None)
    results["ray_train"] = {
        "rates": [m["samples_per_s"] for m in s.history],
        "wall_s": time.perf_counter() - t0,
    }
    ray.shutdown()
    results["plain"] = _plain(cfg, run_dir, args.epochs, args.cpus)

    def steady(r):
        rest = r["rates"][1:] or r["rates"]
        return float(np.mean(rest))

    plain = steady(results["plain"])
    print(
        f"\n{args.rows} rows, batch {args.batch}, PGD-{args.steps} AT, small_cnn, "
        f"{args.cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}\n"
    )
    print("| loop | samples/s (steady epochs) | vs plain | wall s (all epochs) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {steady(r):.1f} | {steady(r) / plain:.2f}x | {r['wall_s']:.1f} |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "train.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
