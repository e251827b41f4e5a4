"""Connecting to Ray the way Ray users expect: RAY_ADDRESS or --address joins a cluster, else a new
local instance sized by the config. Stage modules call `ensure_ray(cfg.ray)` and nothing else.

Before a stage asks Ray for workers or actors it calls `check_feasible` with what it will ask
for, so a request no node of the cluster (nor any node type its autoscaler can launch) could
ever hold stops at once with one line, instead of waiting forever."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from puma_ray.config import PipelineConfig, RayConfig
from puma_ray.errors import PumaRayError


def ensure_ray(ray_cfg: RayConfig) -> None:
    """Initialise Ray once per process (idempotent, so stages can be chained in one driver),
    and set the Ray Data options the stages rely on, also when the caller started Ray."""
    import ray

    if not ray.is_initialized():
        _init(ray_cfg)
    from puma_ray import logs

    logs.attach_ray()  # a quiet session's routing of Ray's loggers and worker output
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


# ----------------------------------------------------------------------------------------------
# Can the cluster ever meet a request?


SKIP_ENV = "PUMA_RAY_SKIP_RESOURCE_CHECK"


class InfeasibleResources(PumaRayError):
    """A stage asks for resources that no node of the cluster, nor any node type it can launch,
    could ever provide; Ray would wait for them forever."""


# What each stage asks Ray for: one bundle per worker or actor, and how many must run at once.


def train_request(ray_cfg: RayConfig) -> tuple[dict[str, float], int]:
    """A Ray Train run: `num_workers` workers of `cpus_per_worker` CPUs (+ 1 GPU with use_gpu);
    nothing with `num_workers: 0` (the loop runs in the driver)."""
    bundle = {"CPU": ray_cfg.cpus_per_worker, "GPU": 1.0 if ray_cfg.use_gpu else 0.0}
    return bundle, ray_cfg.num_workers


def score_request(cfg: PipelineConfig) -> tuple[dict[str, float], int]:
    """The scoring pool: at least `pool_min` actors of `cpus_per_actor` CPUs and
    `gpus_per_actor` GPUs (one GPU each with ray.use_gpu, as `run_score` makes it)."""
    s = cfg.scoring
    gpus = 1.0 if cfg.ray.use_gpu and s.gpus_per_actor == 0 else s.gpus_per_actor
    return {"CPU": s.cpus_per_actor, "GPU": gpus}, s.pool_min


def stage_requests(cfg: PipelineConfig) -> dict[str, tuple[dict[str, float], int]]:
    """What the Ray stages of `puma-ray run` ask for (margin model, score, train; the margin
    model is trained with the same ray section). Ingest and prune use 1-CPU tasks, evaluate runs
    in the driver."""
    return {
        "margin_model": train_request(cfg.ray),
        "score": score_request(cfg),
        "train": train_request(cfg.ray),
    }


def _wanted(bundle: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in bundle.items() if v and v > 0}


def _fits(capacity: dict[str, float], bundle: dict[str, float]) -> float:
    """How many `bundle`s one node of `capacity` holds (inf for an empty bundle)."""
    n = math.inf
    for key, amount in bundle.items():
        # a small tolerance: Ray's fractional resources are fixed-point, 0.1 * 10 must fit
        n = min(n, math.floor(capacity.get(key, 0.0) / amount + 1e-9))
    return n


def _shape(resources: dict[str, float], keys) -> str:
    shown = [k for k in ("CPU", "GPU") if k in keys or resources.get(k)] + [
        k for k in sorted(keys) if k not in ("CPU", "GPU")
    ]
    return "{" + ", ".join(f"{k}: {resources.get(k, 0):g}" for k in shown) + "}"


def infeasibility(
    request: dict[str, float],
    what: str,
    count: int = 1,
    *,
    nodes: list[dict[str, float]] | None = None,
    node_types: list[dict[str, Any]] | None = None,
) -> str | None:
    """None if `count` bundles of `request` ({"CPU": 10, "GPU": 1}) fit on the cluster, each
    on one node; else one line naming the request and what exists. The capacity counted is the
    alive nodes' totals (each bundle must fit on one node, as Ray places it) plus, on an
    autoscaling cluster, every node type its autoscaler may launch up to its `max_workers`
    (an optimistic bound: a request refused here can never be scheduled). Whether those
    resources are free now, and cluster-wide caps (`max_resources`), are not checked.

    `nodes` / `node_types` (for tests) default to the running cluster's: `ray.nodes()` and
    `_launchable_node_types` (none on a local instance, so only its node counts there; unknown
    node types skip the check, as does PUMA_RAY_SKIP_RESOURCE_CHECK=1)."""
    bundle = _wanted(request)
    if count <= 0 or not bundle:
        return None
    if os.environ.get(SKIP_ENV) == "1":
        return None
    if nodes is None:
        nodes = _alive_nodes()
    if node_types is None:
        node_types = _launchable_node_types()
        if node_types is None:  # an autoscaler whose node types do not say what they hold
            return None
    capacity = sum(_fits(n, bundle) for n in nodes)
    for t in node_types:
        per_node = _fits(t["resources"], bundle)
        if per_node > 0:
            capacity += per_node * (math.inf if t["max_count"] < 0 else t["max_count"])
    if capacity >= count:
        return None
    keys = set(bundle)
    shapes: dict[str, int] = {}
    for n in nodes:
        shapes[_shape(n, keys)] = shapes.get(_shape(n, keys), 0) + 1
    have = ", ".join(f"{c} x {s}" for s, c in shapes.items()) or "no nodes"
    launch = f"; it can launch no other nodes that Ray reports ({SKIP_ENV}=1 skips this check)"
    if node_types:
        launch = "; it can launch " + ", ".join(
            f"{t['name']} {_shape(t['resources'], keys)} x "
            f"{'unlimited' if t['max_count'] < 0 else t['max_count']}"
            for t in node_types
        )
    need = f"{count} x {_shape(bundle, keys)}" if count > 1 else _shape(bundle, keys)
    held = "" if capacity == 0 else f" (room for {capacity:g})"
    return (
        f"{what}: needs {need}, which this Ray cluster can never provide{held}: it has "
        f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}: {have}{launch}"
    )


def check_feasible(request: dict[str, float], what: str, count: int = 1, hint: str = "") -> None:
    """Raise InfeasibleResources (one line, + `hint`, e.g. the settings to change) when
    `infeasibility` finds the request impossible. Ray must be initialised."""
    msg = infeasibility(request, what, count)
    if msg is not None:
        raise InfeasibleResources(f"{msg}{'; ' + hint if hint else ''}")


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _launchable_node_types() -> list[dict[str, Any]] | None:
    """The node types an autoscaler may add (name, resources, max_count; -1: unlimited): from
    the cluster config autoscaler v2 reports to the GCS (what Ray Data reads), else from the
    `ray up` autoscaler's `~/ray_bootstrap_config.yaml` (on the head node, where a job's driver
    runs); [] when neither exists (a local instance, a fixed cluster); None when a type's
    resources are not written there (then nothing can be concluded). Both are Ray internals, so
    a failure to read them counts as "none"; PUMA_RAY_SKIP_RESOURCE_CHECK=1 skips the check."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:
        config = None
    if config and config.node_group_configs:
        return [
            {"name": g.name, "resources": dict(g.resources), "max_count": int(g.max_count)}
            for g in config.node_group_configs
            if g.resources and g.max_count != 0
        ]
    return _bootstrap_node_types(os.path.expanduser(BOOTSTRAP_CONFIG))


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def _bootstrap_node_types(path: str) -> list[dict[str, Any]] | None:
    """The worker node types of a `ray up` cluster config (`available_node_types`), [] if the
    file is absent or unreadable, None if a type that can be launched lists no resources."""
    try:
        import yaml

        with open(path) as f:
            config = yaml.safe_load(f) or {}
        types = config.get("available_node_types") or {}
        head = config.get("head_node_type")
    except Exception:  # absent, unreadable, not YAML, not a mapping: no node types known
        return []
    out = []
    for name, t in types.items():
        if name == head or not isinstance(t, dict) or int(t.get("max_workers", 0) or 0) <= 0:
            continue
        if not t.get("resources"):
            return None
        out.append({"name": name, "resources": dict(t["resources"]), "max_count": t["max_workers"]})
    return out
