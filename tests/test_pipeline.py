"""`puma-ray run` end to end on tiny builtin data with a real local Ray and a real MLflow sqlite
store: every stage's artifacts and metrics, the baselines of `compare`, the MLflow parent/child
runs, a rerun that skips everything, a changed prune ratio that redoes prune + train only, and
an interrupted stage that is never taken as done."""

import json
import os
import shutil
import sqlite3

import pytest
import tiny_pipeline

from puma_ray.cli import main as cli_main
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.pipeline import STAGES, run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = ["name=tiny", *tiny_pipeline.TINY, "tracking.experiment=test-pipeline"]
BASELINE_STAGES = ("baseline_random", "baseline_full")


def _cfg(tmp, *sets):
    uri = f"sqlite:///{tmp}/mlflow.db"
    return load_config(None, [*TINY, f"tracking.tracking_uri={uri}", *sets])


def _stages(run_dir):
    return json.load(open(os.path.join(run_dir, "pipeline.json")))["stages"]


def _expected_pruned(run_dir, ratio):
    """What PUMA must drop with the defaults (scope synthetic, per class): round_half_up(ratio x
    n) of each class's synthetic rows, counted from the ingested shards."""
    import numpy as np

    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.selection import round_half_up

    labels = []
    for b in open_dataset(dataset_dirs(run_dir)[0]).iter_batches(columns=["label", "source"]):
        labels.append(b.labels[b.is_synthetic])
    per_class = np.bincount(np.concatenate(labels))
    return sum(round_half_up(ratio, int(n)) for n in per_class)


def _private_copy(first_run, dest):
    """The module's finished run (run dir, MLflow store, artifacts) copied for a test that runs
    the pipeline again, with the absolute paths that point into the original (the store in
    pipeline.json, artifact roots in the store) pointing into the copy: the other tests keep
    reading the untouched original, whatever order they run in."""
    tmp = first_run[0]
    shutil.copytree(tmp, dest)
    old, new = str(tmp), str(dest)
    con = sqlite3.connect(dest / "mlflow.db")
    try:
        with con:
            con.execute(
                "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                (old, new),
            )
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    finally:
        con.close()
    state_path = dest / "run" / "pipeline.json"
    state = json.loads(state_path.read_text())
    state["mlflow"]["tracking_uri"] = state["mlflow"]["tracking_uri"].replace(old, new)
    state_path.write_text(json.dumps(state, indent=2))
    return dest, str(dest / "run")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("pipeline")
    run_dir = str(tmp / "run")
    logs: list[str] = []
    cfg = _cfg(tmp, "compare=[random, full]")
    result = run_pipeline(cfg, run_dir, log=logs.append)
    return tmp, run_dir, cfg, result, logs


def test_every_stage_leaves_its_artifacts(first_run):
    _tmp, run_dir, _cfg_, result, logs = first_run
    assert result.skipped == []
    assert set(result.stage_seconds) == set(STAGES + BASELINE_STAGES)
    assert set(_stages(run_dir)) == set(STAGES + BASELINE_STAGES)

    data = json.load(open(os.path.join(run_dir, "data", "train", "dataset.json")))
    assert data["num_rows"] == 256
    scores = json.load(open(os.path.join(run_dir, "scores", "manifest.json")))["summary"]
    assert scores["rows"] == 256 and scores["rows_scored_now"] == 256
    kept = json.load(open(os.path.join(run_dir, "kept", "manifest.json")))
    assert kept["strategy"] == "puma"
    n_kept, n_pruned = kept["counts"]["kept"], kept["counts"]["pruned"]
    # 25% of the 160 synthetic rows (scope: synthetic), rounded half up in each class
    assert n_kept + n_pruned == 256 and n_pruned == _expected_pruned(run_dir, 0.25)
    assert kept["counts"]["eps_adjusted"] > 0
    random_kept = json.load(open(os.path.join(run_dir, "kept_random", "manifest.json")))
    assert random_kept["strategy"] == "random"
    assert random_kept["counts"]["kept"] == n_kept  # the same size, to compare like with like
    assert random_kept["counts"]["eps_adjusted"] == 0
    for name in ("margin_model", "train", "train_random", "train_full"):
        assert os.path.exists(os.path.join(run_dir, name, "model.pt")), name
    for name in ("evaluate", "evaluate_random", "evaluate_full"):
        ev = json.load(open(os.path.join(run_dir, name, "summary.json")))
        assert ev["rows"] == 32
        assert 0 <= ev["pgd_acc"] <= ev["clean_acc"] <= 1

    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert [m["method"] for m in report["methods"]] == ["puma", "random", "full"]
    assert [m["rows"] for m in report["methods"]] == [n_kept, n_kept, 256]
    assert report["rows_scored"] == 256
    assert (report["kept"], report["pruned"]) == (n_kept, n_pruned)
    assert set(report["device_seconds"]) == {
        "margin_model",
        "score",
        "train",
        "train_random",
        "train_full",
    }
    assert all(v > 0 for v in report["device_seconds"].values())

    summary = "\n".join(logs[-30:])
    assert f"kept / pruned    {n_kept} / {n_pruned}" in summary
    assert f"mlflow ui --backend-store-uri {result.tracking_uri}" in summary
    # the parent run's own page (the UI opens an experiment on an overview that may be empty)
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).info.experiment_id
    page = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{result.mlflow_run_id}"
    assert f"the run's page   {page}" in summary
    assert f"| puma | {n_kept} |" in summary and "| full | 256 |" in summary


def test_mlflow_parent_run_with_child_runs(first_run):
    from mlflow.tracking import MlflowClient

    _tmp, run_dir, cfg, result, _logs = first_run
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert result.tracking_uri == f"sqlite:///{_tmp}/mlflow.db"
    exp = client.get_experiment_by_name("test-pipeline")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pruning.ratio"] == "0.25"
    m = parent.data.metrics
    kept = json.load(open(os.path.join(run_dir, "kept", "manifest.json")))["counts"]
    assert m["score.rows"] == 256
    assert (m["prune.kept"], m["prune.pruned"]) == (kept["kept"], kept["pruned"])
    for method in ("puma", "random", "full"):
        assert 0 <= m[f"{method}.robust_acc"] <= m[f"{method}.clean_acc"] <= 1
    assert m["device_seconds"] > 0 and m["stage_seconds.score"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    assert {"pipeline/config.yaml", "pipeline/report.md", "pipeline/kept_manifest.json"} <= (
        artifacts
    )

    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(
        [
            "margin_model",
            "train",
            "evaluate",
            "train_random",
            "evaluate_random",
            "train_full",
            "evaluate_full",
        ]
    )
    train = next(r for r in children if r.info.run_name == "train")
    assert train.info.status == "FINISHED"
    assert len(client.get_metric_history(train.info.run_id, "train_loss")) == 1  # 1 epoch
    ev = next(r for r in children if r.info.run_name == "evaluate")
    assert (
        ev.data.metrics["test/clean_acc"]
        == json.load(open(os.path.join(run_dir, "evaluate", "summary.json")))["clean_acc"]
    )


def test_report_pipeline_prints_the_logged_comparison(first_run, capsys):
    """`puma-ray report --pipeline` reads the table back from MLflow: the same one the run
    printed (every method, its interval note), headed by the parent run."""
    _tmp, run_dir, _cfg, result, _logs = first_run
    argv = ["report", "--pipeline", "--run-dir", run_dir, "--experiment", "test-pipeline"]
    assert cli_main([*argv, "--tracking-uri", result.tracking_uri]) == 0
    out = capsys.readouterr().out
    head = [line for line in out.splitlines() if line.startswith("run ")]
    assert len(head) == 1 and result.mlflow_run_id in head[0], out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    methods = [r.split("|")[1].strip().lower() for r in rows[1:]]
    assert [m.split(" ")[0] for m in methods] == ["puma", "random", "full"], rows
    assert "95% Wilson interval" in out
    assert cli_main([*argv, "--tracking-uri", f"sqlite:///{_tmp}/none.db"]) == 2


def test_rerun_skips_then_changed_ratio_redoes_prune_and_train(first_run, tmp_path):
    _tmp, _run_dir, _cfg_, first, _logs = first_run
    tmp, run_dir = _private_copy(first_run, tmp_path / "copy")
    cfg = _cfg(tmp, "compare=[random, full]")
    stamp = {
        name: os.path.getmtime(os.path.join(run_dir, *name.split("/")))
        for name in ("scores/manifest.json", "margin_model/model.pt", "train/model.pt")
    }

    # 1. the same config again: nothing runs, the same MLflow parent run is reopened
    again = run_pipeline(cfg, run_dir, log=lambda _m: None)
    assert again.skipped == list(STAGES + BASELINE_STAGES)
    assert again.stage_seconds == {}
    assert again.mlflow_run_id == first.mlflow_run_id

    # 2. a new prune ratio (through the CLI): prune, train and evaluate run, the rest is reused
    code = cli_main(
        [
            "run",
            "--run-dir",
            run_dir,
            *[a for s in TINY for a in ("--set", s)],
            "--set",
            f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "--set",
            "pruning.ratio=0.5",
        ]
    )
    assert code == 0
    kept = json.load(open(os.path.join(run_dir, "kept", "manifest.json")))
    assert kept["counts"]["pruned"] == _expected_pruned(run_dir, 0.5)
    assert (
        os.path.getmtime(os.path.join(run_dir, "scores", "manifest.json"))
        == stamp["scores/manifest.json"]
    )
    assert (
        os.path.getmtime(os.path.join(run_dir, "margin_model", "model.pt"))
        == stamp["margin_model/model.pt"]
    )
    assert os.path.getmtime(os.path.join(run_dir, "train", "model.pt")) > stamp["train/model.pt"]
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["skipped"] == ["ingest", "margin_model", "score"]
    assert sorted(report["stage_seconds"]) == ["evaluate", "prune", "train"]
    assert report["mlflow_run_id"] != first.mlflow_run_id  # a new config, a new parent run

    # 3. Ctrl-C as training starts: the interrupted stage is not recorded as done, and the
    #    next run picks up exactly there
    ratio = "pruning.ratio=0.4"

    def interrupt(msg):
        if msg == "[train] running":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_cfg(tmp, ratio), run_dir, log=interrupt)
    done = _stages(run_dir)
    assert "prune" in done and "train" not in done and "evaluate" not in done
    resumed = run_pipeline(_cfg(tmp, ratio), run_dir, log=lambda _m: None)
    assert resumed.skipped == ["ingest", "margin_model", "score", "prune"]
    assert set(resumed.stage_seconds) == {"train", "evaluate"}


def test_unknown_force_stage_is_refused(first_run):
    from puma_ray.errors import ConfigError

    tmp, run_dir, cfg, _result, _logs = first_run
    with pytest.raises(ConfigError, match="--force baseline_random: unknown stage"):
        run_pipeline(_cfg(tmp), run_dir, force=("baseline_random",))


def test_file_uri_run_dir_goes_through_pyarrow(tmp_path, ray_local, monkeypatch):
    """A `file://` run directory (what an `s3://` or `gs://` one is, through pyarrow's
    filesystem layer, minus the network): every stage, Ray Train's storage and the default
    MLflow store land in that directory, and nothing in the CWD (no stray `file:` folder)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    local = tmp_path / "uri_run"
    uri = f"file://{local}"
    cfg = load_config(
        None,
        [
            *tiny_pipeline.TINY_STAGES,  # the packaged margin model: one Ray Train run
            "name=uri",
            "ray.num_workers=1",
            "ray.cpus_per_worker=1",
            "tracking.experiment=uri",
        ],
    )
    result = run_pipeline(cfg, uri, log=lambda _m: None)
    assert result.skipped == []
    for path in (
        "data/train/dataset.json",
        "scores/manifest.json",
        "kept/manifest.json",
        "train/model.pt",
        "evaluate/summary.json",
        "pipeline.json",
        "report.json",
        "mlflow.db",
    ):
        assert (local / path).is_file(), path
    # Ray Train (1 worker) checkpointed into <run dir>/ray_train through the same URI
    runs = {p.name.split("-")[0] for p in (local / "ray_train").iterdir()}
    assert runs == {"train"}
    assert list((local / "ray_train").glob("train-*/checkpoint_*/state.pt"))
    assert sorted(os.listdir(tmp_path)) == ["uri_run"]
    assert result.tracking_uri == f"sqlite:///{local}/mlflow.db"
    parent = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["score.rows"] == 256
    assert run_pipeline(cfg, uri, log=lambda _m: None).skipped == list(STAGES)
    with pytest.raises(ConfigError, match="not a URI pyarrow can open"):
        run_pipeline(cfg, f"file://{tmp_path}/with space", log=lambda _m: None)


def _outcome(run_dir):
    """Everything a run decided and measured: the scores, the kept set with its eps, the trained
    weights and the evaluation's numbers (times and run ids left out)."""
    import numpy as np
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from puma_ray.models import load_checkpoint

    scores = pads.dataset(
        os.path.join(run_dir, "scores"), partitioning="hive", exclude_invalid_files=True
    ).to_table(columns=["id", "margin", "iters"])
    order = np.argsort(scores.column("id").to_numpy())
    kept_dir = os.path.join(run_dir, "kept")
    files = [s["file"] for s in json.load(open(os.path.join(kept_dir, "manifest.json")))["shards"]]
    kept = [pq.read_table(os.path.join(kept_dir, f), columns=["id", "eps"]) for f in files]
    model, _ = load_checkpoint(os.path.join(run_dir, "train", "model.pt"))
    ev = json.load(open(os.path.join(run_dir, "evaluate", "summary.json")))
    return {
        "margins": scores.column("margin").to_numpy()[order],
        "iters": scores.column("iters").to_numpy()[order],
        "kept": np.concatenate([t.column("id").to_numpy() for t in kept]),
        "eps": np.concatenate([t.column("eps").to_numpy() for t in kept]),
        "weights": model.state_dict(),
        "metrics": {k: ev[k] for k in ("rows", "clean_acc", "pgd_acc", "robust_acc")},
    }


def _same_margins(a, b) -> str | None:
    """None if two scorings agree to float rounding, else what differs. DeepFool runs in
    scoring actors, where a conv's last bits depend on the memory it runs in: a margin is a sum
    of steps, so its rounding error scales with the pool's margins (a near-zero signed margin
    carries the same absolute error as any other), not with its own size. The iteration counts
    must agree exactly; a rounding difference that moved one would show here by name."""
    import numpy as np

    ma, mb = a["margins"], b["margins"]
    scale = float(np.median(np.abs(ma[np.isfinite(ma)]))) if np.isfinite(ma).any() else 1.0
    close = np.isclose(ma, mb, rtol=1e-5, atol=1e-5 * scale)
    if close.all() and np.array_equal(a["iters"], b["iters"]):
        return None
    rows = np.flatnonzero(~close | (a["iters"] != b["iters"]))[:5]
    return (
        "; ".join(
            f"row {i}: {ma[i]!r} vs {mb[i]!r} ({a['iters'][i]} vs {b['iters'][i]} iters)"
            for i in rows
        )
        + f" (median |margin| {scale:.3g})"
    )


def _same(a, b) -> dict[str, bool]:
    import numpy as np
    import torch

    out = {k: bool(np.array_equal(a[k], b[k])) for k in ("kept", "eps")}
    out["margins"] = _same_margins(a, b) is None
    out["weights"] = a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]
    )
    out["metrics"] = a["metrics"] == b["metrics"]
    return out


def test_the_same_seed_reproduces_the_run_and_another_seed_does_not(first_run, tmp_path):
    """Same config and seed on CPU, a fresh run dir: the same kept set and eps, weights and
    evaluation numbers bit for bit, and the same margins to float rounding; other seeds (margin
    model, training, evaluation) change them."""
    _tmp, run_dir, _cfg_, _result, _logs = first_run
    want = _outcome(run_dir)
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    run_pipeline(_cfg(tmp_path), again, log=lambda _m: None)  # without the baselines
    got = _outcome(again)
    margins_differ = _same_margins(got, want)
    assert margins_differ is None, margins_differ
    assert _same(got, want) == dict.fromkeys(_same(want, want), True)
    seeds = ["seed=1", "margin_model.train.seed=1", "training.seed=1"]
    run_pipeline(_cfg(tmp_path, *seeds), other, log=lambda _m: None)
    same = _same(_outcome(other), want)
    # (the evaluation's four numbers on 32 rows could tie by chance; the rest cannot)
    assert not (same["margins"] or same["kept"] or same["eps"] or same["weights"]), same


def _files(run_dir):
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _dirs, names in os.walk(run_dir)
        for name in names
        if "logs" not in root.split(os.sep)
    }


def test_dry_run_names_the_changed_key_and_touches_nothing(first_run, capsys):
    """One config section changed (pruning.ratio) against a finished run dir: the plan skips
    what is up to date, reruns prune and what reads it, says why, and writes nothing."""
    tmp, run_dir, _cfg_, _result, _logs = first_run
    before = _files(run_dir)
    sets = [*TINY, f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", "compare=[random, full]"]
    sets.append("pruning.ratio=0.5")
    argv = ["run", "--dry-run", "--run-dir", run_dir, *[a for s in sets for a in ("--set", s)]]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    plan = {
        line.split()[0]: line.split(None, 2)[1:]
        for line in out.splitlines()
        if line.startswith("  ") and line.split()[0] in STAGES + BASELINE_STAGES
    }
    assert {s: p[0] for s, p in plan.items()} == {
        "ingest": "skip",
        "margin_model": "skip",
        "score": "skip",
        "prune": "run",
        "train": "run",
        "evaluate": "run",
        "baseline_random": "run",
        "baseline_full": "skip",
    }
    assert plan["prune"][1] == "pruning.ratio: 0.25 -> 0.5"
    assert plan["baseline_random"][1] == "pruning.ratio: 0.25 -> 0.5"
    assert plan["train"][1] == "reads prune's new output"
    assert plan["ingest"][1] == "up to date"
    assert "train: 1 x {CPU: 1}: fits" in out or "train: " in out  # the resources section
    assert _files(run_dir) == before  # nothing written, nothing run
