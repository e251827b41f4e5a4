"""The scalable exact selection: a radix select over the 128-bit keys, pass by pass
(`shard_stats` per shard, `find_cuts` on the driver, O(buckets x targets) memory), then
`apply_cuts`, the kept mask and per-sample epsilon of one shard from the cut keys. Equal to
`rules.select_reference` on all rows at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from puma_ray.selection.keys import (
    KEY_END,
    M64,
    TIER_ABOVE,
    TIER_BELOW,
    TIER_NORMAL,
    describe_key,
    keys_below,
)
from puma_ray.selection.rules import (
    EPS_RULES,
    OUT_OF_SCOPE,
    GroupPlan,
    SelectionParams,
    _finish,
    _forced_base,
    forced_counts,
    plan_group,
)

# ----------------------------------------------------------------------------------------------
# Scalable exact selection: a radix select over the 128-bit keys, pass by pass.
#
# Each pass sends every shard a list of requests (group, fixed leading bits, width). A shard
# answers, per request, over its rows of that group whose key starts with the fixed bits: their
# count, the smallest and largest key, and either a histogram of the next `width` bits or, when
# few enough rows are left (width 0), the keys themselves. The first pass also counts each
# group's forced rows (kept at base / dropped by a policy), which its plan needs. The driver
# merges the answers and, for each target rank, narrows to the bucket that holds it, jumping
# over the bits that all remaining candidates share (so a run of equal margins costs one extra
# pass, on the ids, not 64).


@dataclass(frozen=True)
class Request:
    group: int
    start: int  # leading key bits fixed by `prefix`
    prefix: int  # 128-bit key with only the `start` leading bits set as required
    width: int  # histogram of the next `width` bits; 0 = return the candidate keys; -1 neither
    forced: bool = False  # also count the group's rows a policy forced out of the order


def _uint_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _prefix_mask(hi: np.ndarray, lo: np.ndarray, start: int, prefix: int) -> np.ndarray:
    if start == 0:
        return np.ones(len(hi), bool)
    p_hi, p_lo = prefix >> 64, prefix & M64
    if start <= 64:
        s = np.uint64(64 - start)
        return (hi >> s) == np.uint64(p_hi >> (64 - start))
    s = np.uint64(128 - start)
    return (hi == np.uint64(p_hi)) & ((lo >> s) == np.uint64(p_lo >> (128 - start)))


def _digit(hi: np.ndarray, lo: np.ndarray, start: int, width: int) -> np.ndarray:
    """The `width` key bits after the first `start`, as int64."""
    end = start + width
    if end <= 64:
        d = (hi >> np.uint64(64 - end)) & _uint_mask(width)
    elif start >= 64:
        d = (lo >> np.uint64(128 - end)) & _uint_mask(width)
    else:  # straddles the halves
        a, b = 64 - start, end - 64
        d = ((hi & _uint_mask(a)) << np.uint64(b)) | (lo >> np.uint64(64 - b))
    return d.astype(np.int64)


def _key_min(hi: np.ndarray, lo: np.ndarray) -> int:
    h = hi.min()
    return (int(h) << 64) | int(lo[hi == h].min())


def _key_max(hi: np.ndarray, lo: np.ndarray) -> int:
    h = hi.max()
    return (int(h) << 64) | int(lo[hi == h].max())


def group_slices(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): rows of group g are order[starts[g]:starts[g + 1]] (one stable sort,
    so a pass over many classes costs O(n log n), not O(n x classes))."""
    order = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[order], np.arange(n_groups + 1), side="left")
    return order, starts


def shard_stats(
    hi: np.ndarray, lo: np.ndarray, groups: np.ndarray, n_groups: int, requests: Sequence[Request]
) -> list[dict]:
    """One shard's answer to a pass: a dict per request (see the comment above). Small: a sparse
    histogram (at most one entry per row) or at most the candidate rows of that request."""
    order, starts = group_slices(groups, n_groups)
    forced = forced_counts(groups, n_groups) if any(r.forced for r in requests) else None
    out = []
    for req in requests:
        idx = order[starts[req.group] : starts[req.group + 1]]
        h, l_ = hi[idx], lo[idx]
        m = _prefix_mask(h, l_, req.start, req.prefix)
        h, l_ = h[m], l_[m]
        res: dict = {"count": len(h)}
        if req.forced:
            res["base"], res["drop"] = int(forced[0][req.group]), int(forced[1][req.group])
        if len(h):
            res["min"], res["max"] = _key_min(h, l_), _key_max(h, l_)
            if req.width > 0:
                digits, counts = np.unique(_digit(h, l_, req.start, req.width), return_counts=True)
                res["digits"], res["counts"] = digits, counts
            elif req.width == 0:
                res["hi"], res["lo"] = h, l_
        out.append(res)
    return out


class _Merged:
    """The merge of all shards' answers to one pass; memory O(2**width) per request."""

    def __init__(self, requests: Sequence[Request]):
        self.requests = list(requests)
        n = len(self.requests)
        self.count = [0] * n
        self.base = [0] * n
        self.drop = [0] * n
        self.min: list[int | None] = [None] * n
        self.max: list[int | None] = [None] * n
        self.hist = [np.zeros(1 << r.width, np.int64) if r.width > 0 else None for r in requests]
        self.keys: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def add(self, shard_answer: list[dict]) -> None:
        for i, res in enumerate(shard_answer):
            self.base[i] += res.get("base", 0)
            self.drop[i] += res.get("drop", 0)
            if not res["count"]:
                continue
            self.count[i] += res["count"]
            self.min[i] = res["min"] if self.min[i] is None else min(self.min[i], res["min"])
            self.max[i] = res["max"] if self.max[i] is None else max(self.max[i], res["max"])
            if "digits" in res:
                self.hist[i][res["digits"]] += res["counts"]
            elif "hi" in res:
                self.keys[i].append((res["hi"], res["lo"]))


@dataclass
class _Target:
    group: int
    rank: int  # rank in the group's order of the row whose key we want
    before: int  # rows of the group below the candidate range
    count: int  # rows in the candidate range
    start: int = 0
    prefix: int = 0
    width: int = 0
    key: int | None = None


def _common_prefix(lower: int, upper: int) -> int:
    return 128 - (lower ^ upper).bit_length()


class DuplicateKeyError(ValueError):
    """Two rows share a key: an id occurs twice."""


def find_cuts(
    run_pass: Callable[[list[Request]], Iterable[list[dict]]],
    n_groups: int,
    params: SelectionParams,
    *,
    collect_limit: int = 1 << 16,
    max_counters: int = 1 << 20,
) -> tuple[dict[int, GroupPlan], dict[int, dict[str, int]], int]:
    """Exact cut keys per group, from passes over the shards.

    `run_pass(requests)` must yield every shard's `shard_stats` answer. The driver holds one
    merged pass: at most `max_counters` histogram counters (width chosen so that the requests
    fit) plus at most `collect_limit` candidate keys per target. Returns (plans per group with
    in-scope rows, forced ones included; cut keys per group {'keep_from', 'keep_until',
    'eps_<q>' -> key}; passes run).
    """

    def width_for(n_requests: int) -> int:
        return int(np.clip(int(math.log2(max_counters)) - math.ceil(math.log2(n_requests)), 8, 16))

    # The first 32 key bits of a margin key are its rank tier. The first pass histograms the
    # normal tier's margin bits and only counts and bounds the (rare) other tiers, so the
    # policies cost no resolution; a cut that falls into another tier starts from its bounds.
    if params.order == "margin":
        tiered = params.nonconverged in ("rank_last", "rank_first")
        segments = [TIER_BELOW, TIER_NORMAL, TIER_ABOVE] if tiered else [TIER_NORMAL]
        start = 32
    else:
        segments, start = [TIER_NORMAL], 0
    w0 = width_for(max(1, n_groups))
    first, index = [], {}
    for g in range(n_groups):
        for tier in segments:
            normal = tier == TIER_NORMAL
            prefix = tier << 96 if start else 0
            index[(g, tier)] = len(first)
            first.append(Request(g, start, prefix, w0 if normal else -1, forced=normal))
    merged = _Merged(first)
    for answer in run_pass(first):
        merged.add(answer)
    passes = 1

    plans = {}
    for g in range(n_groups):
        rows = sum(merged.count[index[(g, tier)]] for tier in segments)
        i = index[(g, TIER_NORMAL)]
        if rows + merged.base[i] + merged.drop[i]:
            plans[g] = plan_group(rows, params, merged.base[i], merged.drop[i])
    targets = []
    for g, plan in plans.items():
        for r in plan.cut_ranks():
            before = 0
            for tier in segments:  # the tier segment that holds rank r
                i = index[(g, tier)]
                if r < before + merged.count[i]:
                    break
                before += merged.count[i]
            t = _Target(g, r, before, merged.count[i])
            if merged.requests[i].width > 0:
                _narrow(t, merged, i, collect_limit)
            else:
                _bound(t, merged.min[i], merged.max[i], collect_limit)
            targets.append(t)

    while any(t.key is None for t in targets):
        active = [t for t in targets if t.key is None]
        width = width_for(len(active))
        reqs: dict[Request, list[_Target]] = {}
        for t in active:
            req = Request(t.group, t.start, t.prefix, min(t.width and width, 128 - t.start))
            reqs.setdefault(req, []).append(t)
        requests = list(reqs)
        merged = _Merged(requests)
        for answer in run_pass(requests):
            merged.add(answer)
        passes += 1
        for i, req in enumerate(requests):
            for t in reqs[req]:
                if req.width == 0:
                    _collect(t, merged, i)
                else:
                    _narrow(t, merged, i, collect_limit)

    found = {(t.group, t.rank): t.key for t in targets}

    def key(g: int, rank: int) -> int:
        return 0 if rank <= 0 else KEY_END if rank >= plans[g].rows else found[(g, rank)]

    cuts = {
        g: {
            "keep_from": key(g, plan.keep_from),
            "keep_until": key(g, plan.keep_until),
            **{f"eps_{q}": key(g, r) for q, r in plan.eps_ranks.items()},
        }
        for g, plan in plans.items()
    }
    return plans, cuts, passes


def _narrow(t: _Target, merged: _Merged, i: int, collect_limit: int) -> None:
    """Move target `t` into the histogram bucket of `merged` request `i` that holds its
    rank, then fix every leading bit the remaining candidates share."""
    req = merged.requests[i]
    if merged.count[i] != t.count:
        raise RuntimeError(
            f"pass saw {merged.count[i]} candidate rows, expected {t.count}: the "
            "inputs changed while selecting"
        )
    hist = merged.hist[i]
    cum = np.cumsum(hist)
    local = t.rank - t.before
    b = int(np.searchsorted(cum, local, side="right"))
    t.before += int(cum[b - 1]) if b else 0
    t.count = int(hist[b])
    shift = 128 - req.start - req.width
    bucket_lo = req.prefix | (b << shift)
    bucket_hi = bucket_lo | ((1 << shift) - 1)
    _bound(t, max(merged.min[i], bucket_lo), min(merged.max[i], bucket_hi), collect_limit)


def _bound(t: _Target, lower: int, upper: int, collect_limit: int) -> None:
    """`t`'s t.count candidates lie in [lower, upper]: fix the leading bits they share, then
    collect them next pass (few enough) or histogram the bits after (width set per pass)."""
    if t.count == 1 and lower == upper:
        t.key = lower
        return
    t.start = _common_prefix(lower, upper)
    if t.start == 128:
        raise DuplicateKeyError(f"id {describe_key(lower, 'hash')['id']} occurs twice")
    t.prefix = (lower >> (128 - t.start)) << (128 - t.start) if t.start else 0
    t.width = 0 if t.count <= collect_limit else 1  # 1: "histogram", width set per pass


def _collect(t: _Target, merged: _Merged, i: int) -> None:
    parts = merged.keys[i]
    hi = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
    lo = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    if len(hi) != merged.count[i] or merged.count[i] != t.count:
        raise RuntimeError("candidate rows changed between passes: the inputs changed")
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    if same.any():
        j = int(np.flatnonzero(same)[0])
        raise DuplicateKeyError(
            f"id {describe_key((int(hi[j]) << 64) | int(lo[j]), 'hash')['id']} occurs twice"
        )
    j = t.rank - t.before
    t.key = (int(hi[j]) << 64) | int(lo[j])


def apply_cuts(
    hi: np.ndarray,
    lo: np.ndarray,
    groups: np.ndarray,
    margins: np.ndarray | None,
    cuts: dict[int, dict[str, int]],
    params: SelectionParams,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept bool[n], eps float32[n] with NaN where dropped) for one shard's rows (`hi`, `lo`,
    `groups` from `selection_rows`), from the cut keys of `find_cuts`. Pure per row given the
    cuts, so shards are independent."""
    n = len(groups)
    kept = (groups == OUT_OF_SCOPE) | _forced_base(groups)
    quantiles = EPS_RULES[params.eps_rule].quantiles(params)
    lowest = {q: np.zeros(n, bool) for q in quantiles}
    order, starts = group_slices(groups, max(cuts, default=-1) + 1)
    for g, c in cuts.items():
        idx = order[starts[g] : starts[g + 1]]
        h, l_ = hi[idx], lo[idx]
        kept[idx] = ~keys_below(h, l_, c["keep_from"]) & keys_below(h, l_, c["keep_until"])
        for q in quantiles:
            lowest[q][idx] = keys_below(h, l_, c[f"eps_{q}"])
    return kept, _finish(groups, kept, lowest, margins, params)
