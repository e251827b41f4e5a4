"""Selection rules in pure NumPy: key order, strategies, epsilon rules, the exact radix select
against the argsort reference (ties, per class, scope, every strategy), k-NN extrapolation."""

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


def _scalable(ids, labels, synth, margins, params, *, classes=4, shards=5, limit=1 << 16):
    """find_cuts + apply_cuts over `shards` slices, as the stage runs them (minus I/O)."""
    parts = np.array_split(np.arange(len(ids)), shards)
    n_groups = classes if params.per_class else 1

    def keys(s):
        m = None if margins is None else margins[s]
        hi, lo = sel.row_keys(params.order, ids[s], m, params.seed)
        return hi, lo, sel.group_index(labels[s], synth[s], params)

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
    m = np.float32(0.25)
    for i, key_lo in zip(ids, lo, strict=True):
        key = (int(sel.margin_order_key([m])[0]) << 64) | int(key_lo)
        assert sel.describe_key(key, "margin") == {"margin": 0.25, "id": int(i)}


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
