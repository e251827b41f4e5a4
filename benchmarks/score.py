"""Scoring throughput and memory: `puma-ray score` on Ray vs the single-process engine.

For each row count: ingest that many builtin synthetic rows, then score them with Ray Data
(actor pool of --cpus actors on a local Ray with --cpus CPUs, one torch thread each; the
actors reserve (cpus-1)/cpus CPU each so one CPU slot stays free for Ray Data's read and write
tasks, see `score._pool`), sampling the peak RSS of the driver, its largest Ray worker and its
whole process tree (`_memory.RssSampler`). The single-process reference runs
`puma_ray.attacks.deepfool` on the first --ref-rows rows in this process with --cpus threads.
The margin model is a small_cnn trained briefly (standard training) and cached in --out-dir.

    python benchmarks/score.py --rows 100000 1000000

Prints a markdown table; writes bench_out/score.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from _memory import RssSampler

from puma_ray.attacks import deepfool
from puma_ray.config import BuiltinSource, load_config
from puma_ray.data import builtin, dataset_dirs, open_dataset
from puma_ray.ingest import run_ingest
from puma_ray.models import create_model, load_checkpoint, save_checkpoint


def margin_model(path: str, steps: int = 300) -> str:
    """A small_cnn trained for `steps` SGD steps on builtin train rows (cached)."""
    if os.path.exists(path):
        return path
    torch.manual_seed(0)
    src = BuiltinSource(real_train=steps * 64)
    model = create_model("small_cnn", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    for step in range(steps):
        idx = np.arange(step * 64, (step + 1) * 64)
        images, labels = builtin.generate(src, "train", idx)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval())
    return path


def single_process(ckpt: str, run_dir: str, rows: int, batch_size: int, settings: dict) -> dict:
    model, _ = load_checkpoint(ckpt)
    data = open_dataset(dataset_dirs(run_dir)[0])
    done, iters, start = 0, 0, time.perf_counter()
    for batch in data.iter_batches(batch_size=batch_size):
        x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div_(255)
        res = deepfool(model, x, torch.from_numpy(batch.labels), **settings)
        iters += int(res.iters.sum())
        done += len(batch)
        if done >= rows:
            break
    wall = time.perf_counter() - start
    return {"rows": done, "wall_s": wall, "rows_per_s": done / wall, "mean_iters": iters / done}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--ref-rows", type=int, default=8192)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--rows-per-shard", type=int, default=2000)
    ap.add_argument(
        "--object-store-mb",
        type=int,
        default=2048,
        help="object store size; bounds the shared pages workers touch (RSS counts them)",
    )
    ap.add_argument("--out-dir", default="bench_out/score")
    ap.add_argument("--keep", action="store_true", help="keep the run dirs (ingested shards)")
    args = ap.parse_args(argv)

    import ray

    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = margin_model(os.path.join(args.out_dir, "margin_model.pt"))
    # as run_score computes them (scoring.signed defaults to true: misclassified rows walk back)
    settings = {"norm": "l2", "overshoot": 0.02, "max_iter": args.max_iter, "signed": True}
    results = []
    ray.init(
        address="local",
        num_cpus=args.cpus,
        object_store_memory=args.object_store_mb * 2**20,
        include_dashboard=True,
    )
    for rows in args.rows:
        run_dir = os.path.abspath(os.path.join(args.out_dir, f"run_{rows}"))
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(
            None,
            [
                f"data.sources=[{{type: builtin, real_train: 0, real_test: 64, "
                f"synthetic: {rows}}}]",
                f"data.rows_per_shard={args.rows_per_shard}",
                f"margin_model.checkpoint={os.path.abspath(ckpt)}",
                f"scoring.batch_size={args.batch_size}",
                f"scoring.max_iter={args.max_iter}",
                # the pool must leave one CPU slot for Ray Data's read/write tasks
                f"scoring.cpus_per_actor={(args.cpus - 1) / args.cpus}",
                f"scoring.pool_min={args.cpus}",
                f"scoring.pool_max={args.cpus}",
            ],
        )
        run_ingest(cfg, run_dir, log=lambda _m: None)
        torch.set_num_threads(args.cpus)
        ref = single_process(ckpt, run_dir, args.ref_rows, args.batch_size, settings)
        print(f"rows={rows}: single-process {ref['rows_per_s']:.0f} rows/s", file=sys.stderr)
        from puma_ray.score import run_score

        with RssSampler(interval=0.5) as rss:
            summary = run_score(cfg, run_dir, log=lambda m: print(m, file=sys.stderr))
        row = {
            "rows": rows,
            "ray_rows_per_s": summary.rows_scored_now / summary.wall_s,
            "ray_wall_s": summary.wall_s,
            "single_rows_per_s": ref["rows_per_s"],
            "ratio": summary.rows_scored_now / summary.wall_s / ref["rows_per_s"],
            "single_mean_iters": ref["mean_iters"],
            "misclassified": summary.misclassified,
            "driver_peak_rss_mb": rss.driver / 2**20,
            "worker_peak_rss_mb": rss.worker / 2**20,
            "tree_peak_rss_mb": rss.tree / 2**20,
            "driver_peak_private_mb": rss.driver_private / 2**20,
            "worker_peak_private_mb": rss.worker_private / 2**20,
            "tree_peak_private_mb": rss.tree_private / 2**20,
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    ray.shutdown()

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": args.cpus,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "object_store_mb": args.object_store_mb,
        "settings": settings,
        "loadavg_end": os.getloadavg(),
        "results": results,
    }
    with open(os.path.join("bench_out", "score.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(
        "| rows | Ray rows/s | single-process rows/s | ratio | driver peak RSS (private) | "
        "largest worker RSS (private) | process tree RSS (private) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['ray_rows_per_s']:.0f} | {r['single_rows_per_s']:.0f} | "
            f"{r['ratio']:.2f} | "
            f"{r['driver_peak_rss_mb']:,.0f} ({r['driver_peak_private_mb']:,.0f}) MB | "
            f"{r['worker_peak_rss_mb']:,.0f} ({r['worker_peak_private_mb']:,.0f}) MB | "
            f"{r['tree_peak_rss_mb']:,.0f} ({r['tree_peak_private_mb']:,.0f}) MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
