"""AutoAttack through the reference implementation (`pyautoattack`): per-stage numbers, agreement
with the reference's own `run_standard_evaluation`, channels_last inputs, seeding, and the
numbers reaching MLflow from `run_evaluate`. No Ray."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("pyautoattack")

from puma_ray.attacks.autoattack import (  # noqa: E402
    AutoAttackResult,
    attacks_of,
    autoattack,
    reference_autoattack,
)

# The published budgets (100 APGD iterations, 5000 Square queries) cut down so a test takes
# seconds; the code paths are the reference's.
CHEAP = {
    "apgd": {"n_iter": 8},
    "apgd_targeted": {"n_iter": 8, "n_target_classes": 2},
    "fab": {"n_iter": 8, "n_target_classes": 2},
    "square": {"n_queries": 30},
}
EPS = 4 / 255


def _model(classes: int = 10, to_channels_last: bool = False) -> nn.Module:
    """A small conv net; `to_channels_last` makes it switch its input to channels_last inside,
    as a channels_last-tuned model would."""
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, classes))

        def forward(self, x):
            if to_channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.head(self.conv(x))

    return Net().eval()


def _data(model: nn.Module, n: int = 30):
    """Rows the model mostly classifies correctly (labels are its own predictions, a few
    flipped), so every stage has robust rows to attack."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % model.head[-1].out_features
    return x, y


def test_stages_are_monotone_and_match_the_reference_run():
    model = _model()
    x, y = _data(model)
    res = autoattack(model, x, y, EPS, version="standard", batch_size=12, seed=7, options=CHEAP)
    counts = res.robust_counts()
    assert list(counts) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    values = list(counts.values())
    assert values == sorted(values, reverse=True)  # non-increasing, all <= clean
    assert counts["clean"] == len(x) - 3
    assert counts["apgd-ce"] < counts["clean"]  # the attack did something
    assert res.robust_acc == values[-1] / len(x)
    # independent check: one call of the reference's own evaluation on the same rows, batches
    # and seed fools exactly the same rows
    aa = reference_autoattack(model, EPS, version="standard", seed=7, num_classes=10, options=CHEAP)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=12)
    assert torch.equal(y_adv == y, res.robust)


def test_channels_last_inputs_no_longer_break_the_zero_gradient_check():
    model = _model(to_channels_last=True)
    x, y = _data(model)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # the failure being fixed: the reference flattens gradients with .view (APGD-T's check)
    aa = reference_autoattack(
        model, EPS, version="custom", attacks=["apgd-t"], seed=0, num_classes=10, options=CHEAP
    )
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        aa.run_standard_evaluation(x_cl, y, batch_size=30)
    kw = dict(version="custom", attacks=["apgd-t", "fab-t"], batch_size=30, options=CHEAP)
    res = autoattack(model, x_cl, y, EPS, **kw)
    assert torch.equal(res.broken_at, autoattack(model, x, y, EPS, **kw).broken_at)


def test_seeded_runs_repeat_and_leave_the_global_generator_alone():
    model = _model()
    x, y = _data(model)
    kw = dict(version="custom", attacks=["apgd-ce", "square"], batch_size=10, options=CHEAP)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = autoattack(model, x, y, EPS, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    b = autoattack(model, x, y, EPS, seed=1, **kw)
    assert torch.equal(a.broken_at, b.broken_at)
    # chunks evaluated apart add up: counts of the merge are the sums of the chunks' counts
    parts = [
        autoattack(model, x[i : i + 10], y[i : i + 10], EPS, seed=1, **kw) for i in (0, 10, 20)
    ]
    merged = AutoAttackResult.merge(parts)
    assert merged.rows == len(x)
    for key, value in merged.robust_counts().items():
        assert value == sum(p.robust_counts()[key] for p in parts)


def test_fewer_than_ten_classes_and_l2():
    model = _model(classes=4)
    x, y = _data(model, n=12)
    # standard asks for 9 target classes; with 4 classes the reference would index past them
    res = autoattack(
        model,
        x,
        y,
        0.3,
        norm="l2",
        version="standard",
        batch_size=12,
        options={
            "apgd": {"n_iter": 5},
            "apgd_targeted": {"n_iter": 5},
            "fab": {"n_iter": 5},
            "square": {"n_queries": 10},
        },
    )
    values = list(res.robust_counts().values())
    assert values == sorted(values, reverse=True)


def test_versions_and_attack_lists_are_checked():
    assert attacks_of("standard") == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert attacks_of("rand") == ("apgd-ce", "apgd-dlr")
    assert attacks_of("custom", ["square", "apgd-ce"]) == ("square", "apgd-ce")
    for version, attacks in (("custom", None), ("custom", ["pgd"]), ("standard", ["fab"])):
        with pytest.raises(ValueError):
            attacks_of(version, attacks)


def test_config_keeps_the_bool_and_checks_the_custom_list():
    from puma_ray.config import load_config
    from puma_ray.errors import ConfigError

    assert load_config(None, ["evaluation.autoattack=true"]).evaluation.autoattack_version == (
        "standard"
    )
    ok = load_config(
        None,
        ["evaluation.autoattack_version=custom", "evaluation.autoattack_attacks=[apgd-ce, fab]"],
    )
    assert ok.evaluation.autoattack_attacks == ["apgd-ce", "fab"]
    with pytest.raises(ConfigError, match="autoattack_attacks"):
        load_config(None, ["evaluation.autoattack_version=custom"])
    with pytest.raises(ConfigError, match="only used with autoattack_version: custom"):
        load_config(None, ["evaluation.autoattack_attacks=[square]"])


def test_run_evaluate_logs_every_stage_to_mlflow(tmp_path):
    """The evaluate stage with AutoAttack on: a builtin test split ingested in-process, a small
    CNN checkpoint, a real sqlite MLflow store; no Ray."""
    from mlflow.tracking import MlflowClient

    from puma_ray.config import load_config
    from puma_ray.evaluate import run_evaluate
    from puma_ray.ingest import run_ingest
    from puma_ray.models import create_model, save_checkpoint

    run_dir = str(tmp_path / "run")
    cfg = load_config(
        None,
        [
            "data.sources=[{type: builtin, real_train: 16, real_test: 12, synthetic: 0}]",
            "data.validation=0",
            "evaluation.subset=12",
            "evaluation.pgd_steps=2",
            "evaluation.batch_size=12",
            "evaluation.autoattack=true",
            "evaluation.autoattack_version=custom",
            "evaluation.autoattack_attacks=[apgd-ce, apgd-dlr]",
            "training.attack.epsilon=1/255",
        ],
    )
    run_ingest(cfg, run_dir, parallel=False, log=lambda _m: None)
    ckpt = str(tmp_path / "model.pt")
    torch.manual_seed(0)
    save_checkpoint(ckpt, create_model("small_cnn", 10))
    ev = run_evaluate(cfg, run_dir, ckpt, log=lambda _m: None)
    assert list(ev.autoattack_stages) == ["apgd-ce", "apgd-dlr"]
    assert ev.attacks_run[-1] == "autoattack-custom (pyautoattack)"
    assert ev.autoattack_acc == ev.autoattack_stages["apgd-dlr"] <= ev.clean_acc
    assert "APGD-DLR" in ev.format()
    store = f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}"
    logged = MlflowClient(store).get_run(ev.mlflow_run_id).data.metrics
    for stage, acc in ev.autoattack_stages.items():
        assert logged[f"test/autoattack/{stage}"] == pytest.approx(acc)
    assert logged["test/autoattack_acc"] == pytest.approx(ev.autoattack_acc)
