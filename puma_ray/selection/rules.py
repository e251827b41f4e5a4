"""What the selection decides, given the order: the parameters, the groups and the row
policies, the per-group plan (which ranks are cut), the epsilon rules, and the in-memory
reference `select_reference` that the scalable path (`radix`) must reproduce exactly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from puma_ray.selection.keys import (
    TIER_ABOVE,
    TIER_BELOW,
    TIER_NORMAL,
    _exact,
    hash_ids,
    row_keys,
)

STRATEGIES = ("puma", "high_margin", "low_margin", "random", "extrapolated", "none")
MISCLASSIFIED_POLICIES = ("eps_rule", "drop", "base_eps")
NONCONVERGED_POLICIES = ("rank_last", "rank_first", "exclude", "as_is")
# Group codes besides 0..G-1 (ranked in group g): out of scope, and rows a policy forced out of
# the order of group g, which still count in its size: -2 - 2g kept at the base epsilon,
# -3 - 2g dropped.
OUT_OF_SCOPE = -1
FORCED_BASE, FORCED_DROP = 0, 1


# ----------------------------------------------------------------------------------------------
# Parameters and per-group plans.


def round_half_up(fraction: float, n: int) -> int:
    """floor(fraction * n + 1/2) in exact arithmetic: 0.25 of 10 rows is 3, 0.15 of 10 is 2."""
    return math.floor(_exact(fraction) * n + Fraction(1, 2))


@dataclass(frozen=True)
class SelectionParams:
    """Everything the selection depends on. `strategy` is already resolved (`extrapolated` ->
    its base strategy); `eps_rule` is 'none' for every strategy but `puma`; the row policies
    are 'eps_rule' / 'as_is' (no policy: the row is ranked by its recorded margin) for the
    strategies that do not order by margin."""

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
    misclassified: str = "eps_rule"  # eps_rule | drop | base_eps
    nonconverged: str = "as_is"  # rank_last | rank_first | exclude | as_is

    def __post_init__(self):
        if self.strategy not in STRATEGIES or self.strategy == "extrapolated":
            raise ValueError(f"unknown resolved strategy {self.strategy!r}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) (got {self.ratio})")
        if self.eps_rule not in EPS_RULES:
            raise ValueError(f"unknown eps_rule {self.eps_rule!r} (have {sorted(EPS_RULES)})")
        if self.eps_rule != "none" and self.order != "margin":
            raise ValueError("epsilon rules need the margin order")
        if self.misclassified not in MISCLASSIFIED_POLICIES:
            raise ValueError(f"unknown misclassified policy {self.misclassified!r}")
        if self.nonconverged not in NONCONVERGED_POLICIES:
            raise ValueError(f"unknown nonconverged policy {self.nonconverged!r}")
        if self.uses_flags and self.order != "margin":
            raise ValueError("the misclassified / nonconverged policies need the margin order")

    @property
    def uses_flags(self) -> bool:
        """Whether the selection reads each row's misclassified and converged flags."""
        return self.misclassified != "eps_rule" or self.nonconverged != "as_is"

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
        by_margin = strategy in ("puma", "high_margin", "low_margin")
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
            misclassified=pruning.misclassified if by_margin else "eps_rule",
            nonconverged=pruning.nonconverged if by_margin else "as_is",
        )


def group_index(labels: np.ndarray, is_synthetic: np.ndarray, params: SelectionParams):
    """int64[n]: the selection group of each row (the class if per_class, else 0); -1 for rows
    outside the scope, which are always kept and keep the base epsilon."""
    labels = np.asarray(labels, np.int64)
    groups = labels.copy() if params.per_class else np.zeros(len(labels), np.int64)
    if params.scope == "synthetic":
        groups[~np.asarray(is_synthetic, bool)] = OUT_OF_SCOPE
    return groups


def forced_code(groups: np.ndarray, kind: int) -> np.ndarray:
    """The group code of a row of group `groups` forced out of the order (FORCED_BASE: kept
    at the base epsilon, FORCED_DROP: dropped); negative, so `groups >= 0` are the ranked rows."""
    return -2 - 2 * np.asarray(groups, np.int64) - kind


def forced_counts(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept-at-base counts, dropped counts) per group: int64[n_groups] each."""
    codes = -np.asarray(groups, np.int64)[groups <= -2] - 2
    c = np.bincount(codes, minlength=2 * n_groups)[: 2 * n_groups]
    return c[FORCED_BASE::2], c[FORCED_DROP::2]


def _forced_base(groups: np.ndarray) -> np.ndarray:
    return (groups <= -2) & ((-groups) % 2 == FORCED_BASE)


def apply_policies(
    groups: np.ndarray,
    misclassified: np.ndarray | None,
    converged: np.ndarray | None,
    params: SelectionParams,
) -> tuple[np.ndarray, np.ndarray]:
    """(group codes, rank tier uint64[n]) after `pruning.misclassified` / `nonconverged`.

    `groups` from `group_index`; `misclassified` (pred != label) and `converged` bool[n], None
    meaning "no row" / "every row" (rows whose flags are unknown count as correctly classified
    and converged). Only in-scope rows are touched. The misclassified policy comes first: it
    rests on a fact (the prediction), not on an estimate. Then, for rows still ranked, the
    non-converged policy: a non-converged margin's size is a lower bound (DeepFool stopped
    before reaching the boundary), so `rank_last` ranks a correctly classified row above every
    converged row and a misclassified one (signed margin: an upper bound below zero) below
    every converged row, each tier ordered by the recorded margin, then id; `rank_first` ranks
    every non-converged row below every converged row; `exclude` keeps it at the base epsilon,
    outside the order."""
    groups = np.asarray(groups, np.int64)
    tier = np.full(len(groups), TIER_NORMAL, np.uint64)
    if not params.uses_flags:
        return groups, tier
    n = len(groups)
    mis = np.zeros(n, bool) if misclassified is None else np.asarray(misclassified, bool)
    nc = np.zeros(n, bool) if converged is None else ~np.asarray(converged, bool)
    out = groups.copy()
    in_scope = groups >= 0
    if params.misclassified in ("drop", "base_eps"):
        kind = FORCED_DROP if params.misclassified == "drop" else FORCED_BASE
        sel = in_scope & mis
        out[sel] = forced_code(groups[sel], kind)
    nc &= out >= 0  # still ranked
    if params.nonconverged == "exclude":
        out[nc] = forced_code(groups[nc], FORCED_BASE)
    elif params.nonconverged == "rank_last":
        tier[nc & ~mis] = TIER_ABOVE
        tier[nc & mis] = TIER_BELOW
    elif params.nonconverged == "rank_first":
        tier[nc] = TIER_BELOW
    return out, tier


def selection_rows(
    ids: np.ndarray,
    labels: np.ndarray,
    is_synthetic: np.ndarray,
    margins: np.ndarray | None,
    params: SelectionParams,
    *,
    misclassified: np.ndarray | None = None,
    converged: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, group codes): what one shard's rows are to the selection, the input of
    `shard_stats` and `apply_cuts`."""
    groups, tier = apply_policies(
        group_index(labels, is_synthetic, params), misclassified, converged, params
    )
    hi, lo = row_keys(params.order, ids, margins, params.seed, tier)
    return hi, lo, groups


@dataclass(frozen=True)
class GroupPlan:
    """Ranks (0-based, in the group's key order) that the selection cuts at.

    `rows` is the number of ranked rows (the order's length); `base` and `drop` count the rows a
    policy forced out of the order (kept at the base epsilon / dropped), which are part of the
    group all the same. Kept ranked rows are those with keep_from <= rank < keep_until; the
    rows of the eps rule's quantile q are the kept rows with rank < eps_ranks[q] (the lowest
    margins of the kept set)."""

    rows: int
    keep_from: int
    keep_until: int
    eps_ranks: dict[float, int] = field(default_factory=dict)
    base: int = 0
    drop: int = 0

    @property
    def in_scope(self) -> int:
        return self.rows + self.base + self.drop

    @property
    def kept(self) -> int:
        return self.keep_until - self.keep_from + self.base

    @property
    def pruned(self) -> int:
        return self.in_scope - self.kept

    def cut_ranks(self) -> list[int]:
        """Ranks whose key must be found (0 and `rows` need no search)."""
        ranks = {self.keep_from, self.keep_until, *self.eps_ranks.values()}
        return sorted(r for r in ranks if 0 < r < self.rows)


def plan_group(rows: int, params: SelectionParams, base: int = 0, drop: int = 0) -> GroupPlan:
    """The cut ranks of one group: `rows` ranked rows plus `base` / `drop` rows a policy keeps
    at the base epsilon / drops.

    The group has n = rows + base + drop in-scope rows and loses n_drop = round_half_up(ratio *
    n) (per class, or the whole scope), so a class of 15 at ratio 0.3 loses 5 (4.5 rounds up).
    The forced drops count toward n_drop; the rest comes from the ranked rows (none if the
    forced drops exceed n_drop; all of them if the forced kept rows leave too few). The eps
    rule's q-fraction is of all kept rows of the group: round_half_up(q * kept) of the
    lowest-ranked kept rows (at most every kept ranked row). Without forced rows: n_drop of the
    order and q of its kept rows, as if there were no policies."""
    n = rows + base + drop
    n_drop = 0 if params.strategy == "none" else round_half_up(params.ratio, n)
    ranked_drop = min(rows, max(0, n_drop - drop))
    if params.strategy in ("puma", "high_margin", "none"):
        keep_from, keep_until = 0, rows - ranked_drop
    else:  # low_margin, random: drop the start of the order
        keep_from, keep_until = ranked_drop, rows
    kept_ranked = keep_until - keep_from
    eps_ranks = {
        q: keep_from + min(kept_ranked, round_half_up(q, kept_ranked + base))
        for q in EPS_RULES[params.eps_rule].quantiles(params)
    }
    return GroupPlan(rows, keep_from, keep_until, eps_ranks, base, drop)


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
    """eps per row: base for out-of-scope rows and rows a policy keeps at the base epsilon, the
    rule for kept ranked rows, NaN if dropped."""
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
    *,
    misclassified: np.ndarray | None = None,
    converged: np.ndarray | None = None,
) -> Selection:
    """The selection by a full argsort of each group, all rows in memory: the definition the
    scalable path must reproduce exactly. Orders by (tier, margin, id) with np.lexsort on the
    float values (or by (hash, id) for `random`); `misclassified` / `converged` (bool[n] or
    None) are the flags the row policies read (`apply_policies`)."""
    ids = np.asarray(ids, np.int64)
    margins = None if margins is None else np.asarray(margins, np.float32)
    _check_margins(margins, params)
    scope_groups = group_index(labels, is_synthetic, params)
    groups, tier = apply_policies(scope_groups, misclassified, converged, params)
    kept = (groups == OUT_OF_SCOPE) | _forced_base(groups)
    lowest = {q: np.zeros(len(ids), bool) for q in EPS_RULES[params.eps_rule].quantiles(params)}
    plans: dict[int, GroupPlan] = {}
    primary = hash_ids(ids, params.seed) if params.order == "hash" else margins
    for g in np.unique(scope_groups[scope_groups >= 0]):
        idx = np.flatnonzero(groups == g)
        base = int((groups == forced_code(g, FORCED_BASE)).sum())
        drop = int((groups == forced_code(g, FORCED_DROP)).sum())
        plan = plan_group(len(idx), params, base, drop)
        plans[int(g)] = plan
        rank = np.empty(len(idx), np.int64)
        rank[np.lexsort((ids[idx], primary[idx], tier[idx]))] = np.arange(len(idx))
        kept[idx] = (rank >= plan.keep_from) & (rank < plan.keep_until)
        for q, r in plan.eps_ranks.items():
            lowest[q][idx] = rank < r
    return Selection(kept, _finish(groups, kept, lowest, margins, params), plans)
