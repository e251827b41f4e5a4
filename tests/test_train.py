"""The train and evaluate stages on tiny builtin data: batch-level pieces (per-sample eps reaches
the attack, augmentation, schedule), the in-process loop, 2-worker DDP on a real local Ray
(disjoint shards, loss goes down, MLflow metrics), rerun/resume, a killed worker resumed from its
checkpoint, and evaluate on the saved model."""

import json
import os

import numpy as np
import pytest
import torch

from puma_ray.config import AttackConfig, load_config
from puma_ray.pipeline import margin_model_config
from puma_ray.train import EpochPlan, adversarial_batch, augment_batch, lr_factor, run_train

BASE = [
    # 96 real + 160 synthetic training rows, 16 real rows held out for validation
    "data.sources=[{type: builtin, real_train: 112, real_test: 64, synthetic: 160}]",
    "data.validation=16",
    "data.rows_per_shard=64",
    "pruning.strategy=random",
    "pruning.ratio=0.25",
    "pruning.eps_rule=none",
    "training.epochs=2",
    "training.batch_size=32",
    "training.lr=0.05",
    "training.warmup_epochs=0.5",
    "training.attack.steps=2",
    "margin_model.checkpoint=null",  # train one: the packaged model is the demo data's
    "margin_model.train.epochs=1",
    "margin_model.train.batch_size=32",
    "margin_model.train.attack.steps=2",
    "evaluation.subset=32",
    "evaluation.pgd_steps=3",
    "evaluation.batch_size=32",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
]


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, ray_local):
    """Ingested builtin shards plus a random kept set (the layout train reads)."""
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune

    run_dir = str(tmp_path_factory.mktemp("train_data"))
    cfg = _cfg()
    run_ingest(cfg, run_dir, parallel=False, log=_quiet)
    run_prune(cfg, run_dir, parallel=False, log=_quiet)
    return run_dir


def _fresh_run_dir(data_dir, tmp_path):
    """A run directory sharing the module's data (symlinks), with its own outputs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for sub in ("data", "kept"):
        os.symlink(os.path.join(data_dir, sub), run_dir / sub)
    return str(run_dir)


# --------------------------------------------------------------------------------------------
# Batch-level pieces.


def test_eps_zero_rows_train_clean():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 4, (6,))
    eps = torch.tensor([0.0, 0.1, 0.0, 0.05, 0.1, 0.0])
    for objective in ("pgd_at", "trades"):
        adv = adversarial_batch(
            model, x, y, eps, objective=objective, attack=AttackConfig(epsilon=0.1, steps=3)
        )
        delta = (adv - x).flatten(1).abs().amax(1)
        assert torch.all(delta[eps == 0] == 0), objective
        assert torch.all(delta <= eps + 1e-6), objective
        assert torch.all(delta[eps > 0] > 0), objective
    assert adversarial_batch(model, x, y, eps, objective="standard", attack=AttackConfig()) is x
    assert model.training  # the attack restores the caller's mode


def test_augment_batch_crops_and_flips():
    x = torch.rand(64, 3, 16, 16)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # An un-shifted, un-flipped sample is unchanged; shifted ones are still made of x's pixels.
    same = [(out[i] == x[i]).all() for i in range(64)]
    assert 0 < sum(bool(s) for s in same) < 64
    assert out.min() >= x.min() and out.max() <= x.max()


def test_epoch_plan_mixes_sources_and_sets_epoch_length():
    from puma_ray.config import TrainingConfig
    from puma_ray.train import epoch_plan

    both = {"real": 500, "synthetic": 3000}
    mixed = epoch_plan(both, TrainingConfig(batch_size=128), world=2)
    assert mixed.batch == {"real": 19, "synthetic": 45}  # round(0.3 * 64) per worker
    assert mixed.steps == -(-3500 // 128)  # as many samples as the set has
    # pruning the synthetic rows shortens the epoch (epoch_length: kept)
    assert (
        epoch_plan({"real": 500, "synthetic": 1500}, TrainingConfig(batch_size=128), 2).steps == 16
    )
    fixed = TrainingConfig(batch_size=128, epoch_length="fixed", samples_per_epoch=50_000)
    assert (
        epoch_plan(both, fixed, 2).steps
        == epoch_plan({"real": 9, "synthetic": 1}, fixed, 2).steps
        == 391
    )
    # one source, or real_fraction null: one stream, one pass per epoch (or fixed steps)
    for rows, tcfg in (
        ({"real": 0, "synthetic": 3000}, TrainingConfig(batch_size=128)),
        (both, TrainingConfig(batch_size=128, real_fraction=None)),
    ):
        assert epoch_plan(rows, tcfg, 2) == EpochPlan({"train": 64}, None)
    only_real = epoch_plan({"real": 700}, fixed, 1)
    assert only_real.batch == {"train": 128} and only_real.steps == 391
    assert epoch_plan(both, TrainingConfig(batch_size=10, real_fraction=0.0), 1).batch == {
        "synthetic": 10
    }


def test_stream_files_routes_shards_by_source():
    from puma_ray.train import stream_files

    files = ["a", "b", "c", "d"]
    counts = [
        {"real": 5, "synthetic": 0},
        {"real": 2, "synthetic": 3},
        {"real": 0, "synthetic": 9},
        None,
    ]
    routed = stream_files(files, counts, ["real", "synthetic"])
    assert routed == {"real": (["a", "b", "d"], True), "synthetic": (["b", "c", "d"], True)}
    pure = stream_files(files[::2], counts[::2], ["real", "synthetic"])
    assert pure == {"real": (["a"], False), "synthetic": (["c"], False)}
    assert stream_files(files, counts, ["train"]) == {"train": (files, False)}


def test_exact_batches_top_up_across_passes():
    import pyarrow as pa

    from puma_ray.train import _exact

    passes = [
        pa.table({"id": list(range(i, i + k))}) for i, k in ((0, 4), (4, 3), (10, 4), (14, 3))
    ]
    out = list(_exact(iter(passes), 4))
    assert [len(t) for t in out] == [4, 4, 4]  # the 2 left-over rows wait for more
    assert [t["id"].to_pylist() for t in out] == [[0, 1, 2, 3], [4, 5, 6, 10], [11, 12, 13, 14]]


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0


# --------------------------------------------------------------------------------------------
# The stage.


@pytest.mark.slow
@pytest.mark.ray
def test_in_process_train_then_rerun_is_noop(data_dir, tmp_path):
    run_dir = _fresh_run_dir(data_dir, tmp_path)
    cfg = _cfg("ray.num_workers=0", "training.objective=trades", "training.ema_decay=0.9")
    s = run_train(cfg, run_dir, log=_quiet)
    assert [m["epoch"] for m in s.history] == [1, 2]
    kept = json.load(open(os.path.join(run_dir, "kept", "manifest.json")))["counts"]["kept"]
    assert s.rows == kept < 256  # the epoch follows the kept set, not the full set
    assert os.path.exists(os.path.join(run_dir, "train", "model.pt"))
    saved = json.load(open(os.path.join(run_dir, "train", "summary.json")))
    assert saved["fingerprint"] == s.fingerprint
    again = run_train(cfg, run_dir, log=_quiet)
    assert again.skipped and len(again.history) == 2
    # a changed input never reuses the old checkpoint
    third = run_train(_cfg("ray.num_workers=0", "training.epochs=1"), run_dir, log=_quiet)
    assert not third.skipped and third.resumed_from_epoch == 0 and len(third.history) == 1


def _seen(debug, epoch, rank):
    return np.load(os.path.join(debug, f"ids-epoch{epoch}-rank{rank}.npz"))


def _kept_ids(run_dir, source):
    import pyarrow.parquet as pq

    from puma_ray.prune import kept_files

    table = pq.read_table(kept_files(os.path.join(run_dir, "kept"))[0], columns=["id", "source"])
    ids = table["id"].to_numpy()
    return set(ids[table["source"].to_numpy(zero_copy_only=False) == source].tolist())


@pytest.mark.slow
@pytest.mark.ray
def test_fixed_epoch_length_draws_mixed_batches_across_passes(data_dir, tmp_path):
    """epoch_length fixed: 100 samples per epoch whatever the kept set's size, every batch
    0.3 real; the real stream (96 rows, 10 per batch) runs out inside epoch 3 and carries on."""
    run_dir = _fresh_run_dir(data_dir, tmp_path)
    debug = str(tmp_path / "ids")
    cfg = _cfg(
        "ray.num_workers=0",
        "training.objective=standard",
        "training.epochs=3",
        "training.epoch_length=fixed",
        "training.samples_per_epoch=100",
    )
    s = run_train(cfg, run_dir, log=_quiet, debug_dir=debug)
    assert [(m["steps"], m["train_rows"]) for m in s.history] == [(4, 128)] * 3
    seen = [_seen(debug, e, 0) for e in range(3)]
    for d in seen:
        assert d["batch_rows"].tolist() == [32] * 4 and d["batch_real"].tolist() == [10] * 4
    real = np.concatenate([d["ids"][d["real"]] for d in seen])  # 120 draws of 96 real rows
    assert len(set(real[:96].tolist())) == 96 and set(real[96:]) <= set(real[:96])


@pytest.mark.slow
@pytest.mark.ray
def test_ddp_two_workers(data_dir, tmp_path):
    """2 CPU workers, batches of half real, half synthetic rows: every batch has the ratio, the
    workers see disjoint rows (the synthetic stream within an epoch, the smaller real stream
    within each of its passes), the loss goes down, the model and MLflow metrics are written; a
    rerun is a no-op, and without summary.json it resumes the finished Ray run."""
    run_dir = _fresh_run_dir(data_dir, tmp_path)
    debug = str(tmp_path / "ids")
    cfg = _cfg(
        "training.objective=standard", "training.label_smoothing=0", "training.real_fraction=0.5"
    )
    s = run_train(cfg, run_dir, log=_quiet, debug_dir=debug)
    assert [m["epoch"] for m in s.history] == [1, 2]
    assert s.history[-1]["train_loss"] < s.history[0]["train_loss"]
    real, synthetic = _kept_ids(run_dir, "real"), _kept_ids(run_dir, "synthetic")
    assert len(real) == 96 and len(real) + len(synthetic) == s.rows  # ~25% synthetic pruned
    steps = -(-s.rows // 32)  # an epoch is as many samples as the kept set has
    assert steps * 8 < len(synthetic) // 2  # so no worker's synthetic stream wraps in epoch 1
    for e in range(2):
        a, b = _seen(debug, e, 0), _seen(debug, e, 1)
        assert s.history[e]["steps"] == steps and s.history[e]["train_rows"] == steps * 32
        for d in (a, b):
            assert d["batch_rows"].tolist() == [16] * steps  # 32 over 2 workers
            assert d["batch_real"].tolist() == [8] * steps  # real_fraction 0.5
            assert set(d["ids"][d["real"]].tolist()) <= real
            assert set(d["ids"][~d["real"]].tolist()) <= synthetic
    a, b = _seen(debug, 0, 0), _seen(debug, 0, 1)
    # 56 synthetic rows per worker in epoch 1, of its ~60: no repeats, none shared
    syn_a, syn_b = a["ids"][~a["real"]], b["ids"][~b["real"]]
    assert len(set(syn_a)) == len(syn_a) == 56 and not set(syn_a) & set(syn_b)
    # the 48 real rows of each worker's first pass are its own; then the pass starts again
    first_a, first_b = set(a["ids"][a["real"]][:48]), set(b["ids"][b["real"]][:48])
    assert len(first_a) == len(first_b) == 48 and first_a | first_b == real
    for m in s.history:
        assert 0 <= m["val/epoch_robust_acc"] <= m["val/epoch_clean_acc"] <= 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(s.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(s.mlflow_run_id, "train_loss")) == 2
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith("file:///")

    assert run_train(cfg, run_dir, log=_quiet).skipped
    os.remove(os.path.join(run_dir, "train", "summary.json"))
    again = run_train(cfg, run_dir, log=_quiet)
    assert not again.skipped and again.resumed_from_epoch == 2
    assert [m["epoch"] for m in again.history] == [1, 2]
    assert again.mlflow_run_id == s.mlflow_run_id  # the same MLflow run continues


@pytest.mark.slow
@pytest.mark.ray
def test_full_dataset_margin_model_then_evaluate(data_dir, tmp_path):
    from puma_ray.evaluate import run_evaluate

    run_dir = _fresh_run_dir(data_dir, tmp_path)
    cfg = _cfg("ray.num_workers=0")
    s = run_train(
        margin_model_config(cfg), run_dir, dataset="full", name="margin_model", log=_quiet
    )
    assert s.rows == 256 and len(s.history) == 1  # margin_model.train.epochs
    ev = run_evaluate(cfg, run_dir, checkpoint=s.model_path, log=_quiet)
    assert ev.rows == 32
    assert 0 <= ev.pgd_acc <= ev.clean_acc <= 1
    assert ev.attacks_run == ["clean", "pgd-3"] and ev.autoattack_acc is None
    assert "PGD-3" in ev.format()
    saved = json.load(open(os.path.join(run_dir, "evaluate", "summary.json")))
    assert saved["clean_acc"] == ev.clean_acc

    # AutoAttack (standard, the reference pyautoattack from the eval/dev extra) on 8 rows
    aa_cfg = _cfg("ray.num_workers=0", "evaluation.autoattack=true", "evaluation.subset=8")
    aa = run_evaluate(aa_cfg, run_dir, checkpoint=s.model_path, name="evaluate_aa", log=_quiet)
    assert aa.attacks_run == ["clean", "pgd-3", "autoattack-standard (pyautoattack)"]
    assert 0 <= aa.autoattack_acc <= aa.clean_acc and aa.robust_acc == aa.autoattack_acc
    assert "AutoAttack (standard)" in aa.format()
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(f"sqlite:///{run_dir}/mlflow.db").get_run(aa.mlflow_run_id).data.metrics
    assert logged["test/autoattack_acc"] == aa.autoattack_acc
    assert logged["test/autoattack/square"] == aa.autoattack_stages["square"]


@pytest.mark.slow
@pytest.mark.ray
def test_pgd_at_beats_standard_training_on_pgd_accuracy(tmp_path, ray_local):
    """The same small CNN, data and steps: PGD-AT (eps 8/255, ramped in over 4 epochs) ends with
    a clearly higher PGD-5 accuracy than standard training, which learns only non-robust
    features; and it really learned (well above the 0.1 of a constant prediction)."""
    from puma_ray.evaluate import run_evaluate
    from puma_ray.ingest import run_ingest

    run_dir = str(tmp_path / "run")
    sets = [
        "data.sources=[{type: builtin, real_train: 1024, real_test: 256, synthetic: 0, "
        "noise: 0.04}]",
        "data.rows_per_shard=1024",
        "data.validation=0",  # no per-epoch check: the final evaluation is the measurement
        "training.epochs=10",
        "training.batch_size=32",
        "training.lr=0.05",
        "training.augment=false",
        "training.attack.steps=2",
        "training.attack.step_ratio=0.5",
        "training.eps_warmup_epochs=4",
        "evaluation.subset=256",
        "evaluation.pgd_steps=5",
        "ray.num_workers=0",
        "tracking.tracking_uri=none",
    ]
    run_ingest(load_config(None, sets), run_dir, parallel=False, log=_quiet)
    acc = {}
    for objective in ("standard", "pgd_at"):
        cfg = load_config(None, [*sets, f"training.objective={objective}"])
        s = run_train(cfg, run_dir, dataset="full", name=objective, log=_quiet)
        ev = run_evaluate(cfg, run_dir, s.model_path, name=f"eval_{objective}", log=_quiet)
        acc[objective] = (ev.clean_acc, ev.pgd_acc)
        if objective == "pgd_at":  # the ramp reaches the full radius after 4 of 10 epochs
            assert [m["eps_factor"] for m in s.history][2:5] == [0.75, 1.0, 1.0]
    assert acc["pgd_at"][0] > 0.3, acc
    assert acc["pgd_at"][1] >= acc["standard"][1] + 0.1, acc
