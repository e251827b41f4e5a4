"""Selection rules for margin-based data pruning: pure NumPy, no Ray, no file I/O.

What lives here (the stage in `puma_ray.prune` only reads shards, runs passes and writes):

* **The exact order.** Rows of a group are ordered by the key (margin, id) ascending, or by
  (hash(seed, id), id) for `random`. A key is a 128-bit unsigned integer: the high 64 bits are
  the order-preserving bit pattern of the float32 margin (or the 64-bit hash), the low 64 bits
  the order-preserving pattern of the int64 id. Ids are unique, so keys are unique and every
  cut "the row of rank r" is one exact key; the tie-break between equal margins is the id.
* **The strategies** as rank intervals per group (`plan_group`): `puma` and `high_margin` keep
  the first n - n_drop rows of the order (drop the highest margins), `low_margin` and `random`
  keep the last n - n_drop, `none` keeps everything.
* **The epsilon rules** (`EPS_RULES`, one entry per rule). The PUMA paper (Maroto & Frossard,
  arXiv 2405.06298) lowers the training epsilon of the lowest-margin samples, but its exact
  rule is not public, so this is a family; adding a rule is one function plus one dict entry.
* **The in-memory reference** `select_reference` (argsort over all rows), and the pieces of the
  scalable exact selection: `shard_stats` (what one shard contributes to a pass) and `find_cuts`
  (the driver's radix select over those passes, O(buckets x targets) memory), then `apply_cuts`
  (kept mask and per-sample epsilon of one shard from the cut keys).
* **k-NN extrapolation** (Nieth et al., arXiv 2406.13283): `extrapolation_subset` and `knn_mean`.

Length: one module on purpose (about a third docstrings): the order, the strategies and the
epsilon rules share the one key encoding, and each rule is read against it here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

STRATEGIES = ("puma", "high_margin", "low_margin", "random", "extrapolated", "none")
M64 = (1 << 64) - 1
KEY_END = 1 << 128  # "+inf": every key is below it
SIGN32 = 0x80000000
SIGN64 = 1 << 63
RANDOM_SALT = 0x5052554E45  # "PRUNE": random pruning and the extrapolation subset use
EXTRAPOLATION_SALT = 0x4558545241  # "EXTRA": independent hashes of the same (seed, id)


# ----------------------------------------------------------------------------------------------
# Keys.


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix64_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash_ids(ids: np.ndarray, seed: int, salt: int = RANDOM_SALT) -> np.ndarray:
    """uint64[n]: a splitmix64 hash of (seed, salt, id). Depends on nothing but these three, so
    any shard can compute its rows' keys alone, on any machine, in any order."""
    s = _mix64_int((_mix64_int(seed & M64) ^ salt) & M64)
    x = np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64)
    return _mix64(x ^ np.uint64(s))


def margin_order_key(margins: np.ndarray) -> np.ndarray:
    """uint64[n] (< 2**32) whose unsigned order is the float order of float32 `margins`.

    -0.0 is mapped to +0.0 so the two tie (as they do in a float sort). NaN is refused by the
    caller: it has no place in an order."""
    m = np.atleast_1d(np.asarray(margins, np.float32)) + np.float32(0.0)  # -0.0 + 0.0 = +0.0
    bits = m.view(np.uint32)
    neg = (bits & np.uint32(SIGN32)) != 0
    return np.where(neg, ~bits, bits | np.uint32(SIGN32)).astype(np.uint64)


def margin_from_order_key(key_hi: int) -> float:
    u = np.uint32(key_hi)
    bits = u ^ np.uint32(SIGN32) if u & np.uint32(SIGN32) else ~u
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def id_order_key(ids: np.ndarray) -> np.ndarray:
    """uint64[n] whose unsigned order is the signed order of int64 `ids`."""
    return np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64) ^ np.uint64(SIGN64)


def row_keys(
    order: str, ids: np.ndarray, margins: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 halves of each row's 128-bit key; `order` is 'margin' or 'hash'."""
    lo = id_order_key(ids)
    if order == "margin":
        if margins is None:
            raise ValueError("the margin order needs margins")
        return margin_order_key(margins), lo
    if order == "hash":
        return hash_ids(ids, seed), lo
    raise ValueError(f"unknown order {order!r}")


def describe_key(key: int, order: str) -> dict:
    """A cut key as the manifest shows it: the margin (or hash) and the id of the cut row."""
    hi, lo = key >> 64, key & M64
    v = lo ^ SIGN64
    out = {"id": v - (1 << 64) if v >= SIGN64 else v}
    if order == "margin":
        out = {"margin": margin_from_order_key(hi), **out}
    else:
        out = {"hash": f"{hi:016x}", **out}
    return out


def keys_below(hi: np.ndarray, lo: np.ndarray, cut: int) -> np.ndarray:
    """bool[n]: key < cut. A cut of 0 selects nothing; KEY_END selects everything."""
    if cut <= 0:
        return np.zeros(len(hi), bool)
    if cut >= KEY_END:
        return np.ones(len(hi), bool)
    c_hi, c_lo = np.uint64(cut >> 64), np.uint64(cut & M64)
    return (hi < c_hi) | ((hi == c_hi) & (lo < c_lo))


def selection_digest(ids: np.ndarray, eps: np.ndarray) -> int:
    """An order-independent fingerprint of a kept set: the sum mod 2**64 of a hash of each kept
    row's (id, float32 eps bits). Shards add their digests, so equal selections made by
    different paths (or shardings) give equal digests."""
    eps_bits = np.atleast_1d(np.asarray(eps, np.float32)).view(np.uint32).astype(np.uint64)
    h = _mix64(np.atleast_1d(np.asarray(ids, np.int64)).view(np.uint64) ^ _mix64(eps_bits))
    return int(h.sum(dtype=np.uint64))


def extrapolation_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool[n]: the rows DeepFool scores under `extrapolated` (Nieth et al.): a row is in the
    subset iff hash(seed, id) < fraction * 2**64. Per-row and deterministic, so the scoring stage
    and the prune stage pick the same rows independently; the subset size is binomial around
    fraction * n."""
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    if fraction >= 1:
        return np.ones(len(ids), bool)
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    threshold = int(_exact(fraction) * (1 << 64))
    return hash_ids(ids, seed, EXTRAPOLATION_SALT) < np.uint64(threshold)


# ----------------------------------------------------------------------------------------------
# Parameters and per-group plans.


def _exact(x: float) -> Fraction:
    """The decimal the user wrote (0.15 -> 3/20), not its binary approximation."""
    return Fraction(repr(float(x)))


def round_half_up(fraction: float, n: int) -> int:
    """floor(fraction * n + 1/2) in exact arithmetic: 0.25 of 10 rows is 3, 0.15 of 10 is 2."""
    return math.floor(_exact(fraction) * n + Fraction(1, 2))


@dataclass(frozen=True)
class SelectionParams:
    """Everything the selection depends on. `strategy` is already resolved (`extrapolated` ->
    its base strategy); `eps_rule` is 'none' for every strategy but `puma`."""

    strategy: str = "puma"  # puma | high_margin | low_margin | random | none
    ratio: float = 0.3  # fraction of each group's in-scope rows dropped, in [0, 1)
    scope: str = "synthetic"  # synthetic: real rows are always kept with the base epsilon
    per_class: bool = True  # one group per class (each class loses the same fraction)
    seed: int = 0  # only `random` uses it
    eps: float = 8 / 255  # base training epsilon, [0, 1] pixel units
    eps_rule: str = "none"
    eps_scale: float = 0.5
    eps_quantile: float = 0.1
    eps_alpha: float = 1.0
    eps_floor: float = 0.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES or self.strategy == "extrapolated":
            raise ValueError(f"unknown resolved strategy {self.strategy!r}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) (got {self.ratio})")
        if self.eps_rule not in EPS_RULES:
            raise ValueError(f"unknown eps_rule {self.eps_rule!r} (have {sorted(EPS_RULES)})")
        if self.eps_rule != "none" and self.order != "margin":
            raise ValueError("epsilon rules need the margin order")

    @property
    def order(self) -> str:
        """'margin' for the margin strategies; 'hash' for random (and none, which cuts nothing)."""
        return "margin" if self.needs_margins else "hash"

    @property
    def needs_margins(self) -> bool:
        return self.strategy in ("puma", "high_margin", "low_margin")

    @classmethod
    def from_config(cls, pruning, base_eps: float) -> SelectionParams:
        """From a `PruningConfig` and the training attack's epsilon."""
        strategy = pruning.strategy
        if strategy == "extrapolated":
            strategy = pruning.extrapolation.base_strategy
        return cls(
            strategy=strategy,
            ratio=pruning.ratio,
            scope=pruning.scope,
            per_class=pruning.per_class,
            seed=pruning.seed,
            eps=float(base_eps),
            eps_rule=pruning.eps_rule if strategy == "puma" else "none",
            eps_scale=pruning.eps_scale,
            eps_quantile=pruning.eps_quantile,
            eps_alpha=pruning.eps_alpha,
            eps_floor=pruning.eps_floor,
        )


def group_index(labels: np.ndarray, is_synthetic: np.ndarray, params: SelectionParams):
    """int64[n]: the selection group of each row (the class if per_class, else 0); -1 for rows
    outside the scope, which are always kept and keep the base epsilon."""
    labels = np.asarray(labels, np.int64)
    groups = labels.copy() if params.per_class else np.zeros(len(labels), np.int64)
    if params.scope == "synthetic":
        groups[~np.asarray(is_synthetic, bool)] = -1
    return groups


@dataclass(frozen=True)
class GroupPlan:
    """Ranks (0-based, in the group's key order) that the selection cuts at.

    Kept rows are those with keep_from <= rank < keep_until; the rows of the eps rule's
    quantile q are the kept rows with rank < eps_ranks[q] (the lowest margins of the kept set)."""

    rows: int
    keep_from: int
    keep_until: int
    eps_ranks: dict[float, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.keep_until - self.keep_from

    def cut_ranks(self) -> list[int]:
        """Ranks whose key must be found (0 and `rows` need no search)."""
        ranks = {self.keep_from, self.keep_until, *self.eps_ranks.values()}
        return sorted(r for r in ranks if 0 < r < self.rows)


def plan_group(rows: int, params: SelectionParams) -> GroupPlan:
    """The cut ranks of one group of `rows` in-scope rows.

    n_drop = round_half_up(ratio * rows) per group (per class, or the whole scope), so a class
    of 15 at ratio 0.3 loses 5 (4.5 rounds up). The eps rule's q-fraction is of the kept rows of
    the group: round_half_up(q * kept) of the lowest-margin kept rows."""
    n_drop = 0 if params.strategy == "none" else round_half_up(params.ratio, rows)
    if params.strategy in ("puma", "high_margin", "none"):
        keep_from, keep_until = 0, rows - n_drop
    else:  # low_margin, random: drop the start of the order
        keep_from, keep_until = n_drop, rows
    eps_ranks = {
        q: keep_from + round_half_up(q, keep_until - keep_from)
        for q in EPS_RULES[params.eps_rule].quantiles(params)
    }
    return GroupPlan(rows, keep_from, keep_until, eps_ranks)


# ----------------------------------------------------------------------------------------------
# Epsilon rules. Each gets the kept in-scope rows of a batch and returns their epsilon.


@dataclass
class EpsInputs:
    rows: int
    margins: np.ndarray | None  # float32[m] of the kept in-scope rows (None if not scored)
    lowest: dict[float, np.ndarray]  # q -> bool[m]: among the lowest q of the kept group
    base: float  # the training epsilon
    params: SelectionParams


def _eps_none(x: EpsInputs) -> np.ndarray:
    return np.full(x.rows, x.base)


def _eps_scale_lowest(x: EpsInputs) -> np.ndarray:
    """The lowest-margin fraction q of the kept set trains with eps * eps_scale."""
    low = x.lowest[x.params.eps_quantile]
    return np.where(low, x.base * x.params.eps_scale, x.base)


def _eps_margin_cap(x: EpsInputs) -> np.ndarray:
    """eps_i = max(floor, min(eps, alpha * margin_i)): a perturbation of the training radius
    must not cross the boundary the margin measured (needs the margin in the attack's norm)."""
    p = x.params
    capped = np.minimum(x.base, p.eps_alpha * x.margins.astype(np.float64))
    return np.maximum(p.eps_floor, capped)


@dataclass(frozen=True)
class EpsRule:
    """`fn` maps EpsInputs to eps per row; `quantiles` names the rank fractions it needs;
    `compares_margin_with_eps`: margins and eps must be in the same norm."""

    fn: Callable[[EpsInputs], np.ndarray]
    quantiles: Callable[[SelectionParams], tuple[float, ...]] = lambda p: ()
    compares_margin_with_eps: bool = False


EPS_RULES: dict[str, EpsRule] = {
    "none": EpsRule(_eps_none),
    "scale_lowest": EpsRule(_eps_scale_lowest, quantiles=lambda p: (p.eps_quantile,)),
    "margin_cap": EpsRule(_eps_margin_cap, compares_margin_with_eps=True),
}


def _eps_for_kept(
    kept_in_scope: np.ndarray,
    margins: np.ndarray | None,
    lowest: dict[float, np.ndarray],
    params: SelectionParams,
) -> np.ndarray:
    if params.eps_rule == "none":
        return np.full(int(kept_in_scope.sum()), params.eps, np.float32)
    inputs = EpsInputs(
        rows=int(kept_in_scope.sum()),
        margins=None if margins is None else margins[kept_in_scope],
        lowest={q: m[kept_in_scope] for q, m in lowest.items()},
        base=params.eps,
        params=params,
    )
    return np.asarray(EPS_RULES[params.eps_rule].fn(inputs), np.float64).astype(np.float32)


def _finish(groups, kept, lowest, margins, params) -> np.ndarray:
    """eps per row: base for out-of-scope rows, the rule for kept in-scope rows, NaN if dropped."""
    eps = np.full(len(kept), np.float32(params.eps), np.float32)
    in_scope = kept & (groups >= 0)
    eps[in_scope] = _eps_for_kept(in_scope, margins, lowest, params)
    eps[~kept] = np.nan
    return eps


# ----------------------------------------------------------------------------------------------
# The in-memory reference.


@dataclass
class Selection:
    """Result for n rows: `kept` bool[n]; `eps` float32[n] (NaN where dropped); the plan of
    each group (key: group index, the class if per_class)."""

    kept: np.ndarray
    eps: np.ndarray
    plans: dict[int, GroupPlan]


def _check_margins(margins: np.ndarray | None, params: SelectionParams) -> None:
    if params.needs_margins and margins is None:
        raise ValueError(f"strategy {params.strategy} needs margins")
    if margins is not None and np.isnan(margins).any():
        raise ValueError("margins contain NaN")


def select_reference(
    ids: np.ndarray,
    labels: np.ndarray,
    is_synthetic: np.ndarray,
    margins: np.ndarray | None,
    params: SelectionParams,
) -> Selection:
    """The selection by a full argsort of each group, all rows in memory: the definition the
    scalable path must reproduce exactly. Orders by (margin, id) with np.lexsort on the float
    values (or by (hash, id) for `random`)."""
    ids = np.asarray(ids, np.int64)
    margins = None if margins is None else np.asarray(margins, np.float32)
    _check_margins(margins, params)
    groups = group_index(labels, is_synthetic, params)
    kept = groups < 0
    lowest = {q: np.zeros(len(ids), bool) for q in EPS_RULES[params.eps_rule].quantiles(params)}
    plans: dict[int, GroupPlan] = {}
    primary = hash_ids(ids, params.seed) if params.order == "hash" else margins
    for g in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero(groups == g)
        plan = plan_group(len(idx), params)
        plans[int(g)] = plan
        rank = np.empty(len(idx), np.int64)
        rank[np.lexsort((ids[idx], primary[idx]))] = np.arange(len(idx))
        kept[idx] = (rank >= plan.keep_from) & (rank < plan.keep_until)
        for q, r in plan.eps_ranks.items():
            lowest[q][idx] = rank < r
    return Selection(kept, _finish(groups, kept, lowest, margins, params), plans)


# ----------------------------------------------------------------------------------------------
# Scalable exact selection: a radix select over the 128-bit keys, pass by pass.
#
# Each pass sends every shard a list of requests (group, fixed leading bits, width). A shard
# answers, per request, over its rows of that group whose key starts with the fixed bits: their
# count, the smallest and largest key, and either a histogram of the next `width` bits or, when
# few enough rows are left (width 0), the keys themselves. The driver merges the answers and, for
# each target rank, narrows to the bucket that holds it, jumping over the bits that all remaining
# candidates share (so a run of equal margins costs one extra pass, on the ids, not 64).


@dataclass(frozen=True)
class Request:
    group: int
    start: int  # leading key bits fixed by `prefix`
    prefix: int  # 128-bit key with only the `start` leading bits set as required
    width: int  # histogram of the next `width` bits; 0 = return the candidate keys


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
    out = []
    for req in requests:
        idx = order[starts[req.group] : starts[req.group + 1]]
        h, l_ = hi[idx], lo[idx]
        m = _prefix_mask(h, l_, req.start, req.prefix)
        h, l_ = h[m], l_[m]
        res: dict = {"count": len(h)}
        if len(h):
            res["min"], res["max"] = _key_min(h, l_), _key_max(h, l_)
            if req.width:
                digits, counts = np.unique(_digit(h, l_, req.start, req.width), return_counts=True)
                res["digits"], res["counts"] = digits, counts
            else:
                res["hi"], res["lo"] = h, l_
        out.append(res)
    return out


class _Merged:
    """The merge of all shards' answers to one pass; memory O(2**width) per request."""

    def __init__(self, requests: Sequence[Request]):
        self.requests = list(requests)
        n = len(self.requests)
        self.count = [0] * n
        self.min: list[int | None] = [None] * n
        self.max: list[int | None] = [None] * n
        self.hist = [np.zeros(1 << r.width, np.int64) if r.width else None for r in requests]
        self.keys: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def add(self, shard_answer: list[dict]) -> None:
        for i, res in enumerate(shard_answer):
            if not res["count"]:
                continue
            self.count[i] += res["count"]
            self.min[i] = res["min"] if self.min[i] is None else min(self.min[i], res["min"])
            self.max[i] = res["max"] if self.max[i] is None else max(self.max[i], res["max"])
            if "digits" in res:
                self.hist[i][res["digits"]] += res["counts"]
            else:
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
    fit) plus at most `collect_limit` candidate keys per target. Returns (plans per non-empty
    group, cut keys per group {'keep_from', 'keep_until', 'eps_<q>' -> key}, passes run).
    """
    first_start = 32 if params.order == "margin" else 0  # margin keys are < 2**32

    def width_for(n_requests: int) -> int:
        return int(np.clip(int(math.log2(max_counters)) - math.ceil(math.log2(n_requests)), 8, 16))

    w0 = width_for(max(1, n_groups))
    first = [Request(g, first_start, 0, w0) for g in range(n_groups)]
    merged = _Merged(first)
    for answer in run_pass(first):
        merged.add(answer)
    passes = 1

    plans = {g: plan_group(merged.count[g], params) for g in range(n_groups) if merged.count[g]}
    targets = [_Target(g, r, 0, plan.rows) for g, plan in plans.items() for r in plan.cut_ranks()]
    for t in targets:
        _narrow(t, merged, t.group, collect_limit)  # first pass: request index = group

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
    lower = max(merged.min[i], bucket_lo)
    upper = min(merged.max[i], bucket_hi)
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
    """(kept bool[n], eps float32[n] with NaN where dropped) for one shard's rows, from the cut
    keys of `find_cuts`. Pure per row given the cuts, so shards are independent."""
    n = len(groups)
    kept = groups < 0
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


# ----------------------------------------------------------------------------------------------
# k-NN extrapolation (Nieth et al., arXiv 2406.13283): an unscored row gets the unweighted mean
# score of its k nearest scored rows, Euclidean distance, exact (brute force) search.


def knn_mean(
    queries: np.ndarray,
    ref: np.ndarray,
    ref_values: np.ndarray,
    k: int,
    *,
    query_block: int = 1024,
    ref_block: int = 8192,
) -> np.ndarray:
    """float32[m]: mean of `ref_values` over each query's k nearest rows of `ref` (float[n, F]).

    Exact search in blocks: memory O(query_block x (ref_block + k)) besides the inputs, time
    O(m x n x F). Squared distances |q|^2 + |r|^2 - 2 q.r in float64 (embeddings are float16, so
    float64 products are exact and the sum is accurate to ~1e-16 relative). With fewer than k
    reference rows, all of them are used."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    m, n = len(queries), len(ref)
    if n == 0:
        raise ValueError("no reference rows to extrapolate from")
    kk = min(k, n)
    ref_values = np.asarray(ref_values, np.float64)
    ref_sq = np.empty(n, np.float64)
    for j in range(0, n, ref_block):
        r = np.asarray(ref[j : j + ref_block], np.float64)
        ref_sq[j : j + len(r)] = np.einsum("ij,ij->i", r, r)
    out = np.empty(m, np.float32)
    for i in range(0, m, query_block):
        q = np.asarray(queries[i : i + query_block], np.float64)
        q_sq = np.einsum("ij,ij->i", q, q)
        best_d = np.full((len(q), 0), np.inf)
        best_i = np.zeros((len(q), 0), np.int64)
        for j in range(0, n, ref_block):
            r = np.asarray(ref[j : j + ref_block], np.float64)
            d = q_sq[:, None] + ref_sq[None, j : j + len(r)] - 2.0 * (q @ r.T)
            np.maximum(d, 0.0, out=d)
            cand_d = np.concatenate([best_d, d], axis=1)
            cand_i = np.concatenate(
                [best_i, np.broadcast_to(np.arange(j, j + len(r)), d.shape)], axis=1
            )
            if cand_d.shape[1] > kk:
                sel = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
                cand_d = np.take_along_axis(cand_d, sel, axis=1)
                cand_i = np.take_along_axis(cand_i, sel, axis=1)
            best_d, best_i = cand_d, cand_i
        out[i : i + len(q)] = ref_values[best_i].mean(axis=1)
    return out
