"""Running functions over the shards: one Ray task per shard when Ray is up (a bounded window of
tasks in flight, task errors re-raised as themselves), else the same calls in this process; on
top of that the radix-select passes that find the exact cut keys (`select_scalable`) and the
counts of a selection without writing it (`count_selection`, `_Totals`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from puma_ray import selection
from puma_ray.errors import DataError, PumaRayError
from puma_ray.prune.shards import SOURCES, STATUSES, ShardInput, _count_task, _pass_task
from puma_ray.selection import SelectionParams


def _use_ray(parallel: bool) -> bool:
    if not parallel:
        return False
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _map(fn: Callable, items: list, args: tuple, use_ray: bool) -> Iterator:
    """Yield fn(item, *args) for each item, in completion order. Under Ray at most ~2 tasks per
    CPU are in flight, so finished results wait in the object store only briefly."""
    if not use_ray:
        for item in items:
            yield fn(item, *args)
        return
    import ray

    # Retrying is safe: passes only read; the write pass publishes each shard by rename.
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    arg_refs = [ray.put(a) if _big(a) else a for a in args]
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(items)
    pending = []
    try:
        while queue or pending:
            while queue and len(pending) < window:
                pending.append(task.remote(queue.pop(0), *arg_refs))
            ready, pending = ray.wait(pending, num_returns=1)
            yield _get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def _big(obj) -> bool:
    return isinstance(obj, dict | list) and len(obj) > 64


def _get(ref):
    """ray.get that re-raises a user error from a task as itself (one line, no remote trace)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PumaRayError):
            raise cause from None
        raise


def select_scalable(
    shards: list[ShardInput],
    params: SelectionParams,
    num_classes: int,
    *,
    parallel: bool = True,
    collect_limit: int = 1 << 16,
    validate: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[dict, dict, int]:
    """Exact cut keys of the selection over `shards`: (plans per group, cuts per group, passes).

    Equal to `selection.select_reference` on all rows at once; see `selection.find_cuts`. The
    first pass also validates each shard (NaN margins, duplicate ids, coverage of the sample
    shard), so bad input fails before anything is written."""
    use_ray = _use_ray(parallel)
    n_groups = num_classes if params.per_class else 1
    state = {"pass": 0}

    def run_pass(requests):
        first = state["pass"] == 0
        state["pass"] += 1
        log(
            f"prune: selection pass {state['pass']}: {len(requests)} requests over "
            f"{len(shards)} shards"
        )
        args = (requests, params, n_groups, num_classes, validate and first)
        yield from _map(_pass_task, shards, args, use_ray)

    try:
        return selection.find_cuts(run_pass, n_groups, params, collect_limit=collect_limit)
    except selection.DuplicateKeyError as e:
        where = os.path.dirname(shards[0].rows) if shards else "?"
        raise DataError(f"{where}: {e} (ids must be unique across shards)") from None


def count_selection(
    shards: list[ShardInput],
    params: SelectionParams,
    cuts: dict,
    num_classes: int,
    *,
    parallel: bool = True,
) -> dict:
    """Kept / eps-adjusted / pruned counts and eps stats of the selection, computed per shard
    without writing (what the write pass computes, for benchmarks and dry runs)."""
    total = _Totals(num_classes)
    for stats in _map(_count_task, shards, (params, cuts, num_classes), _use_ray(parallel)):
        total.add(stats)
    return total.as_dict()


class _Totals:
    def __init__(self, num_classes: int):
        self.counts = np.zeros((num_classes, len(SOURCES), len(STATUSES)), np.int64)
        self.hist = None
        self.flags = None  # per (flag, treatment, status), when the rows have flags
        self.eps_min = None
        self.eps_sum = 0.0
        self.digest = 0
        self.shards: list[dict] = []

    def add(self, stats: dict) -> None:
        self.counts += stats["counts"]
        if "hist" in stats:
            self.hist = stats["hist"] if self.hist is None else self.hist + stats["hist"]
        if "flags" in stats:
            self.flags = stats["flags"] if self.flags is None else self.flags + stats["flags"]
        if stats["eps_min"] is not None:
            m = stats["eps_min"]
            self.eps_min = m if self.eps_min is None else min(self.eps_min, m)
        self.eps_sum += stats["eps_sum"]
        self.digest = (self.digest + stats["digest"]) % (1 << 64)
        if "file" in stats:
            # kept rows per source: training routes each file to its real / synthetic stream
            kept = stats["counts"][:, :, :2].sum(axis=(0, 2))
            per_source = {s: int(kept[i]) for i, s in enumerate(SOURCES)}
            self.shards.append(
                {**{k: stats[k] for k in ("file", "rows", "bytes")}, "rows_per_source": per_source}
            )

    def as_dict(self) -> dict:
        c = self.counts
        kept = int(c[..., :2].sum())
        return {
            "rows": int(c.sum()),
            "kept": kept,
            "pruned": int(c[..., 2].sum()),
            "eps_adjusted": int(c[..., 1].sum()),
            "eps_min": self.eps_min,
            "eps_mean": self.eps_sum / kept if kept else None,
            "digest": f"{self.digest:016x}",  # selection_digest of all kept (id, eps)
        }
