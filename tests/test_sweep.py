"""Sweeps on a real local Ray and a real MLflow sqlite store: a 2x2 grid of prune -> Ray Train ->
evaluate trials (each a Tune function driving its own TorchTrainer), what MLflow holds
afterwards, the report (at the end of the sweep, and from `puma-ray report` without Ray), a
restored sweep that reruns only the trial that did not finish, and search spaces refused
before Ray starts."""

import json
import os
import re
import subprocess
import sys

import pytest

from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.sweep import SweepError, plan_sweep, prepare_inputs, run_sweep, trial_values

BASE = [
    # one source: one Ray Data stream per epoch (mixed sources stream real and synthetic apart)
    "data.sources=[{type: builtin, real_train: 0, real_test: 64, synthetic: 256}]",
    "data.rows_per_shard=128",
    "training.epochs=1",
    "training.batch_size=32",
    "training.attack.steps=1",
    "margin_model.checkpoint=null",  # train one: the packaged model is the demo data's
    "margin_model.train.epochs=1",
    "margin_model.train.batch_size=32",
    "margin_model.train.attack.steps=1",
    "scoring.max_iter=5",
    "scoring.batch_size=64",
    "scoring.pool_max=1",
    "evaluation.subset=32",
    "evaluation.pgd_steps=2",
    "evaluation.batch_size=32",
    "ray.num_workers=1",
    "ray.cpus_per_worker=1",
    "tracking.experiment=sweep-test",
]
GRID = "sweep.space={pruning.ratio: {grid: [0.0, 0.5]}, pruning.eps_scale: {grid: [0.5, 1.0]}}"
PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("pareto.png", "robust_vs_ratio.png", "compute.png", "curves.png")


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


def _uri(run_dir) -> str:
    return f"sqlite:///{run_dir}/mlflow.db"


def _check_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path


# --------------------------------------------------------------------------------------------
# Before Ray: the plan and the errors.


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sweep.space={pruning.lr: {grid: [1]}}", "sweep.space: unknown search key 'pruning.lr'"),
        (
            "sweep.space={pruning.ratio: {grid: [0.3, 1.0]}}",
            "sweep.space: pruning.ratio: must be in [0, 1) (got 1.0)",
        ),
        (
            "sweep.space={pruning.ratio: {uniform: [-0.1, 0.5]}}",
            "sweep.space: pruning.ratio: must be in [0, 1) (got -0.1)",
        ),
        (
            "sweep.space={pruning.eps_scale: {choice: [0.5, 0]}}",
            "sweep.space: pruning.eps_scale: must be > 0 (got 0",
        ),
        ("sweep.space={pruning.ratio: {grid: []}}", "sweep.space.pruning.ratio: grid is empty"),
        ("sweep.space={training.seed: {uniform: [0, 3]}}", "training.seed: use grid or choice"),
    ],
)
def test_bad_search_space_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        _cfg(override)
    assert expected in str(info.value) and "\n" not in str(info.value)


# Runs in a fresh interpreter: this one may already hold the session's Ray from an earlier test,
# and then "Ray was not started" could not fail.
_REFUSED = """
import json, sys
from puma_ray.cli import main
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.sweep import run_sweep

run_dir, base = sys.argv[1], json.loads(sys.argv[2])
out = {"rc": main(["sweep", "--set", "sweep.space={pruning.ratio: {grid: [0.3, 1.0]}}",
                   "--run-dir", run_dir])}
refused = []
cap = ["scoring.norm=l2", "training.attack.norm=linf"]
margin_cap = "sweep.space={pruning.eps_rule: {grid: [scale_lowest, margin_cap]}}"
for sets in (["sweep.asha=true", "ray.num_workers=0"], [margin_cap, *cap]):
    try:
        run_sweep(load_config(None, base + sets), run_dir, log=print)
    except ConfigError as e:
        refused.append(str(e))
out["refused"] = refused
out["ray_initialized"] = "ray" in sys.modules and sys.modules["ray"].is_initialized()
print("RESULT " + json.dumps(out))
"""


def test_bad_search_space_refused_before_ray_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _REFUSED, str(run_dir), json.dumps(BASE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep.space: pruning.ratio: must be in [0, 1) (got 1.0)" in proc.stderr
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["rc"] == 2
    # combinations run_sweep checks itself, also before Ray
    asha, margin_cap = result["refused"]
    assert asha.startswith("sweep.asha: needs ray.num_workers >= 1")
    assert "eps_rule=margin_cap: pruning.eps_rule=margin_cap" in margin_cap
    assert result["ray_initialized"] is False
    assert not run_dir.exists()


def test_plan_adds_the_unpruned_baseline_only_when_missing():
    plan = plan_sweep(_cfg(GRID))  # (ratio 0, eps_scale 1) prunes nothing and keeps every eps
    assert plan.trials == 4 and plan.baseline_in_grid and not plan.baseline_added
    plan = plan_sweep(_cfg("sweep.space={pruning.ratio: {grid: [0.3, 0.6]}}"))
    assert plan.trials == 3 and plan.points[-1] == {"baseline": True}
    # a sampled eps_scale can change what the ratio-0 point does: not a reference
    sampled = (
        "sweep.space={pruning.ratio: {grid: [0.0, 0.5]}, pruning.eps_scale: {uniform: [0.2, 1]}}"
    )
    plan = plan_sweep(_cfg(sampled, "sweep.num_samples=2"))
    assert plan.baseline_added and plan.trials == 6
    assert not plan_sweep(_cfg(sampled, "sweep.baseline=false")).baseline_added
    # the added baseline keeps sampled seeds (replicates), nothing that prunes
    values, baseline = trial_values(
        {"point": {"baseline": True}, "sampled": {"pruning.eps_scale": 0.4, "training.seed": 3}},
        ["pruning.ratio", "pruning.eps_scale", "training.seed"],
    )
    assert baseline and values["pruning.ratio"] == 0.0 and values["training.seed"] == 3
    assert "pruning.eps_scale" not in values and values["pruning.eps_rule"] == "none"


# --------------------------------------------------------------------------------------------
# On Ray.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_local):
    """Ingested data, a margin model and its scores: computed once, shared by every sweep."""
    run_dir = str(tmp_path_factory.mktemp("sweep_inputs"))
    # the margin model trains in-process (its fingerprint leaves the worker count out, so the
    # sweeps find it up to date); the trials of the grid sweep use a Ray Train worker
    cfg = _cfg(GRID, "ray.num_workers=0")
    prepare_inputs(cfg, plan_sweep(cfg), run_dir, _quiet)
    return run_dir


def _fresh_run_dir(inputs, path) -> str:
    """A run directory sharing the module's inputs (symlinks), with its own MLflow store.
    Its sweeps must name the shared margin model (`_reuse`): the scores' state holds the
    checkpoint's path, so a run dir's own `margin_model/model.pt` would discard and rewrite them,
    through the symlink, in the shared directory."""
    path.mkdir()
    for sub in ("data", "margin_model", "scores"):
        os.symlink(os.path.join(inputs, sub), path / sub)
    return str(path)


def _reuse(inputs) -> str:
    """The override that makes a sweep find the module's margin model and scores up to date."""
    return f"margin_model.checkpoint={os.path.join(inputs, 'margin_model', 'model.pt')}"


@pytest.fixture(scope="module")
def grid_sweep(inputs, tmp_path_factory):
    run_dir = _fresh_run_dir(inputs, tmp_path_factory.mktemp("grid") / "run")
    # in-process training in each trial: Tune fitting a TorchTrainer per trial (Ray 2.60's
    # pattern) is what the ASHA and scrambled-label sweeps of test_sweep_failures.py run; here
    # the grid, MLflow and the report are under test, ~40 s cheaper without four Train starts
    cfg = _cfg(GRID, "sweep.max_concurrent_trials=2", "ray.num_workers=0", _reuse(inputs))
    result = run_sweep(cfg, run_dir, log=_quiet)
    return run_dir, result


@pytest.mark.ray
def test_trial_resources_must_fit(ray_local, tmp_path):
    from puma_ray.sweep import _fit_concurrency, trial_resources

    logs = []
    # the trial process holds nothing (it orchestrates); 1 of the 4 CPUs stays for Ray Data
    assert trial_resources(_cfg()) == {"CPU": 0, "memory": 2**20}
    assert _fit_concurrency(_cfg("sweep.max_concurrent_trials=5"), logs.append) == 3
    assert "a trial needs 1 CPUs" in logs[0] and "running 3 trial(s) at a time" in logs[0]
    # in-process training happens in the trial process, which then holds the worker's CPUs
    assert trial_resources(_cfg("ray.num_workers=0")) == {"CPU": 1.0}
    # ...and those CPUs are all it needs (they were once counted twice: a 2-CPU in-process
    # trial was refused on 4 CPUs)
    in_process = _cfg("ray.num_workers=0", "ray.cpus_per_worker=2")
    assert _fit_concurrency(in_process, logs.append) == 1
    with pytest.raises(SweepError, match=r"a trial needs 3.5 CPUs \(its own process, which"):
        _fit_concurrency(_cfg("ray.num_workers=0", "ray.cpus_per_worker=3.5"), logs.append)
    # it still holds them while its evaluation chunks (cpus_per_worker each) run: 1.5 + 1.5
    # for one trial and its chunk leave 1 of the 4 CPUs, not room for a second trial
    wide = _cfg("ray.num_workers=0", "ray.cpus_per_worker=1.5", "sweep.max_concurrent_trials=5")
    assert _fit_concurrency(wide, logs.append) == 1
    # in-process training on a GPU: each trial process gets a GPU of its own
    gpu = trial_resources(_cfg("ray.num_workers=0", "ray.use_gpu=true"))
    assert gpu == {"CPU": 1.0, "GPU": 1}
    assert "GPU" not in trial_resources(_cfg("ray.use_gpu=true"))  # its Train workers get them
    held = _cfg("sweep.trial_cpus=0.5", "sweep.max_concurrent_trials=5")
    assert _fit_concurrency(held, logs.append) == 2
    with pytest.raises(SweepError, match=r"a trial needs 3.5 CPUs .* Ray has 4 CPUs"):
        run_sweep(_cfg("ray.cpus_per_worker=3.5"), str(tmp_path / "run"), log=_quiet)
    assert not (tmp_path / "run" / "sweep").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_grid_sweep_completes(grid_sweep):
    run_dir, result = grid_sweep
    assert result.complete and not result.restored
    assert sorted(result.trials.values()) == ["finished"] * 4
    for trial in result.trials:
        tdir = os.path.join(result.sweep_dir, trial)
        res = json.load(open(os.path.join(tdir, "result.json")))
        manifest = json.load(open(os.path.join(tdir, "kept", "manifest.json")))
        assert manifest["parameters"]["pruning"]["ratio"] == res["values"]["pruning.ratio"]
        assert manifest["counts"]["kept"] == res["metrics"]["kept_rows"]
        m = res["metrics"]
        assert 0 <= m["test/robust_acc"] <= m["test/clean_acc"] <= 1 and m["device_seconds"] > 0
        assert 0 <= m["val/robust_acc"] <= m["val/clean_acc"] <= 1  # what "best" is chosen on
    rows = {
        (r.values["pruning.ratio"], r.values["pruning.eps_scale"]): r for r in result.report.rows
    }
    assert set(rows) == {("0.0", "0.5"), ("0.0", "1.0"), ("0.5", "0.5"), ("0.5", "1.0")}
    base = rows[("0.0", "1.0")]
    assert base.baseline and base.vs_baseline == pytest.approx(1.0)
    assert sum(r.baseline for r in rows.values()) == 1
    assert rows[("0.5", "0.5")].kept_rows < base.kept_rows
    assert any(r.pareto for r in rows.values())
    for name in ("results.md", "results.csv"):
        assert os.path.exists(os.path.join(result.report_dir, name))
    for name in PLOTS:
        _check_png(os.path.join(result.report_dir, "plots", name))


@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_holds_one_parent_and_a_child_per_trial(grid_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    from puma_ray.data import dataset_dirs, open_dataset

    run_dir, result = grid_sweep
    client = MlflowClient(tracking_uri=_uri(run_dir))
    exp = client.get_experiment_by_name("sweep-test")
    assert exp.artifact_location == "file://" + os.path.join(run_dir, "mlartifacts")
    everything = client.search_runs([exp.experiment_id])
    parents = [r for r in everything if r.data.tags.get("puma_ray.stage") == "sweep"]
    assert len(parents) == 1 and len(everything) == 5  # and nothing else (no eval runs)
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    p, tags = parent.data.params, parent.data.tags
    assert json.loads(p["sweep.space"]) == {
        "pruning.ratio": {"grid": [0.0, 0.5]},
        "pruning.eps_scale": {"grid": [0.5, 1.0]},
    }
    assert p["sweep.swept"] == "pruning.ratio,pruning.eps_scale" and p["sweep.trials"] == "4"
    assert p["sweep.baseline"] == "in grid" and p["training.epochs"] == "1"
    data_fp = open_dataset(dataset_dirs(run_dir)[0]).info.fingerprint
    assert tags["puma_ray.data_fingerprint"] == data_fp
    assert "puma_ray.scores_fingerprint" in tags
    from puma_ray.tracking import git_revision

    if git_revision() is not None:  # the tests run in a checkout (its HEAD may move meanwhile)
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["mlflow.source.git.commit"])
    assert parent.data.metrics["trials_finished"] == 4

    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    combos = set()
    for c in children:
        cp, cm, ct = c.data.params, c.data.metrics, c.data.tags
        assert c.info.status == "FINISHED" and ct["puma_ray.trial_status"] == "finished"
        combos.add((float(cp["pruning.ratio"]), float(cp["pruning.eps_scale"])))
        assert cp["trial"] == ct["puma_ray.trial"] and c.info.run_name.startswith(cp["trial"])
        assert cp["pruning.strategy"] == "puma" and cp["training.epochs"] == "1"
        assert cp["model.arch"] == "small_cnn" and cp["dataset"] == "kept"
        for key in ("test/clean_acc", "test/robust_acc", "test/pgd_acc", "val/robust_acc"):
            assert key in cm, key
        assert "device_seconds" in cm and "kept_rows" in cm
        assert 0 <= cm["test/robust_acc"] <= cm["test/clean_acc"] <= 1 and cm["device_seconds"] > 0
        ci = (cm["test/robust_acc_ci_low"], cm["test/robust_acc_ci_high"])
        assert ci[0] <= cm["test/robust_acc"] <= ci[1]
        history = client.get_metric_history(c.info.run_id, "val/epoch_robust_acc")
        assert [h.step for h in history] == [1]  # per-epoch, from the Train loop's rank 0
        kept = {a.path for a in client.list_artifacts(c.info.run_id, "kept")}
        assert kept == {"kept/manifest.json", "kept/margin_hist.png"}
        local = client.download_artifacts(c.info.run_id, "kept", str(tmp_path / c.info.run_id))
        manifest = json.load(open(os.path.join(local, "manifest.json")))
        assert manifest["counts"]["kept"] == cm["kept_rows"]
        _check_png(os.path.join(local, "margin_hist.png"))
    assert combos == {(0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 1.0)}

    report = client.download_artifacts(parent.info.run_id, "report", str(tmp_path / "report"))
    for name in PLOTS:
        _check_png(os.path.join(report, "plots", name))
    lines = open(os.path.join(report, "results.csv")).read().splitlines()
    assert len(lines) == 5 and {c.info.run_id for c in children} <= {
        line.rsplit(",", 1)[-1] for line in lines
    }
    assert (
        "| trial | status | ratio | eps_scale |" in open(os.path.join(report, "results.md")).read()
    )


@pytest.mark.slow
@pytest.mark.ray
def test_report_command_reads_mlflow_without_ray(grid_sweep, tmp_path, capsys):
    run_dir, result = grid_sweep
    out = tmp_path / "report"
    code = (
        "import sys; from puma_ray.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'report imported ray'; sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, "report", "--experiment", "sweep-test"]
    cmd += ["--tracking-uri", _uri(run_dir)]
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| trial | status | ratio | eps_scale |" in proc.stdout
    assert "best by val/robust_acc (max)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| trial_")]) == 4
    for name in PLOTS:
        _check_png(out / "plots" / name)
    assert (
        open(out / "results.csv").read()
        == open(os.path.join(result.report_dir, "results.csv")).read()
    )
    # a store that is not there is an error, and is not created (in this process: only the
    # first call above needs its own interpreter, to see that report imports no Ray)
    from puma_ray.cli import main

    missing = tmp_path / "nope" / "mlflow.db"
    capsys.readouterr()
    assert main(["report", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not missing.exists()
    assert main(["report", "--experiment", "no-such-exp", "--run-dir", run_dir]) == 2
    assert "no experiment 'no-such-exp'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_restore_reruns_only_unfinished_trials(inputs, tmp_path):
    """A trial fails once after training; the restore runs that trial alone: it resumes
    (training skipped) and the finished baseline trial is neither rerun nor logged twice.
    Training runs in the trial process here (the grid sweep covers the TorchTrainer path).
    The pruned trial is one setting of a `settings` dimension: its name labels it through the
    restore, in MLflow and in the report."""
    from mlflow.tracking import MlflowClient

    run_dir = _fresh_run_dir(inputs, tmp_path / "run")
    cfg = _cfg(
        "sweep.space={method: {settings: [{name: half, pruning.ratio: 0.5, "
        "pruning.eps_scale: 0.5}]}}",
        "sweep.trial_max_failures=0",
        "sweep.max_concurrent_trials=2",
        "ray.num_workers=0",
        "ray.cpus_per_worker=0.5",
        _reuse(inputs),
    )
    fail = {"values": {"pruning.ratio": 0.5}, "marker": str(tmp_path / "failed-once")}
    first = run_sweep(cfg, run_dir, log=_quiet, debug_fail=fail)
    assert not first.complete and sorted(first.trials.values()) == ["failed", "finished"]
    failed = next(t for t, s in first.trials.items() if s == "failed")
    done = next(t for t, s in first.trials.items() if s == "finished")
    sweep_dir = first.sweep_dir
    assert json.load(open(os.path.join(sweep_dir, done, "trial.json")))["baseline"]
    assert os.path.exists(os.path.join(sweep_dir, failed, "train", "summary.json"))
    assert not os.path.exists(os.path.join(sweep_dir, failed, "result.json"))

    def snapshot(trial):  # the trial's training checkpoints (in-process: beside its model)
        root = os.path.join(sweep_dir, trial, "train")
        files = {}
        for d, _, names in os.walk(root):
            for n in names:
                files[os.path.join(d, n)] = os.stat(os.path.join(d, n)).st_mtime_ns
        return files

    done_result = open(os.path.join(sweep_dir, done, "result.json")).read()
    done_ray = snapshot(done)
    failed_ray = snapshot(failed)
    assert done_ray and failed_ray
    client = MlflowClient(tracking_uri=_uri(run_dir))
    exp_id = client.get_experiment_by_name("sweep-test").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([exp_id])}
    assert len(runs) == 3
    assert runs[first.parent_run_id].info.status == "FAILED"
    statuses = {r.data.tags.get("puma_ray.trial_status") for r in runs.values()}
    assert statuses == {None, "failed", "finished"}  # the parent has no trial status

    second = run_sweep(cfg, run_dir, log=_quiet, debug_fail=fail)
    assert second.restored and second.complete and second.sweep_dir == sweep_dir
    assert second.trials == {failed: "finished", done: "finished"}
    assert second.parent_run_id == first.parent_run_id
    attempts = {
        t: open(os.path.join(sweep_dir, t, "attempts.log")).read().splitlines()
        for t in (failed, done)
    }
    assert len(attempts[done]) == 1 and len(attempts[failed]) == 2
    assert open(os.path.join(sweep_dir, done, "result.json")).read() == done_result
    assert snapshot(done) == done_ray and snapshot(failed) == failed_ray  # no Train run redone
    res = json.load(open(os.path.join(sweep_dir, failed, "result.json")))
    assert res["metrics"]["train_skipped"]
    after = {r.info.run_id: r for r in client.search_runs([exp_id])}
    assert set(after) == set(runs)  # the same 1 parent + 2 children, none duplicated
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    assert {r.data.tags.get("puma_ray.trial_status") for r in after.values()} == {
        None,
        "finished",
    }
    assert second.report.baseline_device_s is not None
    assert [r.trial for r in second.report.rows if r.baseline] == [done]
    # the setting's name and values, from trial.json to the MLflow run and the report
    info = json.load(open(os.path.join(sweep_dir, failed, "trial.json")))
    assert info["values"]["method"]["name"] == "half" and info["label"] == "method=half"
    child = next(r for r in after.values() if r.data.tags.get("puma_ray.trial") == failed)
    assert child.data.params["setting.method"] == "half"
    assert child.data.params["pruning.ratio"] == "0.5" and child.info.run_name.endswith("half")
    parent = after[second.parent_run_id].data.params
    assert parent["sweep.swept"] == "method"
    assert parent["sweep.setting_keys"] == "pruning.ratio,pruning.eps_scale"
    row = next(r for r in second.report.rows if r.trial == failed)
    assert row.values == {"method": "half"}
    assert row.setting_values == {"pruning.ratio": "0.5", "pruning.eps_scale": "0.5"}
    assert "| trial | status | method | ratio | eps_scale |" in second.report.markdown()
