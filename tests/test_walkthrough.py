"""README's walkthrough, command by command through the CLI, on a tiny config: ingest, the margin
model (`train --dataset full`), score, prune, train, evaluate (`--config`), then a second kept
set (`prune --out-dir`) trained under its own name (`train --kept-dir --name`) and evaluated
(`evaluate --name`). Relative run directories as in README, from a scratch working directory;
every output is checked against the ones before it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from puma_ray.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = """\
name: walk
data:
  sources:
    - {type: builtin, real_train: 74, real_test: 32, synthetic: 128}
  validation: 10
  rows_per_shard: 64
margin_model:
  train: {epochs: 1, batch_size: 32, attack: {steps: 1}}
training: {epochs: 1, batch_size: 32, attack: {steps: 1}}
scoring: {max_iter: 5, batch_size: 64, pool_max: 1}
evaluation: {subset: 24, pgd_steps: 2, batch_size: 32}
ray: {num_workers: 0}
tracking: {experiment: walkthrough}
"""
RUN = "runs/walk"


def _json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _expected_pruned(run_dir, ratio):
    """PUMA's defaults (scope synthetic, per class): round_half_up(ratio x n) of each class's
    synthetic rows."""
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.selection import round_half_up

    labels = [
        b.labels[b.is_synthetic]
        for b in open_dataset(dataset_dirs(run_dir)[0]).iter_batches(columns=["label", "source"])
    ]
    return sum(round_half_up(ratio, int(n)) for n in np.bincount(np.concatenate(labels)))


def test_readme_walkthrough(ray_local, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "walk.yaml").write_text(CONFIG)
    run_dir = os.path.abspath(RUN)  # what the CLI makes of the relative path

    def puma(*argv):
        code = main(list(argv))
        out = capsys.readouterr()
        assert code == 0, f"puma-ray {' '.join(argv)}: exit {code}\n{out.err[-3000:]}"
        return out.out

    # README: puma-ray ingest --run-dir runs/demo
    out = puma("ingest", "walk.yaml", "--run-dir", RUN)
    assert "ingest: dataset 'builtin'" in out
    train_info = _json(run_dir, "data", "train", "dataset.json")
    assert train_info["num_rows"] == 192
    assert _json(run_dir, "data", "test", "dataset.json")["num_rows"] == 32

    # README: puma-ray train --run-dir runs/demo --dataset full
    puma("train", "walk.yaml", "--run-dir", RUN, "--dataset", "full")
    margin = _json(run_dir, "margin_model", "summary.json")
    assert margin["dataset"] == "full" and margin["rows"] == 192 and len(margin["history"]) == 1

    # README: puma-ray score --run-dir runs/demo
    out = puma("score", "walk.yaml", "--run-dir", RUN)
    scores = _json(run_dir, "scores", "manifest.json")
    assert scores["summary"]["rows"] == 192 == sum(scores["rows_per_shard"].values())
    assert scores["state"]["margin_model"] == os.path.join(run_dir, "margin_model", "model.pt")
    assert "192 rows" in out

    # README: puma-ray prune --run-dir runs/demo --set pruning.ratio=0.3
    puma("prune", "walk.yaml", "--run-dir", RUN, "--set", "pruning.ratio=0.3")
    kept = _json(run_dir, "kept", "manifest.json")
    counts = kept["counts"]
    assert kept["parameters"]["pruning"]["ratio"] == 0.3
    assert counts["kept"] + counts["pruned"] == 192
    assert counts["pruned"] == _expected_pruned(run_dir, 0.3)
    assert counts["per_source"]["real"]["pruned"] == 0  # scope: synthetic

    # README: puma-ray train --run-dir runs/demo
    puma("train", "walk.yaml", "--run-dir", RUN)
    train = _json(run_dir, "train", "summary.json")
    assert train["dataset"] == "kept" and train["rows"] == counts["kept"]
    assert [m["epoch"] for m in train["history"]] == [1]

    # README: puma-ray evaluate runs/demo/train/model.pt --run-dir runs/demo (+ --config)
    out = puma("evaluate", f"{RUN}/train/model.pt", "--config", "walk.yaml", "--run-dir", RUN)
    ev = _json(run_dir, "evaluate", "summary.json")
    assert ev["checkpoint"] == os.path.join(run_dir, "train", "model.pt")
    assert ev["rows"] == 24 and ev["pgd_steps"] == 2  # the config's, not the defaults (1000, 20)
    assert 0 <= ev["pgd_acc"] <= ev["clean_acc"] <= 1
    assert "PGD-2" in out

    # a second kept set beside the first, trained and evaluated under its own names
    other = f"{RUN}/kept_r06"
    puma("prune", "walk.yaml", "--run-dir", RUN, "--set", "pruning.ratio=0.6", "--out-dir", other)
    kept6 = _json(tmp_path, other, "manifest.json")["counts"]
    assert kept6["pruned"] == _expected_pruned(run_dir, 0.6) and kept6["kept"] < counts["kept"]
    assert _json(run_dir, "kept", "manifest.json") == kept  # the first kept set is untouched
    puma("train", "walk.yaml", "--run-dir", RUN, "--kept-dir", other, "--name", "train_r06")
    train6 = _json(run_dir, "train_r06", "summary.json")
    assert train6["rows"] == kept6["kept"] and train6["fingerprint"] != train["fingerprint"]
    assert _json(run_dir, "train", "summary.json") == train
    puma(
        "evaluate",
        f"{RUN}/train_r06/model.pt",
        "--config",
        "walk.yaml",
        "--run-dir",
        RUN,
        "--name",
        "evaluate_r06",
    )
    ev6 = _json(run_dir, "evaluate_r06", "summary.json")
    assert ev6["checkpoint"] == os.path.join(run_dir, "train_r06", "model.pt") and ev6["rows"] == 24
    assert _json(run_dir, "evaluate", "summary.json") == ev

    # everything went to the run directory (its MLflow store included), nothing to the CWD
    assert sorted(os.listdir(tmp_path)) == ["runs", "walk.yaml"]
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    exp = client.get_experiment_by_name("walkthrough")
    assert exp.artifact_location == "file://" + os.path.join(run_dir, "mlartifacts")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"margin_model", "train", "evaluate", "train_r06", "evaluate_r06"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert runs["evaluate"].data.metrics["test/clean_acc"] == ev["clean_acc"]
    assert runs["evaluate_r06"].data.metrics["test/pgd_acc"] == ev6["pgd_acc"]
    assert runs["train"].data.params["rows"] == str(counts["kept"])
