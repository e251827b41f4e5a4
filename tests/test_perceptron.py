"""The perceptron analysis (benchmarks/perceptron.py): its closed forms against independent
references (a Monte Carlo test set, SciPy's optimiser), the selection it feeds the students, and
the orderings docs/study.md reads from it, on a small fixed-seed instance. No Ray, a few s."""

import importlib.util
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "perceptron", os.path.join(ROOT, "benchmarks", "perceptron.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["perceptron"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


P = _load()
METHODS = list(P.METHODS)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_population_accuracies_match_a_large_clean_test_set(norm):
    rng = np.random.default_rng(0)
    d, eps = 20, 0.2
    w = rng.standard_normal((d, 4))
    w[0] += np.array([0.0, 2.0, 5.0, -3.0])  # from near-random to well aligned to anti-aligned
    robust, clean = P.accuracies(w, eps, norm)
    x = rng.standard_normal((200_000, d))
    y = np.sign(x[:, 0])
    score = y[:, None] * (x @ w)
    dual = np.linalg.norm(w, axis=0) if norm == "l2" else np.abs(w).sum(axis=0)
    np.testing.assert_allclose(robust, (score > eps * dual).mean(0), atol=0.005)
    np.testing.assert_allclose(clean, (score > 0).mean(0), atol=0.005)
    assert (robust <= clean).all()


def test_teacher_and_zero_student():
    teacher = np.eye(10)[:, :1]
    robust, clean = P.accuracies(teacher, 0.3, "l2")
    assert robust[0] == pytest.approx(math.erfc(0.3 / math.sqrt(2)), abs=1e-6)  # P(|a| > eps)
    assert clean[0] == pytest.approx(1.0)
    robust0, clean0 = P.accuracies(np.zeros((10, 1)), 0.3, "l2")
    assert robust0[0] == 0 and clean0[0] == 0


def test_training_reaches_the_minimum_scipy_finds():
    """Full-batch GD on the exact adversarial logistic loss against BFGS on the same objective."""
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    n, d = 400, 5
    x = rng.standard_normal((n, d))
    y = np.where(rng.random(n) < 0.2, -1.0, 1.0) * np.sign(x[:, 0])  # not separable
    eps = rng.choice([0.0, 0.1, 0.2], n)

    def loss(w):
        margin = y * (x @ w) - eps * np.linalg.norm(w)
        return np.logaddexp(0.0, -margin).mean()

    ref = optimize.minimize(loss, np.full(d, 0.1), method="BFGS", options={"gtol": 1e-10}).x
    w = P.train_students(x, y, np.full((n, 1), 1 / n), eps[:, None], "l2", steps=4000)[:, 0]
    np.testing.assert_allclose(w, ref, atol=2e-4)


def test_selection_feeds_the_students_the_rules():
    cfg = P.Config(d=10)
    rng = np.random.default_rng(2)
    pool = P.make_pool(rng, 1000, cfg)
    w_m = np.eye(cfg.d)[:, 0] + 0.3 * rng.standard_normal(cfg.d)
    margins = P.signed_margins(pool.x, pool.y, w_m, "l2").astype(np.float32)
    labels = pool.y > 0
    for method in METHODS:
        kept, eps = P.select(method, margins, pool.y, cfg, seed=0)
        if method == "full":
            assert kept.all()
            continue
        for cls in (False, True):  # per class: each loses round_half_up(ratio * n)
            in_cls = labels == cls
            assert (~kept[in_cls]).sum() >= math.floor(cfg.ratio * in_cls.sum() + 0.5)
        assert (eps[~kept] == 0).all() and (eps[kept] <= cfg.eps + 1e-7).all()
        if "margin_cap" in method:  # eps_i = max(floor, min(eps, margin_i)) ...
            ranked = kept & ((margins >= 0) | (not method.endswith(":base_eps")))
            cap = np.clip(margins[ranked], cfg.eps_floor, cfg.eps)
            np.testing.assert_allclose(eps[ranked], cap, atol=1e-6)
        if method.endswith(":base_eps"):  # ... but misclassified rows keep the base eps
            assert (eps[kept & (margins < 0)] == np.float32(cfg.eps)).all()
            assert (kept & (margins < 0)).sum() == (margins < 0).sum()
        if method.endswith(":drop") or method == "high_margin+drop":
            assert (margins[kept] >= 0).all()  # every misclassified row is dropped
        if method in ("random", "low_margin", "high_margin", "high_margin+drop"):
            assert (eps[kept] == np.float32(cfg.eps)).all()
    kept_low, _ = P.select("low_margin", margins, pool.y, cfg, 0)
    kept_high, _ = P.select("high_margin", margins, pool.y, cfg, 0)
    for cls in (False, True):  # opposite halves of each class's order
        in_cls = labels == cls
        assert margins[kept_low & in_cls].min() >= margins[kept_high & in_cls].max()


def test_a_kept_set_whose_mean_margin_is_below_its_eps_collapses():
    """The mechanism behind (b): at w = 0 the directional derivative of the mean adversarial
    logistic loss along a unit u is (mean(eps_i) - mean(y u.x)) / 2, so w = 0 is the exact
    minimum iff ||mean(y x)|| <= mean(eps_i): then the student has nothing to gain from any
    direction and GD only circles 0. A smaller eps on the low-margin rows (margin_cap with
    alpha 0.5 here) restores a minimum away from 0, along the teacher."""
    rng = np.random.default_rng(3)
    n, d = 4000, 10
    x = rng.standard_normal((n, d))
    x[:, 0] = rng.uniform(-0.2, 0.2, n)  # every point within 0.2 of the teacher's boundary
    y = np.sign(x[:, 0])
    eps = np.stack([np.full(n, 0.3), np.minimum(0.3, 0.5 * np.abs(x[:, 0]))], 1)
    signal = np.linalg.norm((y[:, None] * x).mean(0))
    assert signal < eps[:, 0].mean()  # so w = 0 is the exact minimum at eps 0.3 ...
    assert signal > eps[:, 1].mean()  # ... and not under the cap
    w = P.train_students(x, y, np.full((n, 2), 1 / n), eps, "l2")
    margin = y * (x @ w[:, 0]) - eps[:, 0] * np.linalg.norm(w[:, 0])
    assert np.logaddexp(0.0, -margin).mean() >= math.log(2) - 1e-12  # GD cannot beat w = 0
    norms = np.linalg.norm(w, axis=0)
    assert norms[0] < 0.1 * norms[1]
    assert w[0, 1] / norms[1] > 0.99


SIZES = (2, 64)  # scarce and abundant, in units of d
VARIANTS = {
    "noisy": ("noisy", {}),
    "noisy_standard": ("noisy", {"eps": 0.0, "eval_eps": 0.3}),
    "ambiguous": ("ambiguous", {}),
    "ambiguous_standard": ("ambiguous", {"eps": 0.0, "eval_eps": 0.3}),
}


@pytest.fixture(scope="module")
def study():
    """Mean over 3 seeds, d = 20: {variant: (robust, clean)} of float[len(SIZES), methods]."""
    out = {}
    for name, (scenario, changes) in VARIANTS.items():
        cfg = replace(P.SCENARIOS[scenario], d=20, pool_per_d=SIZES, seeds=3, **changes)
        res = P.run_study(cfg)
        out[name] = (res["robust"].mean(0), res["clean"].mean(0))
    return out


def _gap(study, variant, method, size):
    """Robust accuracy of `method` minus random's, at SIZES[size]."""
    robust = study[variant][0]
    return robust[size, METHODS.index(method)] - robust[size, METHODS.index("random")]


def test_sanity(study):
    for robust, clean in study.values():
        assert (robust <= clean + 1e-12).all() and (robust >= 0).all() and (clean <= 1).all()
        full = robust[:, METHODS.index("full")]
        assert full[1] > full[0] + 0.05  # full data gains from a larger pool
    teacher = math.erfc(0.3 / math.sqrt(2))
    for name in VARIANTS:  # the abundant full-data student reaches the teacher's ceiling
        assert study[name][0][1, METHODS.index("full")] == pytest.approx(teacher, abs=0.01)


def test_a_low_margin_pruning_stops_helping_as_the_pool_grows(study):
    for variant in ("noisy", "ambiguous"):
        scarce, abundant = (_gap(study, variant, "low_margin", k) for k in (0, 1))
        assert scarce > 0.03
        assert abs(abundant) < 0.01  # every method that keeps the direction meets the ceiling


def test_b_high_margin_pruning_hurts_under_adversarial_training(study):
    # Near-boundary samples alone: harmful only under adversarial training.
    assert _gap(study, "ambiguous", "high_margin", 1) < -0.1
    assert _gap(study, "ambiguous_standard", "high_margin", 1) > -0.01
    # Mislabelled samples: harmful whatever the training (their labels, not their perturbations).
    assert _gap(study, "noisy", "high_margin", 1) < -0.2
    assert _gap(study, "noisy_standard", "high_margin", 1) < -0.2


def test_c_lowering_eps_on_the_lowest_margins_recovers_it(study):
    # margin_cap recovers the near-boundary loss completely ...
    assert _gap(study, "ambiguous", "puma:margin_cap:eps_rule", 1) > -0.01
    # ... the default scale_lowest (lowest 10% at eps / 2) does not
    assert _gap(study, "ambiguous", "puma:scale_lowest:eps_rule", 1) < -0.05
    # With mislabelled rows no eps rule recovers it; dropping the misclassified rows does, and
    # the eps rule adds what dropping alone leaves (the near-boundary part).
    for rule in ("scale_lowest", "margin_cap"):
        assert _gap(study, "noisy", f"puma:{rule}:eps_rule", 1) < -0.2
    assert _gap(study, "noisy", "puma:margin_cap:drop", 1) > -0.01
    margin_cap_drop = _gap(study, "noisy", "puma:margin_cap:drop", 1)
    assert margin_cap_drop > _gap(study, "noisy", "high_margin+drop", 1) + 0.01
