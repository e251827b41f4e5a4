"""Selection rules in pure NumPy: key order, strategies, epsilon rules, the row policies
(misclassified / non-converged rows), the exact radix select against the argsort reference
(ties, per class, scope, every strategy and policy), invariance under a permutation of the ids,
the extrapolation subsets and `knn_mean`; the k-NN estimates: tests/test_extrapolation.py."""

import itertools

import numpy as np
import pytest

from puma_ray import selection as sel
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.selection import SelectionParams

EPS = 8 / 255


def _rows(n, *, zeros=0.5, classes=4, seed=0):
    """Shuffled ids, labels, ~70% synthetic, exponential margins with many exact ties."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 7 + (1 << 40))
    labels = rng.integers(0, classes, n)
    synth = rng.random(n) < 0.7
    margins = rng.exponential(0.05, n).astype(np.float32)
    margins[rng.random(n) < zeros] = 0.0
    margins[rng.random(n) < 0.05] = -0.0  # must tie with +0.0
    margins[rng.random(n) < 0.1] = np.float32(0.125)  # a tie run away from zero
    return ids, labels, synth, margins


def _scalable(
    ids, labels, synth, margins, params, *, classes=4, shards=5, limit=1 << 16, mis=None, conv=None
):
    """find_cuts + apply_cuts over `shards` slices, as the stage runs them (minus I/O)."""
    parts = np.array_split(np.arange(len(ids)), shards)
    n_groups = classes if params.per_class else 1

    def keys(s):
        m = None if margins is None else margins[s]
        return sel.selection_rows(
            ids[s], labels[s], synth[s], m, params,
            misclassified=None if mis is None else mis[s],
            converged=None if conv is None else conv[s],
        )  # fmt: skip

    def run_pass(requests):
        for s in parts:
            yield sel.shard_stats(*keys(s), n_groups, requests)

    plans, cuts, passes = sel.find_cuts(run_pass, n_groups, params, collect_limit=limit)
    kept = np.zeros(len(ids), bool)
    eps = np.zeros(len(ids), np.float32)
    for s in parts:
        m = None if margins is None else margins[s]
        kept[s], eps[s] = sel.apply_cuts(*keys(s), m, cuts, params)
    return kept, eps, plans, passes


# ----------------------------------------------------------------------------------------------
# Keys and counts.


def test_margin_key_order_matches_float_order_with_zero_ties():
    m = np.array([3.0, -1.0, 0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30, 0.5], np.float32)
    keys = sel.margin_order_key(m)
    assert keys.dtype == np.uint64 and keys.max() < 2**32
    assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(m, kind="stable"))
    assert keys[2] == keys[3]  # -0.0 ties with +0.0
    for k, v in zip(keys, m, strict=True):
        assert sel.margin_from_order_key(int(k)) == v


def test_id_key_order_and_describe_roundtrip():
    ids = np.array([-(2**63), -5, 0, 7, 2**40 + 3, 2**63 - 1], np.int64)
    lo = sel.id_order_key(ids)
    assert np.all(np.diff(lo.astype(object)) > 0)
    hi, lo = sel.row_keys("margin", ids, np.full(len(ids), 0.25, np.float32), 0)
    for i, key_hi, key_lo in zip(ids, hi, lo, strict=True):
        key = (int(key_hi) << 64) | int(key_lo)
        assert sel.describe_key(key, "margin") == {"margin": 0.25, "id": int(i)}
    # a rank tier is named; the margin is read without it
    tier = np.array([sel.TIER_ABOVE], np.uint64)
    hi, lo = sel.row_keys("margin", ids[:1], np.array([-0.5], np.float32), 0, tier)
    key = (int(hi[0]) << 64) | int(lo[0])
    assert sel.describe_key(key, "margin") == {
        "margin": -0.5, "id": int(ids[0]), "tier": "above_converged"
    }


@pytest.mark.parametrize(
    "fraction,n,want", [(0.25, 10, 3), (0.15, 10, 2), (0.3, 10, 3), (0.0, 99, 0), (0.5, 3, 2)]
)
def test_round_half_up_uses_the_written_decimal(fraction, n, want):
    assert sel.round_half_up(fraction, n) == want


def test_plan_group_per_strategy():
    def plan(strategy, rule="none"):
        return sel.plan_group(10, SelectionParams(strategy=strategy, ratio=0.3, eps_rule=rule))

    assert (plan("high_margin").keep_from, plan("high_margin").keep_until) == (0, 7)
    assert (plan("low_margin").keep_from, plan("low_margin").keep_until) == (3, 10)
    assert (plan("random").keep_from, plan("random").keep_until) == (3, 10)
    assert (plan("none").keep_from, plan("none").keep_until) == (0, 10)
    # q = 0.1 of the 7 kept rows rounds to 1: the rank-0 row gets the scaled epsilon
    assert plan("puma", "scale_lowest").eps_ranks == {0.1: 1}


# ----------------------------------------------------------------------------------------------
# The reference, by hand.


def test_reference_small_example_by_hand():
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    margins = np.array([0.0, 0.5, 0.0, 0.9, 0.5, 0.1, 0.0, 0.7, 0.2, 0.5], np.float32)
    labels = np.zeros(10, int)
    synth = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # id 19 is real
    # order of the 9 synthetic rows by (margin, id): 10 12 16 15 18 11 14 17 13
    params = dict(ratio=0.34, scope="synthetic", per_class=False, eps=0.04)
    high = sel.select_reference(
        ids, labels, synth, margins, SelectionParams("high_margin", **params)
    )
    assert set(ids[high.kept]) == {10, 12, 16, 15, 18, 11, 19}  # drops 3 of 9: 14 17 13
    low = sel.select_reference(ids, labels, synth, margins, SelectionParams("low_margin", **params))
    assert set(ids[low.kept]) == {15, 18, 11, 14, 17, 13, 19}  # drops 10 12 16
    puma = sel.select_reference(
        ids,
        labels,
        synth,
        margins,
        SelectionParams("puma", eps_rule="scale_lowest", eps_quantile=0.3, eps_scale=0.5, **params),
    )
    # 0.3 of the 6 kept synthetic rows rounds to 2: ids 10 and 12 (margin 0, ties by id)
    eps = dict(zip(ids[puma.kept].tolist(), puma.eps[puma.kept].tolist(), strict=True))
    assert eps == pytest.approx(
        {10: 0.02, 12: 0.02, 16: 0.04, 15: 0.04, 18: 0.04, 11: 0.04, 19: 0.04}
    )
    assert np.isnan(puma.eps[~puma.kept]).all()


def test_margin_cap_rule_values():
    ids = np.arange(5)
    margins = np.array([0.0, 0.01, 0.02, 0.05, 1.0], np.float32)
    params = SelectionParams(
        "puma", ratio=0.0, scope="all", per_class=False, eps=0.03,
        eps_rule="margin_cap", eps_alpha=2.0, eps_floor=0.005,
    )  # fmt: skip
    got = sel.select_reference(ids, np.zeros(5, int), np.ones(5, bool), margins, params)
    want = [0.005, 0.02, 0.03, 0.03, 0.03]  # max(floor, min(eps, 2 m))
    assert got.kept.all()
    assert got.eps.tolist() == pytest.approx(want)


def test_real_rows_untouched_under_synthetic_scope():
    ids, labels, synth, margins = _rows(400)
    params = SelectionParams("puma", ratio=0.5, eps_rule="scale_lowest", eps_quantile=1.0,
                             eps_scale=0.25, eps=EPS)  # fmt: skip
    got = sel.select_reference(ids, labels, synth, margins, params)
    assert got.kept[~synth].all()
    assert np.all(got.eps[~synth] == np.float32(EPS))
    assert np.all(got.eps[synth & got.kept] == np.float32(EPS * 0.25))


def test_per_class_drops_the_same_fraction_of_each_class():
    ids, labels, synth, margins = _rows(1000, classes=3)
    params = SelectionParams("high_margin", ratio=0.3, scope="all", per_class=True)
    got = sel.select_reference(ids, labels, synth, margins, params)
    for c in range(3):
        n = int((labels == c).sum())
        assert int((~got.kept & (labels == c)).sum()) == sel.round_half_up(0.3, n)


def test_adding_an_eps_rule_is_one_function(monkeypatch):
    def halve_nonzero(x):
        return np.where(x.margins > 0, x.base / 2, x.base)

    monkeypatch.setitem(sel.EPS_RULES, "halve_nonzero", sel.EpsRule(halve_nonzero))
    ids, labels, synth, margins = _rows(300)
    params = SelectionParams("puma", ratio=0.2, eps_rule="halve_nonzero", eps=EPS)
    ref = sel.select_reference(ids, labels, synth, margins, params)
    kept, eps, _, _ = _scalable(ids, labels, synth, margins, params)
    assert np.array_equal(kept, ref.kept)
    assert np.array_equal(eps, ref.eps, equal_nan=True)
    in_scope = ref.kept & synth
    assert np.all(ref.eps[in_scope & (margins > 0)] == np.float32(EPS / 2))


# ----------------------------------------------------------------------------------------------
# Scalable == reference, exactly.

CASES = [
    (strategy, rule, scope, per_class)
    for strategy, rule in [
        ("puma", "scale_lowest"),
        ("puma", "margin_cap"),
        ("puma", "none"),
        ("high_margin", "none"),
        ("low_margin", "none"),
        ("random", "none"),
        ("none", "none"),
    ]
    for scope, per_class in itertools.product(["synthetic", "all"], [True, False])
]


@pytest.mark.parametrize("strategy,rule,scope,per_class", CASES)
@pytest.mark.parametrize("limit", [1, 1 << 16])
def test_scalable_equals_reference(strategy, rule, scope, per_class, limit):
    ids, labels, synth, margins = _rows(3000, zeros=0.6)
    params = SelectionParams(
        strategy, ratio=0.3, scope=scope, per_class=per_class, seed=7, eps=EPS,
        eps_rule=rule, eps_quantile=0.2, eps_scale=0.5, eps_alpha=0.5,
    )  # fmt: skip
    ref = sel.select_reference(ids, labels, synth, margins, params)
    kept, eps, plans, passes = _scalable(ids, labels, synth, margins, params, limit=limit)
    assert np.array_equal(kept, ref.kept)
    assert np.array_equal(eps, ref.eps, equal_nan=True)
    assert plans == ref.plans
    # Even with limit 1 and 60% exact zeros, the id jump keeps the pass count small.
    assert passes <= (1 if strategy == "none" else 6)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 0.99])
@pytest.mark.parametrize("strategy", ["puma", "low_margin", "random"])
def test_scalable_equals_reference_edge_ratios(ratio, strategy):
    ids, labels, synth, margins = _rows(500, zeros=0.9)
    rule = "scale_lowest" if strategy == "puma" else "none"
    params = SelectionParams(strategy, ratio=ratio, eps_rule=rule, eps_quantile=1.0, eps=EPS)
    ref = sel.select_reference(ids, labels, synth, margins, params)
    kept, eps, _, _ = _scalable(ids, labels, synth, margins, params, limit=2)
    assert np.array_equal(kept, ref.kept)
    assert np.array_equal(eps, ref.eps, equal_nan=True)


def test_scalable_all_margins_equal_and_tiny_groups():
    n = 2000
    ids = np.arange(n) * 3 - 1000
    labels = np.r_[np.zeros(n - 3, int), 1, 2, 2]  # classes of 1997, 1 and 2 rows; 3 is empty
    margins = np.zeros(n, np.float32)
    params = SelectionParams("low_margin", ratio=0.5, scope="all", per_class=True)
    ref = sel.select_reference(ids, labels, np.ones(n, bool), margins, params)
    kept, _, _, passes = _scalable(ids, labels, np.ones(n, bool), margins, params, limit=4)
    assert np.array_equal(kept, ref.kept)
    # every row ties: the kept rows of class 0 are exactly its highest ids
    assert set(ids[kept & (labels == 0)]) == set(ids[labels == 0][-998:])
    assert passes <= 4


def test_scalable_needs_no_margins_for_random_and_none():
    ids, labels, synth, _ = _rows(800)
    for strategy in ("random", "none"):
        params = SelectionParams(strategy, ratio=0.4, seed=3)
        ref = sel.select_reference(ids, labels, synth, None, params)
        kept, eps, _, _ = _scalable(ids, labels, synth, None, params)
        assert np.array_equal(kept, ref.kept)
        assert np.array_equal(eps, ref.eps, equal_nan=True)


def test_random_depends_on_seed_only_through_the_hash():
    ids, labels, synth, _ = _rows(2000)
    a = sel.select_reference(ids, labels, synth, None, SelectionParams("random", seed=1))
    b = sel.select_reference(ids[::-1], labels[::-1], synth[::-1], None,
                             SelectionParams("random", seed=1))  # fmt: skip
    c = sel.select_reference(ids, labels, synth, None, SelectionParams("random", seed=2))
    assert set(ids[a.kept]) == set(ids[::-1][b.kept])  # row order does not matter
    assert set(ids[a.kept]) != set(ids[c.kept])


def test_driver_memory_is_bounded_by_counters_and_limit():
    """Every merged pass holds at most max_counters histogram counters (+ candidates)."""
    ids, labels, synth, margins = _rows(5000, classes=40)
    params = SelectionParams("puma", ratio=0.3, eps_rule="scale_lowest", eps=EPS)
    seen = []

    def run_pass(requests):
        seen.append(sum(1 << r.width for r in requests if r.width))
        hi, lo = sel.row_keys("margin", ids, margins, 0)
        yield sel.shard_stats(hi, lo, sel.group_index(labels, synth, params), 40, requests)

    sel.find_cuts(run_pass, 40, params, collect_limit=16, max_counters=1 << 14)
    assert max(seen) <= 1 << 14


def test_duplicate_ids_are_refused():
    ids = np.array([1, 2, 2, 3, 4, 5])
    margins = np.zeros(6, np.float32)
    params = SelectionParams("high_margin", ratio=0.5, scope="all", per_class=False)
    with pytest.raises(sel.DuplicateKeyError, match="id 2"):
        _scalable(ids, np.zeros(6, int), np.ones(6, bool), margins, params, classes=1, limit=8)


def test_reference_refuses_nan_margins():
    params = SelectionParams("high_margin")
    with pytest.raises(ValueError, match="NaN"):
        sel.select_reference([1, 2], [0, 0], [True, True], np.array([0.1, np.nan]), params)


# ----------------------------------------------------------------------------------------------
# Row policies: misclassified and non-converged rows.

POLICY_EPS = 0.04


def _flagged_rows(n, *, classes=4, seed=0, signed=True, mis_rate=0.15, nc_rate=0.1):
    """Distinct continuous margins (no two equal), ~mis_rate misclassified (negative margins if
    `signed`, else exactly 0 as unsigned scores have them), ~nc_rate not converged."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 5 + 3) - n
    labels = rng.integers(0, classes, n)
    synth = rng.random(n) < 0.8
    mis = rng.random(n) < mis_rate
    conv = rng.random(n) >= nc_rate
    margins = rng.exponential(0.05, n).astype(np.float32)
    margins[mis] = -margins[mis] if signed else 0.0
    return ids, labels, synth, margins, mis, conv


def _policy_params(strategy="puma", rule="scale_lowest", **kw):
    base = dict(ratio=0.3, eps=POLICY_EPS, eps_rule=rule, eps_quantile=0.5, eps_scale=0.5)
    if strategy != "puma":
        base["eps_rule"] = "none"
    return SelectionParams(strategy, **{**base, **kw})


# One class of 10 synthetic rows (ids 0-9) and a real row (id 10, misclassified, not converged):
# ratio 0.3 drops 3 of the 10, the lowest-ranked round_half_up(0.5 x kept) kept rows get half eps.
HAND_MARGINS = np.array([-0.2, -0.1, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.35, -0.5], np.float32)
HAND_MIS = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
HAND_CONV = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)  # id 1 (misclassified), id 9 not


@pytest.mark.parametrize(
    "misclassified,nonconverged,half,base,dropped",
    [
        # no policy: the order is 0 1 2 3 4 5 9 6 7 8; drop 6 7 8, 4 of the 7 kept at half eps
        ("eps_rule", "as_is", {0, 1, 2, 3}, {4, 5, 9}, {6, 7, 8}),
        # 9 above every converged row, 1 (misclassified) below: 1 0 2 3 4 5 6 7 8 9
        ("eps_rule", "rank_last", {1, 0, 2, 3}, {4, 5, 6}, {7, 8, 9}),
        # 1 and 9 below every converged row, in margin order: 1 9 0 2 3 4 5 6 7 8
        ("eps_rule", "rank_first", {1, 9, 0, 2}, {3, 4, 5}, {6, 7, 8}),
        # 1 and 9 kept at base outside the order (they count in the 10): 3 of 0 2 3 4 5 6 7 8
        # dropped, 4 of the 7 kept at half eps
        ("eps_rule", "exclude", {0, 2, 3, 4}, {5, 1, 9}, {6, 7, 8}),
        # 0 and 1 dropped, counted in the 3: one more from the top
        ("drop", "as_is", {2, 3, 4, 5}, {9, 6, 7}, {0, 1, 8}),
        ("drop", "exclude", {2, 3, 4, 5}, {6, 7, 9}, {0, 1, 8}),
        # 0 and 1 at base; 9 above every converged row: drop 9 8 7
        ("base_eps", "rank_last", {2, 3, 4, 5}, {6, 0, 1}, {7, 8, 9}),
        # 9 below every converged row: 9 2 3 4 5 6 7 8; drop 6 7 8
        ("base_eps", "rank_first", {9, 2, 3, 4}, {5, 0, 1}, {6, 7, 8}),
    ],
)
def test_policies_small_example_by_hand(misclassified, nonconverged, half, base, dropped):
    ids = np.arange(11)
    synth = np.r_[np.ones(10, bool), False]
    params = _policy_params(misclassified=misclassified, nonconverged=nonconverged)
    for mode in ("reference", "scalable"):
        if mode == "reference":
            got = sel.select_reference(
                ids, np.zeros(11, int), synth, HAND_MARGINS, params,
                misclassified=HAND_MIS, converged=HAND_CONV,
            )  # fmt: skip
            kept, eps = got.kept, got.eps
        else:
            kept, eps, _, _ = _scalable(
                ids, np.zeros(11, int), synth, HAND_MARGINS, params, classes=1, shards=3,
                limit=1, mis=HAND_MIS, conv=HAND_CONV,
            )  # fmt: skip
        assert set(ids[~kept]) == dropped, mode
        assert set(ids[kept & (eps == np.float32(POLICY_EPS / 2))]) == half, mode
        # the real row (misclassified, not converged) is out of scope: untouched
        assert set(ids[kept & (eps == np.float32(POLICY_EPS))]) == base | {10}, mode


POLICY_CASES = [
    (strategy, rule, mis, nc)
    for strategy, rule in [
        ("puma", "scale_lowest"),
        ("puma", "margin_cap"),
        ("high_margin", "none"),
        ("low_margin", "none"),
    ]
    for mis in sel.MISCLASSIFIED_POLICIES
    for nc in sel.NONCONVERGED_POLICIES
]


@pytest.mark.parametrize("strategy,rule,mis_policy,nc_policy", POLICY_CASES)
@pytest.mark.parametrize("signed", [True, False])
def test_policies_scalable_equals_reference(strategy, rule, mis_policy, nc_policy, signed):
    ids, labels, synth, margins, mis, conv = _flagged_rows(3000, signed=signed, seed=3)
    for scope, per_class, limit in (("synthetic", True, 1), ("all", False, 1 << 16)):
        params = _policy_params(
            strategy, rule, scope=scope, per_class=per_class, eps_quantile=0.2, eps_alpha=0.5,
            misclassified=mis_policy, nonconverged=nc_policy,
        )  # fmt: skip
        ref = sel.select_reference(
            ids, labels, synth, margins, params, misclassified=mis, converged=conv
        )
        kept, eps, plans, passes = _scalable(
            ids, labels, synth, margins, params, limit=limit, mis=mis, conv=conv
        )
        assert np.array_equal(kept, ref.kept)
        assert np.array_equal(eps, ref.eps, equal_nan=True)
        assert plans == ref.plans
        assert passes <= 6


@pytest.mark.parametrize("nc_policy", sel.NONCONVERGED_POLICIES)
@pytest.mark.parametrize("mis_policy", ["eps_rule", "base_eps", "drop"])
def test_the_ratio_fixes_the_kept_size_the_policies_which_rows(mis_policy, nc_policy):
    """Forced rows count in their group: every group keeps n - round_half_up(ratio n) rows and
    the eps rule adjusts round_half_up(q kept) of them, whatever the policy (drop: unless the
    misclassified rows outnumber the quota)."""
    ids, labels, synth, margins, mis, conv = _flagged_rows(4000, seed=5, mis_rate=0.2)
    params = _policy_params(misclassified=mis_policy, nonconverged=nc_policy, eps_quantile=0.1)
    got = sel.select_reference(
        ids, labels, synth, margins, params, misclassified=mis, converged=conv
    )
    adjusted = got.kept & (got.eps != np.float32(POLICY_EPS))
    forced = mis if mis_policy != "eps_rule" else np.zeros(len(ids), bool)
    ranked_nc = ~conv & ~forced  # the non-converged rows the nonconverged policy decides
    none = np.zeros(len(ids), bool)
    above = ranked_nc & ~mis if nc_policy == "rank_last" else none
    below = {"rank_last": ranked_nc & mis, "rank_first": ranked_nc}.get(nc_policy, none)

    def first_of(chosen, tier):
        """A tier at an end of the order is chosen first: whole, or it holds all chosen."""
        if chosen.sum() >= tier.sum():
            assert not (tier & ~chosen).any()
        else:
            assert not (chosen & ~tier).any()

    for c in range(4):
        scope = synth & (labels == c)
        n = int(scope.sum())
        pruned = scope & ~got.kept
        n_drop = sel.round_half_up(0.3, n)
        n_forced = int((scope & mis).sum()) if mis_policy == "drop" else 0
        assert pruned.sum() == max(n_drop, n_forced)
        assert int((scope & adjusted).sum()) == sel.round_half_up(0.1, n - int(pruned.sum()))
        first_of(pruned & ~forced, scope & above)
        first_of(scope & adjusted, scope & below)
    if mis_policy == "drop":
        assert not got.kept[synth & mis].any()
    if mis_policy == "base_eps":
        assert np.all(got.eps[synth & mis] == np.float32(POLICY_EPS))
    if nc_policy == "exclude":
        assert np.all(got.eps[synth & ranked_nc] == np.float32(POLICY_EPS))
    assert np.all(got.kept[~synth]) and np.all(got.eps[~synth] == np.float32(POLICY_EPS))


def test_drop_beyond_the_quota_and_groups_of_forced_rows_only():
    ids, labels, synth, margins, mis, conv = _flagged_rows(2000, seed=6, mis_rate=0.5)
    labels[labels == 3] = 2
    mis[labels == 2] = True  # class 2: every row misclassified; class 3: empty
    params = _policy_params(misclassified="drop", nonconverged="exclude", eps_quantile=0.3)
    ref = sel.select_reference(
        ids, labels, synth, margins, params, misclassified=mis, converged=conv
    )
    kept, eps, plans, _ = _scalable(
        ids, labels, synth, margins, params, limit=2, mis=mis, conv=conv
    )
    assert np.array_equal(kept, ref.kept) and np.array_equal(eps, ref.eps, equal_nan=True)
    assert plans == ref.plans and 3 not in plans
    assert plans[2].rows == 0 and plans[2].drop == int((synth & (labels == 2)).sum())
    assert not kept[synth & mis].any()  # ~half of each class: more than its 30% quota
    for c in (0, 1):
        scope = synth & (labels == c)
        assert int((scope & ~kept).sum()) == int((scope & mis).sum())


def test_as_is_and_eps_rule_equal_no_policy():
    ids, labels, synth, margins, mis, conv = _flagged_rows(2000, seed=7)
    params = _policy_params()
    assert not params.uses_flags
    a = sel.select_reference(ids, labels, synth, margins, params, misclassified=mis, converged=conv)
    b = sel.select_reference(ids, labels, synth, margins, params)
    assert np.array_equal(a.kept, b.kept) and np.array_equal(a.eps, b.eps, equal_nan=True)


def test_policies_need_the_margin_order_and_resolve_away_for_random():
    with pytest.raises(ValueError, match="margin order"):
        SelectionParams("random", misclassified="drop")
    with pytest.raises(ValueError, match="unknown nonconverged"):
        SelectionParams("puma", nonconverged="last")
    cfg = load_config(None, ["pruning.strategy=random", "pruning.misclassified=drop"])
    p = SelectionParams.from_config(cfg.pruning, 0.1)
    assert (p.misclassified, p.nonconverged) == ("eps_rule", "as_is")
    cfg = load_config(None, ["pruning.misclassified=base_eps"])
    p = SelectionParams.from_config(cfg.pruning, 0.1)
    assert (p.misclassified, p.nonconverged) == ("base_eps", "rank_last")  # the defaults


def test_policies_are_sweepable_names():
    cfg = load_config(
        None,
        [
            "sweep.space.pruning.misclassified={grid: [eps_rule, drop, base_eps]}",
            "sweep.space.pruning.nonconverged={choice: [rank_last, as_is]}",
        ],
    )
    assert cfg.sweep.space["pruning.misclassified"].grid == ["eps_rule", "drop", "base_eps"]
    with pytest.raises(ConfigError, match="pruning.misclassified"):
        load_config(None, ["sweep.space.pruning.misclassified={grid: [eps_rule, ignore]}"])
    with pytest.raises(ConfigError, match="grid or choice"):
        load_config(None, ["sweep.space.pruning.nonconverged={uniform: [0, 1]}"])
    from puma_ray.sweep.plan import is_unpruned

    dropping = load_config(None, ["pruning.ratio=0", "pruning.eps_rule=none",
                                  "pruning.misclassified=drop"])  # fmt: skip
    assert not is_unpruned(dropping)
    assert is_unpruned(load_config(None, ["pruning.ratio=0", "pruning.eps_rule=none"]))


# ----------------------------------------------------------------------------------------------
# Permutation invariance: no decision depends on the ids (when no two margins are equal).


def _permuted(ids, how):
    """A bijection of the id set: a random permutation, or an order-reversing affine map."""
    if how == "shuffle":
        return ids[np.random.default_rng(11).permutation(len(ids))]
    return 17 - 3 * ids


def _select_both(ids, labels, synth, margins, params, mis, conv):
    ref = sel.select_reference(ids, labels, synth, margins, params, misclassified=mis,
                               converged=conv)  # fmt: skip
    kept, eps, _, _ = _scalable(ids, labels, synth, margins, params, limit=3, mis=mis, conv=conv)
    assert np.array_equal(kept, ref.kept) and np.array_equal(eps, ref.eps, equal_nan=True)
    return kept, eps


@pytest.mark.parametrize("how", ["shuffle", "reverse"])
@pytest.mark.parametrize("strategy,rule", [("puma", "scale_lowest"), ("low_margin", "none")])
@pytest.mark.parametrize("mis_policy", sel.MISCLASSIFIED_POLICIES)
@pytest.mark.parametrize("nc_policy", sel.NONCONVERGED_POLICIES)
def test_permuting_ids_permutes_the_selection(how, strategy, rule, mis_policy, nc_policy):
    """Row i keeps its label, source, margin and flags and gets a new id: it is kept (or not)
    and trains at the same eps as before, for the reference and the scalable path alike."""
    ids, labels, synth, margins, mis, conv = _flagged_rows(4000, seed=8, mis_rate=0.3)
    assert len(np.unique(margins)) == len(margins)  # continuous: the id never breaks a tie
    params = _policy_params(strategy, rule, eps_quantile=0.1, misclassified=mis_policy,
                            nonconverged=nc_policy)  # fmt: skip
    kept, eps = _select_both(ids, labels, synth, margins, params, mis, conv)
    kept2, eps2 = _select_both(_permuted(ids, how), labels, synth, margins, params, mis, conv)
    assert np.array_equal(kept, kept2)
    assert np.array_equal(eps, eps2, equal_nan=True)


def test_unsigned_zero_ties_depend_on_ids_unless_the_policy_takes_them_out():
    """Unsigned scores give every misclassified row margin 0: under `eps_rule` which of them get
    the reduced eps is decided by id (not permutation invariant); `base_eps` and `drop` take
    them out of the order, so the selection is invariant again."""
    ids, labels, synth, margins, mis, conv = _flagged_rows(4000, seed=9, signed=False,
                                                          mis_rate=0.3)  # fmt: skip
    for policy in sel.MISCLASSIFIED_POLICIES:
        params = _policy_params(eps_quantile=0.1, misclassified=policy, nonconverged="rank_last")
        kept, eps = _select_both(ids, labels, synth, margins, params, mis, conv)
        kept2, eps2 = _select_both(_permuted(ids, "reverse"), labels, synth, margins, params,
                                   mis, conv)  # fmt: skip
        same = np.array_equal(kept, kept2) and np.array_equal(eps, eps2, equal_nan=True)
        assert same == (policy != "eps_rule"), policy


# ----------------------------------------------------------------------------------------------
# Config: bad values are caught by the schema; the strategy resolves its eps rule.


@pytest.mark.parametrize(
    "override,field",
    [
        ("pruning.ratio=1.0", "pruning.ratio"),
        ("pruning.ratio=-0.1", "pruning.ratio"),
        ("pruning.eps_scale=0", "pruning.eps_scale"),
        ("pruning.eps_quantile=1.5", "pruning.eps_quantile"),
        ("pruning.extrapolation.k=0", "pruning.extrapolation.k"),
        ("pruning.strategy=biggest", "pruning.strategy"),
        ("pruning.eps_rule=clip", "pruning.eps_rule"),
        ("pruning.misclassified=ignore", "pruning.misclassified"),
        ("pruning.nonconverged=last", "pruning.nonconverged"),
        ("pruning.extrapolation.rank_scored=mean", "pruning.extrapolation.rank_scored"),
        ("pruning.extrapolation.holdout_fraction=1.5", "pruning.extrapolation.holdout_fraction"),
    ],
)
def test_config_rejects_bad_pruning_values(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_params_from_config_resolves_strategy_and_rule():
    cfg = load_config(None, ["pruning.strategy=high_margin", "pruning.eps_rule=scale_lowest"])
    p = SelectionParams.from_config(cfg.pruning, cfg.training.attack.epsilon)
    assert (p.strategy, p.eps_rule, p.order) == ("high_margin", "none", "margin")
    cfg = load_config(None, ["pruning.strategy=extrapolated"])
    p = SelectionParams.from_config(cfg.pruning, cfg.training.attack.epsilon)
    assert (p.strategy, p.eps_rule) == ("puma", "scale_lowest")
    cfg = load_config(None, ["pruning.strategy=random"])
    assert SelectionParams.from_config(cfg.pruning, 0.1).order == "hash"


# ----------------------------------------------------------------------------------------------
# Extrapolation.


def test_extrapolation_subset_is_per_row_nested_and_near_fraction():
    ids = np.arange(200_000, dtype=np.int64) + (1 << 40)
    a = sel.extrapolation_subset(ids, 0.1, seed=0)
    assert abs(a.mean() - 0.1) < 0.005
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(sel.extrapolation_subset(ids[perm], 0.1, 0), a[perm])
    assert not (a & ~sel.extrapolation_subset(ids, 0.2, 0)).any()  # nested in the fraction
    assert (a != sel.extrapolation_subset(ids, 0.1, 1)).any()
    # independent of the random-pruning hash with the same seed
    low_hash = sel.hash_ids(ids, 0) < np.uint64(int(0.1 * 2**64))
    assert abs((a & low_hash).mean() - 0.01) < 0.002


def test_knn_mean_equals_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 5)).astype(np.float16)
    values = rng.random(300).astype(np.float32)
    queries = rng.normal(size=(50, 5)).astype(np.float16)
    got = sel.knn_mean(queries, ref, values, k=7, query_block=16, ref_block=5)
    d = ((queries[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    want = values[np.argsort(d, axis=1)[:, :7]].mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.allclose(sel.knn_mean(queries, ref[:3], values[:3], k=12), values[:3].mean())
    with pytest.raises(ValueError, match="k must be"):
        sel.knn_mean(queries, ref, values, k=0)


def test_knn_mean_recovers_a_smooth_function():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(3000, 6)) * np.array([1, 1, 0.05, 0.05, 0.05, 0.05])
    truth = np.sin(emb[:, 0]) + 0.5 * emb[:, 1] ** 2
    scored = sel.extrapolation_subset(np.arange(3000), 0.2, 0)
    pred = sel.knn_mean(emb[~scored], emb[scored], truth[scored], k=12)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(ranks(pred), ranks(truth[~scored]))[0, 1]
    assert rho > 0.95
