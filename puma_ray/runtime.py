"""Connecting to Ray the way Ray users expect: RAY_ADDRESS or --address joins a cluster, else a new
local instance sized by the config. Stage modules call `ensure_ray(cfg.ray)` and nothing else."""

from __future__ import annotations

import os
import sys

from puma_ray.config import RayConfig


def ensure_ray(ray_cfg: RayConfig) -> None:
    """Initialise Ray once per process (idempotent, so stages can be chained in one driver),
    and set the Ray Data options the stages rely on, also when the caller started Ray."""
    import ray

    if not ray.is_initialized():
        _init(ray_cfg)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's bars help at a terminal; in job logs (not a TTY) the stages print rate lines.
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Hash shuffles default to 200 partitions, which dominates run time on small machines.
    ctx.default_hash_shuffle_parallelism = max(4, int(ray.cluster_resources().get("CPU", 4)))
    # Parquet's V2 reader starts a pool of footer-reading actors (32 by default) for every
    # execution, i.e. every training epoch of every stream: 3.0 s per pass of 6,000 rows on
    # 2 CPUs against 0.44 s for V1 (docs/benchmarks.md). Our stages pass explicit file
    # lists, so V1 loses nothing. The setting is read when a dataset is created, here.
    ctx.use_datasource_v2 = False
    # training starts an execution per epoch and stream; each would log its plan at INFO
    ctx.print_on_execution_start = False


def read_parquet(paths, **kwargs):
    """`ray.data.read_parquet` that verifies every page's CRC, as the project's other readers
    do (the shards are written with page checksums): without it a flipped byte in a shard is
    read silently as a different image. Score and train read their shards through this.

    The option travels as the scan's `fragment_scan_options`, which the V1 Parquet datasource
    (the one `ensure_ray` selects) hands to every fragment read; the buffered-stream settings
    are the ones Ray would otherwise pass there itself."""
    import pyarrow.dataset as pds
    import ray

    options = pds.ParquetFragmentScanOptions(
        page_checksum_verification=True, use_buffered_stream=True, buffer_size=8 * 2**20
    )
    return ray.data.read_parquet(paths, fragment_scan_options=options, **kwargs)


def is_checksum_error(e: BaseException) -> bool:
    """Whether `e` (or the Ray error wrapping it) is a failed Parquet page checksum."""
    return "checksum verification failed" in str(e)


def _init(ray_cfg: RayConfig) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster decides its own resources; passing num_cpus to an existing cluster is an error.
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" forces a fresh instance even if a stale /tmp/ray cluster file exists.
        ray.init(
            address="local",
            num_cpus=ray_cfg.num_cpus,
            object_store_memory=ray_cfg.object_store_memory,
            log_to_driver=True,
        )
