"""Training on real data, safely: `force` restarts from epoch 0, the global batch and the lr
schedule do not depend on the worker count (and a resume that would change them is refused),
a retried epoch is logged to MLflow once, tracking URIs are redacted, and the Ray Data reads of
train and score verify the shards' page checksums."""

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from puma_ray.config import TrainingConfig, load_config
from puma_ray.errors import ConfigError, DataError
from puma_ray.tracking import RunHandle, redact
from puma_ray.train import (
    TrainingError,
    _checkpoint_metas,
    _last_reported_epoch,
    _LocalSession,
    _write_meta,
    batch_plan,
    check_resume,
    schedule_steps,
)

BASE = [
    "data.sources=[{type: builtin, real_train: 96, real_test: 64, synthetic: 160}]",
    "data.rows_per_shard=64",
    "pruning.strategy=random",
    "pruning.ratio=0.25",
    "pruning.eps_rule=none",
    "training.epochs=2",
    "training.batch_size=32",
    "training.objective=standard",
    "training.attack.steps=2",
    "margin_model.checkpoint=null",  # train one: the packaged model is the demo data's
    "margin_model.train.epochs=1",
    "margin_model.train.batch_size=32",
    "evaluation.subset=32",
    "evaluation.pgd_steps=2",
    "evaluation.batch_size=32",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
]


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


# ----------------------------------------------------------------------------------------------
# Tracking URIs with credentials (no Ray, no store).


def test_redact_hides_credentials_in_uris():
    assert redact("http://user:secret@mlflow.internal:5000") == "http://***@mlflow.internal:5000"
    assert redact("postgresql://u:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert (
        redact("https://host/api?x=1&token=abc&Password=p;api_key=k&run=2")
        == "https://host/api?x=1&token=***&Password=***;api_key=***&run=2"
    )
    # nothing secret: unchanged
    for uri in ("sqlite:////tmp/run/mlflow.db", "http://10.0.0.5:5000", "databricks", "", None):
        assert redact(uri) == uri
    # URIs inside a message (an MLflow error quoting the request URL)
    assert redact("request to https://a:b@h/api?secret=s failed") == (
        "request to https://***@h/api?secret=*** failed"
    )
    handle = RunHandle("http://user:secret@h:5000", "r1")
    assert "secret" not in repr(handle) and "***@h:5000" in repr(handle)


def test_mlflow_warning_does_not_print_the_password(tmp_path, monkeypatch):
    """An unreachable server with credentials in its URI: the one-line warning redacts them."""
    from puma_ray.config import TrackingConfig
    from puma_ray.tracking import start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    lines = []
    cfg = TrackingConfig(tracking_uri="http://user:hunter2@127.0.0.1:9/?token=t0ken")
    assert start_run(cfg, str(tmp_path), run_name="x", log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking disabled")
    assert "hunter2" not in lines[0] and "t0ken" not in lines[0]


# ----------------------------------------------------------------------------------------------
# The global batch and the lr schedule against the worker count (pure functions).


def test_global_batch_and_schedule_do_not_depend_on_workers():
    rows = {"real": 96, "synthetic": 120}
    for tcfg in (
        TrainingConfig(batch_size=36, epochs=3),
        TrainingConfig(batch_size=36, epochs=3, real_fraction=None),
        TrainingConfig(batch_size=36, epochs=3, epoch_length="fixed", samples_per_epoch=1000),
    ):
        plans = {w: batch_plan(rows, 216, tcfg, w) for w in (1, 2, 3, 4, 6)}
        assert {p["global_batch"] for p in plans.values()} == {36}
        assert {sum(p["rows_per_step"].values()) for p in plans.values()} == {36}
        expect = schedule_steps(216, tcfg)
        assert {(p["steps_per_epoch"], p["total_steps"]) for p in plans.values()} == {expect}
    assert schedule_steps(216, TrainingConfig(batch_size=36, epochs=3)) == (6, 18)
    # a batch that does not split equally is refused, naming both settings
    for w in (5, 7):
        with pytest.raises(ConfigError, match=rf"training.batch_size=36 .* ray.num_workers={w}"):
            batch_plan(rows, 216, TrainingConfig(batch_size=36), w)
    # the real rows of a mixed batch: round(0.3 * 512) = 154 whenever the workers can share them
    paper = TrainingConfig(batch_size=512)
    real = {w: batch_plan(rows, 10_000, paper, w)["rows_per_step"]["real"] for w in (1, 2, 4, 8)}
    assert real == {1: 154, 2: 154, 4: 152, 8: 152}  # 154 rows do not split over 4 or 8


def test_resume_with_another_batch_plan_is_refused_in_one_line():
    rows, tcfg = {"real": 96, "synthetic": 120}, TrainingConfig(batch_size=36)
    on1, on2, on3, on4 = (batch_plan(rows, 216, tcfg, w) for w in (1, 2, 3, 4))
    assert on1["rows_per_step"] == {"real": 11, "synthetic": 25}
    assert on2["rows_per_step"] == {"real": 10, "synthetic": 26}  # 11 do not split over 2
    with pytest.raises(TrainingError) as e:
        check_resume(on2, on1, "/runs/x/ray_train/train-abc/checkpoint_0")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("/runs/x/ray_train/train-abc/checkpoint_0: ")
    assert "trained on 2 workers" in msg and "ray.num_workers=1 gives" in msg
    assert "resume with ray.num_workers=2" in msg and "--force" in msg
    # 3 workers take 4 of 12 real rows each, 4 workers 3 each: the same plan, resumable
    assert on3["rows_per_step"] == on4["rows_per_step"] == {"real": 12, "synthetic": 24}
    check_resume(on3, on4, "c")
    check_resume(None, on1, "c")  # a checkpoint from before plans were recorded
    longer = batch_plan(rows, 216, TrainingConfig(batch_size=36, epochs=20), 1)
    with pytest.raises(TrainingError, match="lr-schedule steps"):
        check_resume(on1, longer, "c")


def test_checkpoint_plan_is_readable_without_loading_the_weights(tmp_path):
    """The driver reads `plan.json` beside each checkpoint to check a resume before it starts."""
    plan = batch_plan({"train": 10}, 10, TrainingConfig(batch_size=8), 2)
    local = tmp_path / "local-fp"
    _LocalSession({}, str(local), _quiet).report({}, {"epoch": 1, "batch_plan": plan})
    assert _checkpoint_metas(str(local)) == [(str(local), {"epoch": 1, "batch_plan": plan})]
    ray_run = tmp_path / "ray_train" / "train-fp"
    for i, epoch in enumerate((0, 3)):
        (ray_run / f"checkpoint_{i}").mkdir(parents=True)
        _write_meta(str(ray_run / f"checkpoint_{i}"), {"epoch": epoch, "batch_plan": plan})
    (ray_run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _last_reported_epoch(str(ray_run)) == 4
    assert [m["epoch"] for _, m in _checkpoint_metas(str(ray_run))] == [0, 3]
    assert _checkpoint_metas(str(tmp_path / "missing")) == []


# ----------------------------------------------------------------------------------------------
# MLflow: an epoch logged twice (a real sqlite store, no Ray).


def test_log_new_metrics_skips_steps_already_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    from puma_ray.config import TrackingConfig
    from puma_ray.tracking import start_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_run(TrackingConfig(tracking_uri=uri), str(tmp_path), run_name="t", log=print)
    run.log_new_metrics({"loss": 1.0, "acc": 0.5}, 1)
    run.log_new_metrics({"loss": 0.9, "acc": 0.6}, 2)
    run.log_new_metrics({"loss": 7.0, "acc": 7.0}, 2)  # epoch 2 again, after a resume
    run.log_new_metrics({"loss": 0.8, "lr": 0.1}, 3)  # a key first seen at step 3
    client = MlflowClient(uri)
    history = {k: client.get_metric_history(run.run_id, k) for k in ("loss", "acc", "lr")}
    assert [(m.step, m.value) for m in history["loss"]] == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert [m.step for m in history["acc"]] == [1, 2] and [m.step for m in history["lr"]] == [3]


# ----------------------------------------------------------------------------------------------
# Page checksums in the Ray Data reads.


def _flip_image_byte(path: str) -> None:
    """Flip one byte in the middle of row group 0's image column (its page data)."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    col = md.row_group(0).column(names.index("image"))
    start = col.dictionary_page_offset or col.data_page_offset
    offset = start + col.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.ray
def test_ray_data_read_verifies_page_checksums(tmp_path, ray_local):
    """A shard with checksums and one flipped image byte: pyarrow and plain Ray Data read it
    silently as a different image; the read score and train use raises."""
    from puma_ray.config import RayConfig
    from puma_ray.data import write_shard
    from puma_ray.data.shards import shard_name
    from puma_ray.runtime import ensure_ray, is_checksum_error, read_parquet

    ensure_ray(RayConfig())  # the stages' Ray Data settings (the V1 Parquet datasource)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)  # incompressible: stored raw
    write_shard(str(tmp_path), 0, (8, 8, 3), [(np.arange(64), images, np.zeros(64), "real")])
    path = os.path.join(str(tmp_path), shard_name(0))
    assert read_parquet([path]).count() == 64  # an intact shard reads
    raw = open(path, "rb").read()
    target = images[21].tobytes()
    at = raw.find(target)
    assert at > 0  # zstd kept the random bytes as they are
    with open(path, "r+b") as f:
        f.seek(at + 7)
        f.write(bytes([raw[at + 7] ^ 0xFF]))
    silent = pq.read_table(path).column("image")[21].as_py()
    assert silent != target  # without verification: a different image, no error
    rows = ray_local.data.read_parquet([path]).take_all()
    assert len(rows) == 64 and rows[21]["image"] != target
    with pytest.raises(Exception, match="checksum verification failed") as e:
        read_parquet([path]).take_all()
    assert is_checksum_error(e.value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, ray_local):
    """Ingested builtin shards plus a random kept set."""
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune

    run_dir = str(tmp_path_factory.mktemp("safety_train_data"))
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    run_prune(_cfg(), run_dir, parallel=False, log=_quiet)
    return run_dir


def _fresh_run_dir(data_dir, tmp_path, copy: bool = False):
    """A run directory with the module's data (symlinked, or copied to be corrupted)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for sub in ("data", "kept"):
        if copy:
            shutil.copytree(os.path.join(data_dir, sub), run_dir / sub)
        else:
            os.symlink(os.path.join(data_dir, sub), run_dir / sub)
    return str(run_dir)


@pytest.mark.ray
@pytest.mark.slow
def test_train_and_score_refuse_a_corrupt_shard(data_dir, tmp_path):
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.models import create_model, save_checkpoint
    from puma_ray.score import run_score
    from puma_ray.train import run_train

    run_dir = _fresh_run_dir(data_dir, tmp_path, copy=True)
    shard = open_dataset(dataset_dirs(run_dir)[0]).files[1]
    _flip_image_byte(shard)
    cfg = _cfg("ray.num_workers=0", "training.epochs=1")
    with pytest.raises(DataError, match="failed its checksum") as e:
        run_train(cfg, run_dir, dataset="full", name="margin_model", log=_quiet)
    assert str(e.value).startswith(os.path.dirname(shard)) and "\n" not in str(e.value)

    model = os.path.join(run_dir, "margin_model.pt")
    save_checkpoint(model, create_model("small_cnn", 10), image_shape=(32, 32, 3))
    score_cfg = _cfg(
        f"margin_model.checkpoint={model}",
        "scoring.max_iter=2",
        "scoring.pool_min=1",
        "scoring.pool_max=1",
    )
    with pytest.raises(Exception, match="checksum verification failed"):
        run_score(score_cfg, run_dir, log=_quiet)


# ----------------------------------------------------------------------------------------------
# The stage on a real local Ray.


@pytest.mark.ray
@pytest.mark.slow
def test_force_trains_again_from_epoch_zero_in_a_new_mlflow_run(data_dir, tmp_path):
    from puma_ray.train import run_train

    run_dir = _fresh_run_dir(data_dir, tmp_path)
    cfg = _cfg("ray.num_workers=0")
    first = run_train(cfg, run_dir, log=_quiet)
    assert run_train(cfg, run_dir, log=_quiet).skipped
    # without summary.json a rerun would resume the local checkpoint after epoch 2
    os.remove(os.path.join(run_dir, "train", "summary.json"))
    forced = run_train(cfg, run_dir, log=_quiet, force=True)
    assert not forced.skipped and forced.resumed_from_epoch == 0
    assert [m["epoch"] for m in forced.history] == [1, 2]
    assert [m["attempt_start_epoch"] for m in forced.history] == [0, 0]
    assert forced.mlflow_run_id != first.mlflow_run_id
    # a finished run is not reused either
    again = run_train(cfg, run_dir, log=_quiet, force=True)
    assert not again.skipped and again.resumed_from_epoch == 0


@pytest.mark.ray
@pytest.mark.slow
def test_retried_epoch_is_logged_to_mlflow_once(data_dir, tmp_path):
    """Rank 0 logs epoch 2 to MLflow, then dies before the epoch's checkpoint is reported: Ray
    Train reruns epoch 2 from the epoch-1 checkpoint, and that rerun must not log step 2 again.
    (Also the suite's test of a worker killed mid-run resuming from its last checkpoint.)"""
    from mlflow.tracking import MlflowClient

    from puma_ray.train import run_train

    run_dir = _fresh_run_dir(data_dir, tmp_path)
    marker = str(tmp_path / "failed-once")
    cfg = _cfg("training.max_failures=1", "training.real_fraction=null")
    fail = {"rank": 0, "epoch": 1, "marker": marker, "at": "report"}
    s = run_train(cfg, run_dir, log=_quiet, debug_fail=fail)
    assert os.path.exists(marker)  # rank 0 really died once, after logging epoch 2
    assert [m["epoch"] for m in s.history] == [1, 2]
    assert [m["attempt_start_epoch"] for m in s.history] == [0, 1]  # epoch 2 ran twice
    assert s.resumed_from_epoch == 0  # this call started fresh; Ray resumed it internally
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    keys = client.get_run(s.mlflow_run_id).data.metrics
    assert {"train_loss", "epoch", "lr"} <= set(keys)
    for key in keys:
        steps = [m.step for m in client.get_metric_history(s.mlflow_run_id, key)]
        assert sorted(steps) == [1, 2], (key, steps)


@pytest.mark.ray
@pytest.mark.slow
def test_resume_on_other_workers_is_refused_and_force_starts_over(data_dir, tmp_path):
    """A global batch of 36 with 30% real rows: 2 workers take 5 + 13 each (10 real), 1 worker
    11 + 25. A run stopped after epoch 1 on 2 workers is not resumed on 1; --force starts over."""
    from puma_ray.train import run_train

    run_dir = _fresh_run_dir(data_dir, tmp_path)
    marker = str(tmp_path / "failed-once")
    two = _cfg("training.batch_size=36", "training.max_failures=0")
    with pytest.raises(TrainingError, match="failed after 0 retries"):
        run_train(two, run_dir, log=_quiet, debug_fail={"rank": 1, "epoch": 1, "marker": marker})
    # the same recipe (and so the same Ray run), on one worker
    one = _cfg("training.batch_size=36", "training.max_failures=0", "ray.num_workers=1")
    with pytest.raises(TrainingError) as e:
        run_train(one, run_dir, log=_quiet)
    msg = str(e.value)
    assert "\n" not in msg and "ray_train" in msg.split(":")[0]
    assert "trained on 2 workers" in msg and "10 real" in msg and "11 real" in msg
    s = run_train(one, run_dir, log=_quiet, force=True)
    assert s.resumed_from_epoch == 0 and [m["attempt_start_epoch"] for m in s.history] == [0, 0]
    assert s.history[-1]["steps"] == 6  # 216 kept rows / 36
