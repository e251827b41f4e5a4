"""Sweeps that do not simply run to the end, on the session's Ray and a real MLflow store: the
driver SIGKILLed while a trial trains, then the same command restores the sweep and finishes it
(the finished trial is not run again, the killed one resumes its epoch checkpoint); ASHA
stopping a trial after its grace epoch; `puma-ray sweep --fresh` starting over where a plain
rerun restores. The trials prune at random (no margin model, no scores: the inputs are only the
ingested shards) and train 2-3 epochs on a couple of hundred rows."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from puma_ray.config import load_config
from puma_ray.sweep import run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE = [
    "data.sources=[{type: builtin, real_train: 0, real_test: 32, synthetic: 192}]",
    "data.rows_per_shard=1024",
    "pruning.strategy=random",  # nothing ranks by margin: no margin model, no scoring
    "pruning.eps_rule=none",
    "training.epochs=2",
    "training.batch_size=32",
    "training.attack.steps=1",
    "evaluation.subset=16",
    "evaluation.epoch_subset=16",
    "evaluation.pgd_steps=1",
    "evaluation.epoch_pgd_steps=1",
    "evaluation.batch_size=16",
    "tracking.experiment=sweep-failures",
]
# one pruned point; the unpruned baseline is added as a second trial
RATIO = "sweep.space={pruning.ratio: {grid: [0.5]}}"
IN_PROCESS = ["ray.num_workers=0", "ray.cpus_per_worker=0.5"]


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The ingested shards every sweep here shares (read-only, through symlinks)."""
    from puma_ray.ingest import run_ingest

    run_dir = str(tmp_path_factory.mktemp("sweep_failures_data"))
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    return run_dir


def _run_dir(data_dir, path) -> str:
    path.mkdir()
    os.symlink(os.path.join(data_dir, "data"), path / "data")
    return str(path)


def _trials(run_dir) -> dict[str, dict]:
    """trial name -> its trial.json, for every trial a sweep in `run_dir` has started."""
    out = {}
    for path in glob.glob(os.path.join(run_dir, "sweep", "*", "trial_*", "trial.json")):
        with open(path) as f:
            out[os.path.basename(os.path.dirname(path))] = json.load(f)
    return out


def _mlflow(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    exp = client.get_experiment_by_name("sweep-failures")
    return client, {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}


def _mtime(*parts) -> int:
    return os.stat(os.path.join(*parts)).st_mtime_ns


# ----------------------------------------------------------------------------------------------
# The driver killed mid-trial, then restored.

# The sweep driver, as `puma-ray sweep` runs it, in its own process (joined to the session's
# Ray through RAY_ADDRESS). The trial function is wrapped so that the baseline trial, once its
# first epoch is checkpointed, writes `hang` and waits there to be killed: the kill then lands
# mid-trial, after a checkpoint, every time. The wrapper keeps the function's name, which Tune
# records and checks on restore.
_DRIVER = """
import json, os, sys, time
args = json.loads(sys.argv[1])
HANG = args["hang"]
import puma_ray.sweep
from puma_ray.config import load_config

def _trial_fn(config, ctx):
    if config["point"].get("baseline"):
        from puma_ray import train
        report = train._LocalSession.report
        def report_then_hang(self, metrics, state):
            report(self, metrics, state)
            if metrics["epoch"] == 1:
                with open(HANG, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)
                os._exit(3)
        train._LocalSession.report = report_then_hang
    from puma_ray.sweep import _trial_fn as trial
    return trial(config, ctx)

# where run_sweep looks the trial function up (its own module's globals)
puma_ray.sweep.run_sweep.__globals__["_trial_fn"] = _trial_fn
result = puma_ray.sweep.run_sweep(load_config(None, args["sets"]), args["run_dir"], log=print)
print("RESULT " + json.dumps(result.trials))
"""


def test_sweep_killed_mid_trial_is_restored_and_finished(ray_local, data_dir, tmp_path):
    run_dir = _run_dir(data_dir, tmp_path / "run")
    sets = BASE + [RATIO, "sweep.max_concurrent_trials=2", *IN_PROCESS]
    hang = str(tmp_path / "baseline-trial-waits")
    log_path = tmp_path / "driver.log"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    args = json.dumps({"sets": sets, "run_dir": run_dir, "hang": hang})
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: killed whole, like a lost node
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            # the kill point: the pruned trial has finished, the baseline trial waits after its
            # first checkpointed epoch, and Tune has saved the experiment's state
            sweep_dir = _sweep_dir(run_dir)
            done = [
                t
                for t, info in _trials(run_dir).items()
                if not info["baseline"]
                and os.path.exists(os.path.join(sweep_dir, t, "result.json"))
            ]
            states = glob.glob(os.path.join(sweep_dir, "tune", "experiment_state*"))
            if done and os.path.exists(hang) and states:
                break
            if driver.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the sweep ended or stalled before the kill point (exit {driver.poll()}): "
                    + log_path.read_text()[-4000:]
                )
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL

    sweep_dir = _sweep_dir(run_dir)
    trials = _trials(run_dir)
    assert len(trials) == 2
    pruned = next(t for t, info in trials.items() if not info["baseline"])
    baseline = next(t for t, info in trials.items() if info["baseline"])
    assert not os.path.exists(os.path.join(sweep_dir, baseline, "result.json"))
    base_train = os.path.join(sweep_dir, baseline, "train")
    local = glob.glob(os.path.join(base_train, "local-*", "state.pt"))
    assert len(local) == 1 and not os.path.exists(os.path.join(base_train, "model.pt"))
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        parent_id = json.load(f)["parent_run_id"]
    finished = {
        "result": open(os.path.join(sweep_dir, pruned, "result.json")).read(),
        "train": _mtime(sweep_dir, pruned, "train", "summary.json"),
        "model": _mtime(sweep_dir, pruned, "train", "model.pt"),
        "evaluate": _mtime(sweep_dir, pruned, "evaluate_test", "summary.json"),
    }

    # the same command again, in this process: Tune restores the sweep and finishes it
    logs = []
    second = run_sweep(load_config(None, sets), run_dir, log=logs.append)
    assert second.restored and second.complete and second.sweep_dir == sweep_dir
    assert second.trials == {pruned: "finished", baseline: "finished"}
    assert second.parent_run_id == parent_id
    assert any("restoring the interrupted sweep" in m for m in logs)

    # the finished trial was not run again (at most re-entered, to find its result.json)
    assert open(os.path.join(sweep_dir, pruned, "result.json")).read() == finished["result"]
    assert _mtime(sweep_dir, pruned, "train", "summary.json") == finished["train"]
    assert _mtime(sweep_dir, pruned, "train", "model.pt") == finished["model"]
    assert _mtime(sweep_dir, pruned, "evaluate_test", "summary.json") == finished["evaluate"]
    # the killed one started again from its epoch-1 checkpoint
    attempts = open(os.path.join(sweep_dir, baseline, "attempts.log")).read().splitlines()
    assert len(attempts) == 2
    with open(os.path.join(base_train, "summary.json")) as f:
        summary = json.load(f)
    assert summary["resumed_from_epoch"] == 1
    assert [m["attempt_start_epoch"] for m in summary["history"]] == [0, 1]
    with open(os.path.join(sweep_dir, baseline, "result.json")) as f:
        assert not json.load(f)["metrics"]["train_skipped"]

    # MLflow: one parent and one run per trial, none duplicated, every epoch logged once
    client, runs = _mlflow(run_dir)
    assert len(runs) == 3 and parent_id in runs
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    children = [r for r in runs.values() if r.info.run_id != parent_id]
    assert sorted(r.data.tags["puma_ray.trial"] for r in children) == sorted([pruned, baseline])
    killed_run = next(r for r in children if r.data.tags["puma_ray.trial"] == baseline)
    steps = [m.step for m in client.get_metric_history(killed_run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2]


def _sweep_dir(run_dir) -> str:
    found = glob.glob(os.path.join(run_dir, "sweep", "*-*"))
    return found[0] if len(found) == 1 else os.path.join(run_dir, "sweep", "<not yet>")


# ----------------------------------------------------------------------------------------------
# ASHA.


def test_asha_stops_the_weaker_trial_after_its_grace_epoch(
    ray_local, data_dir, tmp_path, monkeypatch
):
    """Two trials one after the other, 3 epochs each, ASHA with grace 1 and reduction factor 2:
    at epoch 1 the second trial must beat the first or stop. The per-epoch robust accuracy Tune
    sees is pinned (first trial 0.5, second 0.0) where the trial relays Ray Train's reports to
    Tune, so the decision is known in advance; the Train runs, TuneReportCallback, the ASHA
    scheduler, Tune stopping the trial and the sweep's bookkeeping are the real ones. The
    stopped trial's Train run is then held at that report, so it cannot finish first."""
    first = str(tmp_path / "first-trial")

    def _trial_fn(config, ctx):  # runs in the Tune trial's process
        import ray.tune.integration.ray_train as relay

        try:
            os.close(os.open(first, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            pinned = 0.5
        except FileExistsError:
            pinned = 0.0
        # Ray's own class (also if Tune ran an earlier trial in this process)
        base = getattr(relay, "_unpinned", relay.TuneReportCallback)
        relay._unpinned = base

        class PinnedReport(base):
            def after_report(self, run_context, metrics, checkpoint):
                metrics = [{**m, "val/epoch_robust_acc": pinned} for m in metrics]
                super().after_report(run_context, metrics, checkpoint)
                if pinned == 0.0:
                    time.sleep(120)  # until Tune stops this trial

        relay.TuneReportCallback = PinnedReport
        from puma_ray.sweep import _trial_fn as trial

        return trial(config, ctx)

    # where run_sweep looks the trial function up (its own module's globals)
    monkeypatch.setitem(run_sweep.__globals__, "_trial_fn", _trial_fn)
    run_dir = _run_dir(data_dir, tmp_path / "run")
    cfg = _cfg(
        "sweep.space={pruning.ratio: {grid: [0.0, 0.5]}}",  # ratio 0 is the unpruned baseline
        "sweep.asha=true",
        "sweep.asha_grace_epochs=1",
        "sweep.asha_reduction_factor=2",
        "sweep.max_concurrent_trials=1",
        "training.epochs=3",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
    )
    result = run_sweep(cfg, run_dir, log=_quiet)
    assert sorted(result.trials.values()) == ["finished", "stopped early"]
    assert result.complete  # a trial ASHA stopped is done, not left to restore
    stopped = next(t for t, s in result.trials.items() if s == "stopped early")
    finished = next(t for t, s in result.trials.items() if s == "finished")

    epochs = {t: _tune_epochs(result.sweep_dir, t) for t in result.trials}
    assert max(epochs[finished]) == 3 and sorted(set(epochs[finished])) == [1, 2, 3]
    assert epochs[stopped] == [1], epochs  # Tune took one epoch of the stopped trial, of 3
    tdir = os.path.join(result.sweep_dir, stopped)
    assert not os.path.exists(os.path.join(tdir, "result.json"))
    assert not os.path.exists(os.path.join(tdir, "train", "model.pt"))
    assert os.path.exists(os.path.join(result.sweep_dir, finished, "result.json"))

    client, runs = _mlflow(run_dir)
    by_trial = {r.data.tags.get("puma_ray.trial"): r for r in runs.values()}
    assert by_trial[stopped].data.tags["puma_ray.trial_status"] == "stopped early"
    assert by_trial[stopped].info.status == "KILLED"
    assert by_trial[finished].data.tags["puma_ray.trial_status"] == "finished"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_stopped_early"] == 1
    assert parent.data.metrics["trials_finished"] == 1


def _tune_epochs(sweep_dir, trial) -> list[int]:
    """The `epoch` of every result Tune recorded for `trial` (its result.json, JSON lines)."""
    paths = glob.glob(os.path.join(sweep_dir, "tune", trial, "result.json"))
    assert paths, f"no Tune results for {trial} in {sweep_dir}/tune"
    with open(paths[0]) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# --fresh.


def test_rerun_restores_and_fresh_starts_over(ray_local, data_dir, tmp_path, capsys):
    from puma_ray.cli import main

    run_dir = _run_dir(data_dir, tmp_path / "run")
    # one trial: ratio 0 with eps_rule none is the unpruned baseline itself
    sets = BASE + ["sweep.space={pruning.ratio: {grid: [0.0]}}", "training.epochs=1"]
    sets += IN_PROCESS
    argv = ["sweep", *[a for s in sets for a in ("--set", s)], "--run-dir", run_dir]

    assert main(argv) == 0
    (trial,) = _trials(run_dir)
    sweep_dir = _sweep_dir(run_dir)
    tdir = os.path.join(sweep_dir, trial)
    first = {
        "parent": json.load(open(os.path.join(sweep_dir, "sweep.json")))["parent_run_id"],
        "result": _mtime(tdir, "result.json"),
        "model": _mtime(tdir, "train", "model.pt"),
    }

    # a plain rerun restores the finished sweep: nothing runs again
    capsys.readouterr()
    assert main(argv) == 0
    assert "restoring the interrupted sweep" in capsys.readouterr().out
    parent = json.load(open(os.path.join(sweep_dir, "sweep.json")))["parent_run_id"]
    assert parent == first["parent"]
    assert _mtime(tdir, "result.json") == first["result"]
    assert len(open(os.path.join(tdir, "attempts.log")).read().splitlines()) == 1

    # --fresh deletes the sweep and runs every trial again, under a new MLflow parent run
    assert main([*argv, "--fresh"]) == 0
    assert "--fresh: deleting the earlier trials" in capsys.readouterr().out
    assert _trials(run_dir).keys() == {trial}
    parent = json.load(open(os.path.join(sweep_dir, "sweep.json")))["parent_run_id"]
    assert parent != first["parent"]
    assert len(open(os.path.join(tdir, "attempts.log")).read().splitlines()) == 1
    assert _mtime(tdir, "result.json") > first["result"]
    assert _mtime(tdir, "train", "model.pt") > first["model"]
    with open(os.path.join(tdir, "train", "summary.json")) as f:
        assert json.load(f)["resumed_from_epoch"] == 0  # trained from scratch

    client, runs = _mlflow(run_dir)
    parents = [r for r in runs.values() if r.data.tags.get("puma_ray.stage") == "sweep"]
    assert sorted(r.info.run_id for r in parents) == sorted([first["parent"], parent])
    for p in parents:
        assert p.info.status == "FINISHED"
        children = [
            r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
        ]
        assert len(children) == 1 and children[0].info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------
# The test split decides nothing.


def _scramble_test_labels(data_dir, run_dir) -> None:
    """`run_dir` sees `data_dir`'s train and val shards (symlinks) and a copy of its test split
    in which every label is wrong ((label + 1) mod classes), written in place of the shards'
    label column; dataset.json keeps everything ingest wrote but the files' new sizes (which
    readers check), so no stage sees a changed config or dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(run_dir, "data"))
    for split in ("train", "val"):
        os.symlink(os.path.join(data_dir, "data", split), os.path.join(run_dir, "data", split))
    src, dst = os.path.join(data_dir, "data", "test"), os.path.join(run_dir, "data", "test")
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".parquet"):
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
            continue
        table = pq.read_table(os.path.join(src, name))
        labels = table.column("label").to_numpy()
        wrong = pa.array(((labels + 1) % 10).astype(labels.dtype), table.schema.field("label").type)
        table = table.set_column(table.schema.get_field_index("label"), "label", wrong)
        pq.write_table(table, os.path.join(dst, name))
    manifest = os.path.join(dst, "dataset.json")
    with open(manifest) as f:
        info = json.load(f)
    for shard in info["shards"]:
        shard["bytes"] = os.path.getsize(os.path.join(dst, shard["file"]))
    with open(manifest, "w") as f:
        json.dump(info, f)


def _decisions(run_dir, result) -> dict:
    """What the sweep decided and on what: every trial's status, the epochs Tune saw, its
    per-epoch validation curve, its final validation numbers, and the best trial."""
    client, runs = _mlflow(run_dir)
    out = {"best": result.report.best.label, "trials": {}}
    for run in runs.values():
        label = run.data.tags.get("puma_ray.label")
        if label is None:  # the parent
            continue
        trial = run.data.tags["puma_ray.trial"]
        history = client.get_metric_history(run.info.run_id, "val/epoch_robust_acc")
        out["trials"][label] = {
            "status": result.trials[trial],
            "epochs": _tune_epochs(result.sweep_dir, trial),
            "val_curve": sorted((h.step, h.value) for h in history),
            "val": {k: v for k, v in run.data.metrics.items() if k.startswith("val/")},
        }
    return out


def test_scrambled_test_labels_change_no_training_time_decision(ray_local, data_dir, tmp_path):
    """The same ASHA sweep on the same data, once with the test split's labels all wrong: the
    per-epoch validation metrics, ASHA's decisions and the best trial are identical; only the
    final test numbers move (to about zero)."""
    sets = (
        "sweep.space={pruning.ratio: {grid: [0.0, 0.5]}}",
        "sweep.asha=true",
        "sweep.asha_grace_epochs=1",
        "sweep.asha_reduction_factor=2",
        "sweep.max_concurrent_trials=1",
        "training.epochs=2",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
    )
    clean_dir = _run_dir(data_dir, tmp_path / "clean")
    scrambled_dir = str(tmp_path / "scrambled")
    _scramble_test_labels(data_dir, scrambled_dir)
    results = {d: run_sweep(_cfg(*sets), d, log=_quiet) for d in (clean_dir, scrambled_dir)}
    clean, scrambled = (_decisions(d, r) for d, r in results.items())
    assert clean == scrambled
    assert set(clean["trials"]) == {"ratio=0.5", "ratio=0"}  # ratio 0 is the unpruned point
    # each trial fit a TorchTrainer of its own, its Ray Train run named after the trial
    for trial in results[clean_dir].trials:
        assert os.path.isdir(os.path.join(results[clean_dir].sweep_dir, "ray_train", trial))
    assert all(t["val_curve"] for t in clean["trials"].values())

    def test_acc(run_dir):
        _client, runs = _mlflow(run_dir)
        return {
            r.data.tags["puma_ray.label"]: r.data.metrics.get("test/clean_acc")
            for r in runs.values()
            if "puma_ray.label" in r.data.tags
        }

    before, after = test_acc(clean_dir), test_acc(scrambled_dir)
    finished = [label for label, t in clean["trials"].items() if t["status"] == "finished"]
    assert finished
    for label in finished:
        assert after[label] != before[label]
        assert after[label] < before[label]  # every test label is now wrong
