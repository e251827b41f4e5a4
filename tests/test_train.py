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
from puma_ray.train import adversarial_batch, augment_batch, lr_factor, run_train

BASE = [
    "data.sources=[{type: builtin, real_train: 96, real_test: 64, synthetic: 160}]",
    "data.rows_per_shard=64",
    "pruning.strategy=random",
    "pruning.ratio=0.25",
    "pruning.eps_rule=none",
    "training.epochs=2",
    "training.batch_size=32",
    "training.lr=0.05",
    "training.warmup_epochs=0.5",
    "training.attack.steps=2",
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


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0


# --------------------------------------------------------------------------------------------
# The stage.


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


def test_ddp_two_workers(data_dir, tmp_path):
    """2 CPU workers: disjoint ids per epoch covering the kept set, the loss goes down, the
    model and MLflow metrics are written; a rerun is a no-op, and without summary.json it
    resumes the finished Ray run with the right epoch count."""
    run_dir = _fresh_run_dir(data_dir, tmp_path)
    debug = str(tmp_path / "ids")
    cfg = _cfg("training.objective=standard", "training.label_smoothing=0")
    s = run_train(cfg, run_dir, log=_quiet, debug_dir=debug)
    assert [m["epoch"] for m in s.history] == [1, 2]
    assert s.history[-1]["train_loss"] < s.history[0]["train_loss"]
    for e in range(2):
        a = np.load(os.path.join(debug, f"ids-epoch{e}-rank0.npy"))
        b = np.load(os.path.join(debug, f"ids-epoch{e}-rank1.npy"))
        # Ray's equal streaming split drops the odd row out, so every rank takes equal steps
        assert len(a) == len(b) == s.rows // 2 == s.history[e]["train_rows"] // 2
        assert not set(a) & set(b)
        assert len(set(a) | set(b)) == 2 * (s.rows // 2)
    for m in s.history:
        assert 0 <= m["test_robust_acc"] <= m["test_clean_acc"] <= 1

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


def test_killed_worker_resumes_from_checkpoint(data_dir, tmp_path):
    run_dir = _fresh_run_dir(data_dir, tmp_path)
    marker = str(tmp_path / "failed-once")
    cfg = _cfg("training.max_failures=1", "training.objective=standard")
    s = run_train(cfg, run_dir, log=_quiet, debug_fail={"rank": 1, "epoch": 1, "marker": marker})
    assert os.path.exists(marker)  # the worker really died once, at the start of epoch 2
    assert [m["epoch"] for m in s.history] == [1, 2]
    # epoch 2 ran in a second attempt that started from the epoch-1 checkpoint
    assert [m["attempt_start_epoch"] for m in s.history] == [0, 1]
    assert s.resumed_from_epoch == 0  # this call started fresh; Ray resumed it internally


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
    assert ev.attacks_run == ["clean", "pgd-3"]
    assert "PGD-3" in ev.format()
    saved = json.load(open(os.path.join(run_dir, "evaluate", "summary.json")))
    assert saved["clean_acc"] == ev.clean_acc
