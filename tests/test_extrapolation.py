"""k-NN extrapolation of margins in pure NumPy (no Ray, no files): leave-one-out and same-class
estimates against brute force, Spearman against scipy, the held-out subset, and the property
the estimates exist for: with every row ranked by its estimate, the scored rows' share among the
pruned and among the eps-adjusted rows is their share overall (and with exact scores it is not).
The stage end to end: tests/test_prune.py (test_extrapolated_*)."""

import numpy as np
import pytest

from puma_ray import selection as sel
from puma_ray.selection import SelectionParams, knn


def _brute_force(queries, ref, values, k, exclude=None):
    d = ((queries[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        d[rows, exclude[rows]] = np.inf
    kk = min(k, len(ref) - (exclude is not None and (exclude >= 0).any()))
    return values[np.argsort(d, axis=1, kind="stable")[:, :kk]].mean(axis=1)


def test_knn_mean_leave_one_out_equals_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 5)).astype(np.float16)
    values = rng.random(300).astype(np.float32)
    # the queries are reference rows themselves: leave-one-out must not find distance 0
    idx = rng.choice(300, 60, replace=False)
    exclude = np.where(np.arange(60) % 3 == 0, -1, idx)  # a third keep their own row
    got = knn.knn_mean(ref[idx], ref, values, 7, exclude=exclude, query_block=16, ref_block=5)
    np.testing.assert_allclose(got, _brute_force(ref[idx], ref, values, 7, exclude), rtol=1e-6)
    # fewer reference rows than k: every other row
    small = knn.knn_mean(ref[:4], ref[:4], values[:4], 12, exclude=np.arange(4))
    want = [(values[:4].sum() - values[i]) / 3 for i in range(4)]
    np.testing.assert_allclose(small, want, rtol=1e-6)
    with pytest.raises(ValueError, match="no other reference row"):
        knn.knn_mean(ref[:1], ref[:1], values[:1], 3, exclude=np.zeros(1, np.int64))


def _classes(n, classes, dim, seed):
    """Per-class Gaussian embeddings (float16) and ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(scale=3.0, size=(classes, dim))
    emb = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float16)
    ids = rng.permutation(n).astype(np.int64) * 11 + 5
    return rng, ids, labels, emb


def test_estimate_same_class_and_leave_one_out_equal_brute_force():
    rng, ids, labels, emb = _classes(900, 3, 4, 2)
    margins = rng.random(900).astype(np.float32)
    scored = sel.extrapolation_subset(ids, 0.3, 0)
    for same_class in (True, False):
        ref = knn.Reference.build(ids[scored], emb[scored], margins[scored], labels[scored],
                                  same_class=same_class)  # fmt: skip
        got = knn.estimate(ref, ids, labels, emb, 5, leave_out=scored)
        want = np.empty(900)
        for i in range(900):
            use = scored & (labels == labels[i] if same_class else True)
            use[i] = False  # leave-one-out (a no-op for unscored rows)
            want[i] = _brute_force(emb[i : i + 1], emb[use], margins[use], 5)[0]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    only_0 = knn.Reference.build(ids[:5], emb[:5], margins[:5], np.zeros(5, int), same_class=True)
    with pytest.raises(ValueError, match="class 1 has no scored row"):
        knn.estimate(only_0, ids[:3], np.array([0, 1, 0]), emb[:3], 3)


def test_extrapolated_margins_exact_keeps_scores_estimate_ranks_all():
    rng, ids, labels, emb = _classes(500, 2, 3, 3)
    true = rng.random(500).astype(np.float32)
    scored = sel.extrapolation_subset(ids, 0.4, 1)
    also = scored & sel.holdout_subset(ids, 0.5, 1)
    ref = knn.Reference.build(ids[scored], emb[scored], true[scored], labels[scored],
                              same_class=True)  # fmt: skip
    m_est, est = knn.extrapolated_margins(ref, ids, labels, emb, 4, scored, true)
    assert np.array_equal(m_est, est) and not np.isnan(est).any()
    m_exact, est2 = knn.extrapolated_margins(ref, ids, labels, emb, 4, scored, true,
                                             rank_scored="exact", also=also)  # fmt: skip
    assert np.array_equal(m_exact[scored], true[scored])
    assert np.array_equal(m_exact[~scored], est[~scored])
    computed = ~np.isnan(est2)
    assert np.array_equal(computed, ~scored | also)
    assert np.array_equal(est2[computed], est[computed])  # the same leave-one-out estimates


def test_rank_correlation_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    x = rng.integers(0, 20, 500).astype(np.float64)  # many ties
    y = x + rng.normal(scale=5, size=500)
    y[:50] = 0.0
    want = stats.spearmanr(x, y).statistic
    assert knn.rank_correlation(x, y) == pytest.approx(want, abs=1e-12)
    q = knn.quality(x, y)
    assert q["rows"] == 500 and q["spearman"] == pytest.approx(want, abs=1e-12)
    assert q["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert q["mae"] == pytest.approx(np.abs(x - y).mean())
    assert knn.quality(np.zeros(0), np.zeros(0)) == {
        "rows": 0, "mae": None, "pearson": None, "spearman": None
    }
    assert knn.rank_correlation(np.ones(5), np.arange(5.0)) is None  # constant side


def test_holdout_subset_is_an_independent_share_of_the_scored_rows():
    ids = np.arange(400_000, dtype=np.int64) * 3 + 1
    scored = sel.extrapolation_subset(ids, 0.1, 5)
    held = sel.holdout_subset(ids, 0.2, 5)
    assert abs(held[scored].mean() - 0.2) < 0.01  # ~20% of the scored rows
    assert abs(scored[held].mean() - 0.1) < 0.01
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(sel.holdout_subset(ids[perm], 0.2, 5), held[perm])
    assert not sel.holdout_subset(ids, 0.0, 5).any() and sel.holdout_subset(ids, 1.0, 5).all()


# ----------------------------------------------------------------------------------------------
# The scored rows' share among pruned and eps-adjusted rows (Nieth et al. + PUMA).

N, CLASSES, DIM, FRACTION, K = 20_000, 5, 4, 0.2, 12


def _known_margins(seed=0):
    """Per class: Gaussian embeddings, margin = a linear function of the embedding + noise
    (noise sd about the within-class signal's), so single scores spread wider than k-means."""
    rng, ids, labels, emb = _classes(N, CLASSES, DIM, seed)
    w = rng.normal(size=(CLASSES, DIM))
    x = emb.astype(np.float64)
    signal = np.einsum("nd,nd->n", x - x.mean(axis=0), w[labels]) / np.sqrt(DIM)
    true = (0.4 + 0.1 * signal + 0.1 * rng.normal(size=N)).astype(np.float32)
    return ids, labels, emb, true


def _shares(rank_scored):
    ids, labels, emb, true = _known_margins()
    scored = sel.extrapolation_subset(ids, FRACTION, 0)
    held = scored & sel.holdout_subset(ids, 0.2, 0)
    ref = knn.Reference.build(ids[scored], emb[scored], true[scored], labels[scored],
                              same_class=True)  # fmt: skip
    margin, est = knn.extrapolated_margins(
        ref, ids, labels, emb, K, scored, true, rank_scored=rank_scored, also=held
    )
    params = SelectionParams("puma", ratio=0.3, scope="all", per_class=True, eps=0.03,
                             eps_rule="scale_lowest", eps_quantile=0.1, eps_scale=0.5)  # fmt: skip
    got = sel.select_reference(ids, labels, np.ones(N, bool), margin, params)
    pruned = ~got.kept
    adjusted = got.kept & (got.eps != np.float32(0.03))
    return (
        scored.mean(),
        scored[pruned].mean(),
        scored[adjusted].mean(),
        knn.quality(est[held], true[held]),
        int(adjusted.sum()),
    )


def test_ranking_every_row_by_its_estimate_keeps_the_scored_share():
    overall, in_pruned, in_adjusted, held, n_adjusted = _shares("estimate")
    assert abs(overall - FRACTION) < 0.01
    assert n_adjusted > 1000  # enough rows for +-3 points to mean something
    assert abs(in_pruned - overall) < 0.03
    assert abs(in_adjusted - overall) < 0.03
    assert held["rows"] > 600 and held["spearman"] > 0.8  # the easy case is learned well


def test_exact_scores_among_estimates_crowd_the_tails():
    """The distortion `rank_scored: estimate` fixes: exact scores spread wider than k-NN means,
    so the scored rows fill both ends of the order."""
    overall, in_pruned, in_adjusted, _, _ = _shares("exact")
    assert in_pruned - overall > 0.03  # measured: +4.9 points at the top
    assert in_adjusted - overall > 0.15  # +34 points at the bottom
