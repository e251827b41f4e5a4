"""Seeds and intervals: the stage graph of `run --seeds N`, the fingerprints it keeps, the end
table's means, intervals and paired differences (from summaries on disk), and the interval
formulas against independent definitions. No Ray."""

import json
import math
import os
from statistics import NormalDist

import pytest

from puma_ray.config import load_config
from puma_ray.pipeline import (
    _downstream,
    forced_stages,
    pipeline_report,
    stage_fingerprints,
    stages_of,
)
from puma_ray.stats import mean_interval, paired_difference, t_quantile_975, wilson_interval


def test_stages_of_three_seeds_with_baselines():
    cfg = load_config(None, ["seeds=3", "compare=[random, full]"])
    assert stages_of(cfg) == (
        "ingest", "margin_model", "score", "prune", "train", "evaluate",
        "train_s1", "evaluate_s1", "train_s2", "evaluate_s2",
        "baseline_random", "baseline_random_s1", "baseline_random_s2",
        "baseline_full", "baseline_full_s1", "baseline_full_s2",
    )  # fmt: skip
    stages = stages_of(cfg)
    assert _downstream(stages, "prune") == (
        "prune",
        "train",
        "evaluate",
        "train_s1",
        "evaluate_s1",
        "train_s2",
        "evaluate_s2",
    )
    assert _downstream(stages, "train_s1") == ("train_s1", "evaluate_s1")
    assert set(_downstream(stages, "ingest")) == set(stages)
    # a seeded stage's name forces every seed of it (and what reads them)
    assert forced_stages(stages, ("train",)) == {
        "train", "evaluate", "train_s1", "evaluate_s1", "train_s2", "evaluate_s2"
    }  # fmt: skip
    assert forced_stages(stages, ("baseline_full",)) == {
        "baseline_full", "baseline_full_s1", "baseline_full_s2"
    }  # fmt: skip


def test_more_seeds_keep_the_first_seeds_fingerprints():
    one = stage_fingerprints(load_config(None, ["compare=[random, full]"]))
    three = stage_fingerprints(load_config(None, ["seeds=3", "compare=[random, full]"]))
    assert {k: three[k] for k in one} == one  # `--seeds 3` after a run reruns no finished stage
    assert len({three["train"], three["train_s1"], three["train_s2"]}) == 3
    # the random baseline's subset moves with the seed, full data's does not (only training)
    assert three["baseline_random_s1"] != three["baseline_random"]
    assert three["prune"] == one["prune"]


def _write(run_dir, folder, obj):
    os.makedirs(os.path.join(run_dir, folder), exist_ok=True)
    with open(os.path.join(run_dir, folder, "summary.json"), "w") as f:
        json.dump(obj, f)


def _fake_run(run_dir, numbers):
    """train*/evaluate* summaries: numbers[method] = [(clean, robust, device_s) per seed]."""
    suffix = {"puma": "", "random": "_random", "full": "_full"}
    for method, seeds in numbers.items():
        for k, (clean, robust, device_s) in enumerate(seeds):
            sfx = suffix[method] + (f"_s{k}" if k else "")
            _write(run_dir, f"train{sfx}", {"rows": 100, "history": [{"device_seconds": device_s}]})
            ci = wilson_interval(round(robust * 500), 500).to_dict()
            _write(
                run_dir,
                f"evaluate{sfx}",
                {"rows": 500, "clean_acc": clean, "robust_acc": robust,
                 "intervals": {"robust_acc": ci, "clean_acc": ci}},
            )  # fmt: skip


def test_end_table_means_intervals_and_paired_differences(tmp_path):
    run_dir = str(tmp_path)
    numbers = {
        "puma": [(0.90, 0.40, 10.0), (0.92, 0.44, 11.0), (0.91, 0.45, 12.0)],
        "random": [(0.93, 0.50, 9.0), (0.90, 0.52, 9.5), (0.92, 0.49, 10.0)],
        "full": [(0.95, 0.55, 14.0), (0.94, 0.57, 15.0), (0.96, 0.56, 16.0)],
    }
    _fake_run(run_dir, numbers)
    cfg = load_config(None, ["seeds=3", "compare=[random, full]"])
    report = pipeline_report(cfg, run_dir)
    by = {m.method: m for m in report.methods}
    puma = by["puma"]
    assert [s.seed for s in puma.seeds] == [0, 1, 2]
    robust = [r for _, r, _ in numbers["puma"]]
    want = mean_interval(robust)
    assert puma.robust_acc == pytest.approx(sum(robust) / 3)
    assert puma.robust_ci["low"] == pytest.approx(want.low)
    # paired: mean of per-seed differences to full, not the difference of the means' CIs
    diffs = [a - b for a, b in zip(robust, [r for _, r, _ in numbers["full"]], strict=True)]
    assert puma.robust_vs_full["value"] == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert puma.robust_vs_full["high"] == pytest.approx(sum(diffs) / 3 + 4.3027 * sd / math.sqrt(3))
    assert by["full"].robust_vs_full is None
    table = report.table()
    assert "| puma | 100 | 3 | 0.9100 ± " in table
    assert f"{sum(diffs) / 3:+.4f} ± " in table
    assert "3 training seeds" in report.interval_note()
    metrics = report.metrics()
    assert metrics["puma.robust_acc_ci_low"] == pytest.approx(want.low)
    assert metrics["random.robust_vs_full"] == pytest.approx(
        sum(a - b for a, b in zip([0.50, 0.52, 0.49], [0.55, 0.57, 0.56], strict=True)) / 3
    )


def test_one_seed_reports_the_evaluations_own_interval(tmp_path):
    run_dir = str(tmp_path)
    _fake_run(run_dir, {"puma": [(0.9, 0.474, 10.0)]})
    report = pipeline_report(load_config(None, []), run_dir)
    (m,) = report.methods
    assert m.robust_ci == wilson_interval(237, 500).to_dict()
    assert "Wilson" in report.interval_note()


# ------------------------------------------------------------------------------------------------
# The formulas, against their definitions.


@pytest.mark.parametrize("k,n", [(0, 20), (237, 500), (500, 500), (3, 7)])
def test_wilson_interval_inverts_the_score_test(k, n):
    """Wilson's interval is {p: |k/n - p| <= z sqrt(p(1-p)/n)}: each interior end solves it."""
    ci = wilson_interval(k, n)
    z = NormalDist().inv_cdf(0.975)
    for p in (ci.low, ci.high):
        if 0 < p < 1:
            assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)
    assert ci.low <= k / n <= ci.high


def test_t_quantiles_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_mean_and_paired_intervals():
    ci = mean_interval([1.0, 2.0, 3.0])
    assert ci.value == 2.0 and ci.high - 2.0 == pytest.approx(4.3027 * 1.0 / math.sqrt(3))
    assert mean_interval([0.5]).low == mean_interval([0.5]).high == 0.5
    d = paired_difference([0.5, 0.6], [0.4, 0.5])
    assert d.value == pytest.approx(0.1) and d.low == pytest.approx(0.1)  # no spread
    with pytest.raises(ValueError):
        paired_difference([0.5], [0.4, 0.5])
