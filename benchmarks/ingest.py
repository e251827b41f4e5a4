"""Ingest throughput and peak memory for the builtin source.

Runs `puma_ray.ingest.run_ingest` on `builtin` with `synthetic=ROWS` (the part that scales to
millions in the paper setting; it includes the ambiguous-blend path), `real_train=0` and a small
`real_test`, either as Ray tasks on a fresh local Ray (`num_cpus` CPUs) or in this process.
Reports rows/s and peak RSS, sampled every 0.1 s with psutil: of the driver, of the largest
Ray worker, and of the whole process tree (with Ray's own daemons). Peak RSS should not grow
with ROWS: every shard is one task holding one row group at a time.

    python benchmarks/ingest.py --rows 250000
    python benchmarks/ingest.py --rows 1000000 --no-parallel

Prints a markdown table row and merges the result into bench_out/ingest.json (one entry per
(rows, mode)). Results: docs/benchmarks.md, section "Ingest".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time

import psutil
from _memory import RssSampler

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
MB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="builtin synthetic rows")
    ap.add_argument("--test-rows", type=int, default=1000, help="builtin real_test rows")
    ap.add_argument("--rows-per-shard", type=int, default=50_000)
    ap.add_argument("--out-dir", help="run directory for the shards (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the shards afterwards")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--json", default="bench_out/ingest.json")
    args = ap.parse_args()

    from puma_ray.config import load_config
    from puma_ray.ingest import run_ingest

    cfg = load_config(
        None,
        [
            "data.sources=[{type: builtin, real_train: 0, "
            f"synthetic: {args.rows}, real_test: {args.test_rows}}}]",
            f"data.rows_per_shard={args.rows_per_shard}",
        ],
    )
    run_dir = args.out_dir or tempfile.mkdtemp(prefix="puma_ingest_bench_")
    with RssSampler() as rss:
        if args.parallel:
            import ray

            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        start = time.perf_counter()
        summary = run_ingest(cfg, run_dir, parallel=args.parallel, force=True, log=lambda _: None)
        seconds = time.perf_counter() - start
        if args.parallel:
            ray.shutdown()
    disk = sum(s.bytes for s in summary.splits.values())
    if not args.keep and not args.out_dir:
        shutil.rmtree(run_dir, ignore_errors=True)

    rows = summary.rows_written
    result = {
        "rows": args.rows,
        "rows_written": rows,
        "mode": f"ray tasks, {args.num_cpus} CPUs" if args.parallel else "in-process",
        "rows_per_shard": args.rows_per_shard,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "image_mb_per_s": round(rows * 3072 / seconds / 1e6, 1),
        "disk_mb": round(disk / 1e6, 1),
        "peak_rss_driver_mb": round(rss.driver / MB),
        "peak_rss_worker_mb": round(rss.worker / MB),
        "peak_rss_tree_mb": round(rss.tree / MB),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
    }
    cols = [
        ("rows", "rows"),
        ("mode", "mode"),
        ("seconds", "s"),
        ("rows_per_s", "rows/s"),
        ("image_mb_per_s", "MB/s"),
        ("disk_mb", "on disk MB"),
        ("peak_rss_driver_mb", "driver peak RSS MiB"),
        ("peak_rss_worker_mb", "worker peak RSS MiB"),
        ("peak_rss_tree_mb", "tree peak RSS MiB"),
    ]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    print(
        "| "
        + " | ".join(
            f"{result[k]:,}" if isinstance(result[k], int) else str(result[k]) for k, _ in cols
        )
        + " |"
    )

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    try:
        with open(args.json) as f:
            results = json.load(f)
    except (FileNotFoundError, ValueError):
        results = []
    results = [r for r in results if (r["rows"], r["mode"]) != (result["rows"], result["mode"])]
    results.append(result)
    results.sort(key=lambda r: (r["mode"], r["rows"]))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
