"""Prune selection at scale: the exact distributed selection vs the in-memory NumPy reference.

Generates synthetic score shards (id, label, source, margin; lognormal margins with 5% exact
zeros, 10 classes, 5% real rows) under bench_out/, then times, each in a fresh process so peak
memory is its own:

  ray        `prune.select_scalable` + `prune.count_selection` as Ray tasks (one per shard)
  inproc     the same passes sequentially in this process (no Ray)
  reference  read every row into NumPy, `selection.select_reference` (argsort per class)

Selection = PUMA, ratio 0.3, scope synthetic, per class, eps scale_lowest q=0.1: 20 cut keys.
Measured: wall time of threshold finding + the kept-id/eps pass (no image copy: sample shards
are not generated), and the driver's peak RSS (psutil, sampled every 5 ms) above its RSS just
before the timed section. All three must give the same `selection_digest` of (kept id, eps).

    .venv/bin/python benchmarks/prune.py --rows 1000000 10000000 --shards 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10
PARAMS = {
    "strategy": "puma",
    "ratio": 0.3,
    "scope": "synthetic",
    "per_class": True,
    "eps": 8 / 255,
    "eps_rule": "scale_lowest",
    "eps_quantile": 0.1,
    "eps_scale": 0.5,
}


def generate(out: str, rows: int, shards: int) -> str:
    """Score shards in the `puma-ray score` layout: <dir>/shard=part-XXXXX/0.parquet."""
    d = os.path.join(out, f"scores_{rows}_{shards}")
    done = os.path.join(d, "done.json")
    if os.path.exists(done):
        return d
    per = -(-rows // shards)
    for s in range(shards):
        n = min(per, rows - s * per)
        rng = np.random.default_rng([7, s])
        margin = rng.lognormal(-1.5, 1.0, n).astype(np.float32)
        margin[rng.random(n) < 0.05] = 0.0  # misclassified by the margin model: heavy ties
        real = rng.random(n) < 0.05
        table = pa.table(
            {
                "id": pa.array(np.arange(s * per, s * per + n, dtype=np.int64) + (1 << 40)),
                "label": pa.array(rng.integers(0, CLASSES, n).astype(np.int16)),
                "source": pa.array(np.where(real, "real", "synthetic")),
                "margin": pa.array(margin),
            }
        )
        part = os.path.join(d, f"shard=part-{s:05d}")
        os.makedirs(part, exist_ok=True)
        pq.write_table(table, os.path.join(part, "0.parquet"), compression="zstd")
    with open(done, "w") as f:
        json.dump({"rows": rows, "shards": shards}, f)
    return d


class PeakRSS:
    """Peak resident memory of this process, sampled by a thread."""

    def __init__(self, interval: float = 0.005):
        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child(mode: str, score_dir: str) -> dict:
    sys.path.insert(0, ROOT)
    from puma_ray import prune, selection
    from puma_ray.selection import SelectionParams

    params = SelectionParams(**PARAMS)
    parts = sorted(p for p in os.listdir(score_dir) if p.startswith("shard="))
    shards = [
        prune.ShardInput(p.split("=", 1)[1], os.path.join(score_dir, p), sample=None) for p in parts
    ]
    setup = 0.0
    if mode == "ray":
        import ray

        t = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=512 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        setup = time.perf_counter() - t
    out: dict = {"mode": mode, "setup_s": setup}
    with PeakRSS() as mem:
        start = time.perf_counter()
        if mode in ("ray", "inproc"):
            parallel = mode == "ray"
            _, cuts, passes = prune.select_scalable(shards, params, CLASSES, parallel=parallel)
            out["threshold_s"] = time.perf_counter() - start
            counts = prune.count_selection(shards, params, cuts, CLASSES, parallel=parallel)
            out.update(passes=passes, kept=counts["kept"], digest=counts["digest"])
        else:
            import pyarrow.dataset as pads

            files = [os.path.join(score_dir, p, "0.parquet") for p in parts]
            t = pads.dataset(files, format="parquet").to_table(
                columns=["id", "label", "source", "margin"]
            )
            ids = t.column("id").to_numpy()
            labels = t.column("label").to_numpy()
            synth = np.asarray(
                t.column("source").to_numpy(zero_copy_only=False) == "synthetic", bool
            )
            margins = t.column("margin").to_numpy()
            del t
            ref = selection.select_reference(ids, labels, synth, margins, params)
            out["threshold_s"] = time.perf_counter() - start
            digest = selection.selection_digest(ids[ref.kept], ref.eps[ref.kept])
            out.update(passes=0, kept=int(ref.kept.sum()), digest=f"{digest:016x}")
        out["wall_s"] = time.perf_counter() - start
    out["rss_base_mb"] = mem.base / 2**20
    out["rss_peak_mb"] = mem.peak / 2**20
    out["rss_growth_mb"] = (mem.peak - mem.base) / 2**20
    if mode == "ray":
        import ray

        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["ray", "inproc", "reference"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "prune"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SCORE_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results = []
    for rows in args.rows:
        t = time.perf_counter()
        d = generate(args.out, rows, args.shards)
        print(f"# {rows:,} rows in {args.shards} shards: {d} ({time.perf_counter() - t:.0f}s)")
        for mode in args.modes:
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ROOT}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, d],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            res = {"rows": rows, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(res)
            print(json.dumps(res), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(
        "| rows | path | passes | cuts s | cuts + kept/eps pass s | driver RSS before → peak "
        "(growth) MB | kept | digest |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['mode']} | {r['passes']} | {r['threshold_s']:.1f} | "
            f"{r['wall_s']:.1f} | {r['rss_base_mb']:.0f} → {r['rss_peak_mb']:.0f} "
            f"(+{r['rss_growth_mb']:.0f}) | {r['kept']:,} | {r['digest'][:8]} |"
        )
    digests = {(r["rows"], r["digest"]) for r in results}
    if len(digests) != len({r["rows"] for r in results}):
        sys.exit("selections differ between paths")


if __name__ == "__main__":
    main()
