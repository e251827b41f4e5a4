"""`settings` dimensions of `sweep.space` without Ray: a list of settings (each a mapping of
search keys to values) crossed with the grid, checked as `--set` values are, expanded into
trials, and labelled in the report. The sweep itself runs in test_sweep.py (its restore test
sweeps one setting)."""

import json
import os
from types import SimpleNamespace

import pytest

from puma_ray.cli import main
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.report import SweepReport, _annotate, _row, _settings_keys
from puma_ray.sweep import apply_values, plan_sweep, sweep_fingerprint, trial_values
from puma_ray.sweep.plan import _describe, _fingerprint_dump, config_values
from puma_ray.sweep.trial import _trial_params
from puma_ray.tracking import _flatten

METHODS = (
    "sweep.space={method: {settings: ["
    "{pruning.strategy: random}, "
    "{name: high, pruning.strategy: high_margin}, "
    "{name: cap_drop, pruning.strategy: puma, pruning.eps_rule: margin_cap, "
    "pruning.misclassified: drop}, "
    "{name: scale, pruning.strategy: puma, pruning.eps_rule: scale_lowest}]}, "
    "pruning.ratio: {grid: [0.3, 0.6]}}"
)
STUDY = os.path.join(os.path.dirname(__file__), "..", "tune_configs", "study_builtin.yaml")
NORMS = "scoring.norm=linf"  # margin_cap compares linf margins with the linf training epsilon


def _cfg(*sets):
    return load_config(None, [NORMS, *sets])


def _values(plan) -> list[tuple[dict, bool]]:
    return [trial_values({"point": p, "sampled": {}}, plan.swept) for p in plan.points]


# --------------------------------------------------------------------------------------------
# Checked when the config loads: one line naming the setting's key.


@pytest.mark.parametrize(
    "space, expected",
    [
        (
            "{m: {settings: [{pruning.strategy: random}, {pruning.eps_rule: cap}]}}",
            "sweep.space.m.settings[1].pruning.eps_rule: Input should be 'none', "
            "'scale_lowest' or 'margin_cap' (got 'cap')",
        ),
        (
            "{m: {settings: [{pruning.ratio: 1.5}]}}",
            "sweep.space.m.settings[0].pruning.ratio: must be in [0, 1) (got 1.5)",
        ),
        (
            "{m: {settings: [{pruning.lr: 1}]}}",
            "sweep.space.m.settings[0].pruning.lr: not a key a setting can set (allowed: name, ",
        ),
        (
            "{m: {settings: [{training.seed: 1}]}}",
            "sweep.space.m.settings[0].training.seed: a seed is not part of a setting",
        ),
        (
            "{m: {settings: [{pruning.ratio: 0.5}]}, pruning.ratio: {grid: [0.3]}}",
            "sweep.space.m.settings[0].pruning.ratio: also swept by sweep.space.pruning.ratio",
        ),
        (
            "{m: {settings: [{pruning.ratio: 0.5}]}, n: {settings: [{pruning.ratio: 0.2}]}}",
            "sweep.space.n.settings[0].pruning.ratio: also swept by sweep.space.m",
        ),
        (
            "{m: {settings: [{pruning.ratio: 0.5}, {pruning.ratio: 0.5}]}}",
            "sweep.space.m.settings[1]: sets the same values as settings[0]",
        ),
        (
            "{m: {settings: [{name: a, pruning.ratio: 0.5}, {name: a, pruning.ratio: 0.4}]}}",
            "sweep.space.m.settings[1].name: 'a' also names settings[0]",
        ),
        (
            "{m: {settings: [{name: a b, pruning.ratio: 0.5}]}}",
            "sweep.space.m.settings[0].name: must be letters, digits, '_', '.', '+' or '-'",
        ),
        (  # a '|' would split the report's Markdown rows
            "{m: {settings: [{name: 'a|b', pruning.ratio: 0.5}]}}",
            "sweep.space.m.settings[0].name: must be letters, digits, '_', '.', '+' or '-'",
        ),
        (  # a trial's point marks the added baseline with this key
            "{baseline: {settings: [{pruning.ratio: 0.5}]}}",
            "sweep.space: baseline: a reserved name",
        ),
        ("{m: {settings: [{name: a}]}}", "sweep.space.m.settings[0]: sets no key"),
        ("{m: {settings: []}}", "sweep.space.m: settings is empty (give at least one setting)"),
        ("{m: {settings: [random]}}", "sweep.space.m.settings[0]: Input should be a valid"),
        (
            "{pruning.m: {settings: [{pruning.ratio: 0.5}]}}",
            "sweep.space: pruning.m: a settings dimension is named by a word without dots",
        ),
        (
            "{m: {grid: [1]}}",
            "sweep.space: unknown search key 'm' (allowed: pruning.ratio, ",
        ),
        (
            "{m: {grid: [1], settings: [{pruning.ratio: 0.5}]}}",
            "sweep.space.m: give exactly one of grid, choice, uniform, loguniform, settings",
        ),
    ],
)
def test_bad_setting_is_one_line_naming_its_path(space, expected):
    with pytest.raises(ConfigError) as info:
        _cfg(f"sweep.space={space}")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_setting_exits_2_before_anything_runs(capsys):
    bad = "sweep.space.method.settings=[{pruning.strategy: random}, {pruning.eps_rule: cap}]"
    assert main(["config", "--set", bad]) == 2
    err = capsys.readouterr().err
    assert "sweep.space.method.settings[1].pruning.eps_rule: Input should be" in err
    assert len(err.strip().splitlines()) == 1


def test_settings_are_parsed_and_named():
    cfg = _cfg("sweep.space={m: {settings: [{pruning.eps_scale: 1/2, pruning.ratio: 0}]}}")
    (setting,) = cfg.sweep.space["m"].settings
    # values parsed as their fields parse them; the default name is the values joined by '+'
    assert setting == {"name": "0.5+0", "pruning.eps_scale": 0.5, "pruning.ratio": 0.0}
    # --set gives a settings dimension whole, beside the space's other dimensions
    cfg = _cfg("sweep.space.m.settings=[{pruning.strategy: random}]")
    assert list(cfg.sweep.space) == ["pruning.ratio", "pruning.eps_scale", "m"]
    assert cfg.sweep.space["m"].kind == "settings"
    assert list(_cfg("sweep.space.m.settings=[{pruning.strategy: random}]", "sweep.space.m=null")
                .sweep.space) == ["pruning.ratio", "pruning.eps_scale"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The plan: settings crossed with the grid, the added baseline, repeats.


def test_settings_are_crossed_with_the_grid():
    cfg = _cfg(METHODS)
    plan = plan_sweep(cfg)
    # 4 settings x 2 ratios + the unpruned baseline the sweep adds
    assert plan.trials == 9 and plan.baseline_added and not plan.baseline_in_grid
    assert plan.swept == ["method", "pruning.ratio"]
    assert plan.setting_keys == ["pruning.strategy", "pruning.eps_rule", "pruning.misclassified"]
    labels, resolved = [], []
    for values, baseline in _values(plan):
        labels.append(_describe({"baseline": True} if baseline else values))
        p = apply_values(cfg, values).pruning
        resolved.append((p.strategy, p.ratio, p.eps_rule, p.misclassified))
    assert labels == [
        "method=random ratio=0.3",
        "method=random ratio=0.6",
        "method=high ratio=0.3",
        "method=high ratio=0.6",
        "method=cap_drop ratio=0.3",
        "method=cap_drop ratio=0.6",
        "method=scale ratio=0.3",
        "method=scale ratio=0.6",
        "unpruned baseline",
    ]
    # a key a setting does not set keeps the config's value (eps_rule scale_lowest, eps_rule)
    assert resolved == [
        ("random", 0.3, "scale_lowest", "eps_rule"),
        ("random", 0.6, "scale_lowest", "eps_rule"),
        ("high_margin", 0.3, "scale_lowest", "eps_rule"),
        ("high_margin", 0.6, "scale_lowest", "eps_rule"),
        ("puma", 0.3, "margin_cap", "drop"),
        ("puma", 0.6, "margin_cap", "drop"),
        ("puma", 0.3, "scale_lowest", "eps_rule"),
        ("puma", 0.6, "scale_lowest", "eps_rule"),
        ("none", 0.0, "none", "eps_rule"),
    ]


def test_repeats_give_every_setting_and_the_baseline_their_seeds():
    plan = plan_sweep(_cfg(METHODS, "sweep.num_samples=3", "training.seed=10"))
    assert plan.trials == 27 and plan.swept[-2:] == ["pruning.seed", "training.seed"]
    seeds = {}
    for values, baseline in _values(plan):
        key = "baseline" if baseline else (values["method"]["name"], values["pruning.ratio"])
        seeds.setdefault(key, []).append(values["training.seed"])
    assert len(seeds) == 9 and all(s == [10, 11, 12] for s in seeds.values())


def test_an_unpruned_setting_is_the_baseline_unless_crossed_into_copies():
    # alone (the ratio is per setting), a `strategy: none` setting is the unpruned reference
    space = (
        "sweep.space={method: {settings: [{name: full, pruning.strategy: none}, "
        "{name: rand, pruning.strategy: random, pruning.ratio: 0.5}]}}"
    )
    plan = plan_sweep(_cfg(space))
    assert plan.trials == 2 and plan.baseline_in_grid and not plan.baseline_added
    # (eps_rule applies to puma only: strategy none keeps every epsilon whatever eps_rule says)
    full, _ = _values(plan)[0]
    assert apply_values(_cfg(), full).pruning.eps_rule == "scale_lowest"
    # crossed with a ratio grid it would be one trial twice: refused, with the way out
    crossed = (
        "sweep.space={method: {settings: [{name: full, pruning.strategy: none}, "
        "{pruning.strategy: random}]}, pruning.ratio: {grid: [0.3, 0.6]}}"
    )
    with pytest.raises(ConfigError) as info:
        plan_sweep(_cfg(crossed))
    msg = str(info.value)
    assert msg.startswith("sweep.space.method.settings[0]: full keeps every sample")
    assert "crossed with pruning.ratio" in msg and "sweep.baseline: true" in msg
    # crossed with seeds only, its copies are replicates
    seeds = crossed.replace("pruning.ratio: {grid: [0.3, 0.6]}", "training.seed: {grid: [0, 1]}")
    assert plan_sweep(_cfg(seeds, "pruning.ratio=0.3")).trials == 4


def test_two_settings_dimensions_cross_like_grids():
    space = (
        "sweep.space={method: {settings: [{pruning.strategy: random}, {pruning.strategy: puma}]}, "
        "eps: {settings: [{pruning.eps_scale: 0.5}, {pruning.eps_scale: 0.25}]}, "
        "training.seed: {grid: [0, 1]}}"
    )
    plan = plan_sweep(_cfg(space))
    assert plan.trials == 2 * 2 * 2 + 1  # and the added baseline
    values, _ = _values(plan)[3]
    assert _describe(values) == "method=random eps=0.25 training_seed=1"
    assert config_values(values) == {
        "pruning.strategy": "random",
        "pruning.eps_scale": 0.25,
        "training.seed": 1,
    }


def test_a_settings_point_is_checked_as_a_trial_would_be():
    # margin_cap compares margins with the training epsilon: refused for that setting only
    with pytest.raises(ConfigError, match=r"^sweep.space: method=cap_drop ratio=0.3: pruning"):
        plan_sweep(load_config(None, [METHODS]))


def test_the_fingerprint_follows_the_settings():
    # a grid's fingerprint is the one it had before settings dimensions existed, so a sweep
    # started then still restores
    assert "settings" not in json.dumps(_fingerprint_dump(_cfg())["sweep"])
    a = sweep_fingerprint(_cfg(METHODS))
    assert sweep_fingerprint(_cfg(METHODS)) == a  # a rerun restores the same sweep
    assert sweep_fingerprint(_cfg(METHODS.replace("name: high,", "name: hi,"))) != a
    assert sweep_fingerprint(_cfg(METHODS.replace("drop}", "base_eps}"))) != a


# --------------------------------------------------------------------------------------------
# What a trial logs and how the report reads it back (fake MLflow runs, as the sweep logs them).


def _run(cfg, values, baseline, trial, robust, seed):
    info = {"trial": trial, "label": _describe(values), "values": values, "baseline": baseline}
    trial_cfg = apply_values(cfg, values)
    params = _flatten(_trial_params(trial_cfg, info, unpruned=baseline))
    params["training.seed"] = str(seed)  # run_train logs the training recipe
    metrics = {
        "test/clean_acc": 0.9,
        "test/robust_acc": robust,
        "val/robust_acc": robust,
        "val/clean_acc": 0.9,
        "device_seconds": 100.0,
        "kept_rows": 10,
    }
    tags = {
        "puma_ray.trial": trial,
        "puma_ray.label": info["label"],
        "puma_ray.baseline": str(baseline).lower(),
        "puma_ray.unpruned": str(baseline).lower(),
        "puma_ray.trial_status": "finished",
    }
    return SimpleNamespace(
        data=SimpleNamespace(params=params, metrics=metrics, tags=tags),
        info=SimpleNamespace(run_id=f"run-{trial}", run_name=trial, status="FINISHED"),
    )


def test_report_labels_settings_and_averages_their_seeds():
    cfg = _cfg(METHODS, "sweep.num_samples=2")
    plan = plan_sweep(cfg)
    space = {k: d.model_dump(exclude_none=True) for k, d in cfg.sweep.space.items()}
    settings = _settings_keys(json.dumps(space))  # as the parent run's sweep.space param
    assert settings["method"]["cap_drop"] == {
        "pruning.strategy",
        "pruning.eps_rule",
        "pruning.misclassified",
    }
    client = SimpleNamespace(get_metric_history=lambda run_id, key: [])
    rows = []
    for i, (values, baseline) in enumerate(_values(plan)):
        seed = config_values(values)["training.seed"]
        robust = 0.5 if baseline else 0.3 + 0.01 * i
        run = _run(cfg, values, baseline, f"trial_{i:05d}", robust, seed)
        rows.append(_row(client, run, plan.swept, plan.setting_keys, settings))
    report = SweepReport(
        experiment="e",
        tracking_uri="sqlite:///x",
        parent_run_id="p",
        sweep="s",
        metric="val/robust_acc",
        mode="max",
        swept=plan.swept,
        attack="PGD-20",
        rows=rows,
        setting_keys=plan.setting_keys,
    )
    _annotate(report)
    by_trial = {r.trial: r for r in report.rows}
    cap = by_trial["trial_00004"]  # cap_drop at ratio 0.3, seed 0
    assert cap.values == {
        "method": "cap_drop",
        "pruning.ratio": "0.3",
        "pruning.seed": "0",
        "training.seed": "0",
    }
    assert cap.setting_values == {
        "pruning.strategy": "puma",
        "pruning.eps_rule": "margin_cap",
        "pruning.misclassified": "drop",
    }
    # a key the trial's setting leaves alone is '—', not the config's value it ignores
    rand = by_trial["trial_00000"]
    assert rand.setting_values == {
        "pruning.strategy": "random",
        "pruning.eps_rule": "—",
        "pruning.misclassified": "—",
    }
    base = by_trial["trial_00008"]  # the added baseline: no setting, its own values
    assert base.added_baseline and base.values["method"] == "—"
    assert base.setting_values["pruning.strategy"] == "none"
    table = report.markdown()
    assert "| trial | status | method | ratio | strategy | eps_rule | misclassified | seed |" in (
        table
    )
    assert "| cap_drop | 0.3 | puma | margin_cap | drop | 0 | 0 |" in table
    head, *lines = report.csv_text().splitlines()
    assert head.startswith("trial,status,label,method,pruning.ratio,pruning.strategy,")
    assert len(lines) == 18
    # one setting per (method, ratio) and the baseline, each over its 2 seeds
    groups = {g.label: g for g in report.settings()}
    assert len(groups) == 9 and all(len(g.trials) == 2 for g in groups.values())
    cap_group = groups["method=cap_drop ratio=0.3"]
    assert cap_group.trials == ["trial_00013", "trial_00004"]  # ranked by val robust acc
    assert cap_group.test_robust.value == pytest.approx((0.34 + 0.43) / 2)
    assert cap_group.vs_baseline.value == pytest.approx((0.34 + 0.43) / 2 - 0.5)
    assert "method=cap_drop ratio=0.3 | 2 |" in report.format()


# --------------------------------------------------------------------------------------------
# The study's config (docs/study.md section 2): planned here, run by hand.


def test_study_config_is_the_study_it_says():
    cfg = load_config(STUDY)
    plan = plan_sweep(cfg)
    # (7 settings x 2 ratios + the unpruned baseline) x 3 seeds
    assert plan.trials == 45 and plan.baseline_added
    names = [s["name"] for s in cfg.sweep.space["method"].settings]
    assert names == [
        "random",
        "high_margin",
        "low_margin",
        "puma_scale",
        "puma_scale_drop",
        "puma_cap",
        "puma_cap_drop",
    ]
    resolved = {
        (p.strategy, p.eps_rule if p.strategy == "puma" else "-", p.misclassified, p.ratio)
        for values, baseline in _values(plan)
        if not baseline
        for p in [apply_values(cfg, values).pruning]
    }
    puma = {("puma", r, m) for r in ("scale_lowest", "margin_cap") for m in ("eps_rule", "drop")}
    assert {k[:3] for k in resolved} == puma | {
        (s, "-", "eps_rule") for s in ("random", "high_margin", "low_margin")
    }
    assert {k[3] for k in resolved} == {0.4, 0.8} and len(resolved) == 14
    (source,) = cfg.data.sources
    assert source.synthetic >= 10 * source.real_train
    t = cfg.training
    assert t.epoch_length == "fixed" and t.samples_per_epoch * t.epochs == 28000
    assert cfg.sweep.metric == "val/robust_acc" and cfg.data.has_validation
