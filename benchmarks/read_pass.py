"""Seconds per pass of `ray.data.read_parquet(files).iter_batches()`, Ray Data's Parquet V2
datasource (the 2.60 default) against V1, on a small training set.

Training starts one Ray Data execution per epoch and stream (Ray Train's streaming split
restarts the read every epoch), so a fixed cost per execution is paid epochs x streams times.
V2 starts a pool of footer-reading actors for each execution (`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`,
32 by default); V1 reads each file's footer inside the read task. This is why
`puma_ray.runtime.ensure_ray` sets `DataContext.use_datasource_v2 = False`.

    python benchmarks/read_pass.py --rows 6000 --passes 5

Prints a markdown table (first pass and the mean of the others, per datasource).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time


def _passes(files: list[str], v2: bool, passes: int, batch: int, want: int) -> list[float]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = v2
    ds = ray.data.read_parquet(files).select_columns(["id", "image", "label", "source"])
    out = []
    for p in range(passes):
        t0, rows = time.perf_counter(), 0
        for b in ds.iter_batches(
            batch_size=batch,
            batch_format="pyarrow",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=p,
        ):
            rows += len(b)
        assert rows == want, (rows, want)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--rows-per-shard", type=int, default=2000)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from puma_ray.config import load_config
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.ingest import run_ingest

    run_dir = os.path.abspath(os.path.join(args.out_dir, "read_pass"))
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        None,
        [
            f"data.sources=[{{type: builtin, real_train: {args.rows}, real_test: 16, "
            "synthetic: 0}]",
            f"data.rows_per_shard={args.rows_per_shard}",
        ],
    )
    run_ingest(cfg, run_dir, parallel=False, log=lambda _m: None)
    files = open_dataset(dataset_dirs(run_dir)[0]).files
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    results = {
        name: _passes(files, v2, args.passes, args.batch, args.rows)
        for name, v2 in (("V2 (default)", True), ("V1", False))
    }
    ray.shutdown()
    print(
        f"\n{args.rows} rows in {len(files)} shards, batch {args.batch}, {args.cpus} CPUs, "
        f"ray {ray.__version__}\n"
    )
    print("| datasource | first pass s | later passes s (mean) |")
    print("|---|---:|---:|")
    for name, secs in results.items():
        rest = statistics.mean(secs[1:]) if len(secs) > 1 else float("nan")
        print(f"| {name} | {secs[0]:.2f} | {rest:.2f} |")


if __name__ == "__main__":
    main()
