"""`--smoke-test` is a smoke test of *this* config (no Ray here): its own run dir and MLflow
experiment, data, model width, epochs and resources shrunk to this machine, and offline, builtin
data standing in for sources that are not here. Running it end to end is
tests/test_smoke_run.py."""

import os

import numpy as np
import pytest
import yaml

from puma_ray import cli
from puma_ray.cli import build_parser, main
from puma_ray.config import load_config
from puma_ray.errors import ConfigError
from puma_ray.smoke import SMOKE_ROWS, local_resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM = os.path.join(ROOT, "tune_configs", "cifar10_edm1m.yaml")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _shown(capsys, *argv):
    assert main(["config", *argv]) == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err.strip().splitlines()


def _rows(sources):
    return sum(
        s.get("real_train", 0) + s.get("real_test", 0) + s.get("synthetic", 0) for s in sources
    )


def test_config_smoke_test_of_the_paper_scale_config(capsys):
    full, _ = _shown(capsys, EDM)
    cfg, notes = _shown(capsys, EDM, "--smoke-test")
    # its own run name (so runs/<name>-smoke) and MLflow experiment
    assert cfg["name"] == full["name"] + "-smoke" == "cifar10_edm1m-smoke"
    assert cfg["tracking"]["experiment"] == full["tracking"]["experiment"] + "-smoke"
    # a narrow member of the same architecture family, with the config's options
    assert full["model"]["arch"] == "wrn28_10"
    want = {"arch": "wide_resnet", "kwargs": {**full["model"]["kwargs"], "depth": 10, "width": 1}}
    assert cfg["model"] == want
    assert cfg["margin_model"]["model"]["arch"] == "wide_resnet"
    assert cfg["training"]["epochs"] == cfg["margin_model"]["train"]["epochs"] == 1
    assert cfg["evaluation"]["subset"] <= 128 and cfg["scoring"]["max_iter"] <= 10
    # offline: the s3:// placeholder (and CIFAR-10 unless its files are here) is replaced by
    # builtin rows of the same role, in place; said in one line
    kinds = [s["type"] for s in cfg["data"]["sources"]]
    assert kinds[1] == "builtin" and len(kinds) == 2
    assert cfg["data"]["sources"][1]["synthetic"] == SMOKE_ROWS["synthetic"]
    stand_in = [n for n in notes if "builtin data stands in" in n]
    assert len(stand_in) == 1 and "data.sources[1] (npz s3://YOUR_BUCKET/edm/1m.npz" in stand_in[0]
    assert _rows([s for s in cfg["data"]["sources"] if s["type"] == "builtin"]) <= 512 + 256 + 1024
    # the resources of this machine, not the cluster's 8 x (10 CPUs + 1 GPU)
    cpus, gpus = local_resources()
    ray_ = cfg["ray"]
    assert full["ray"]["use_gpu"] and full["ray"]["cpus_per_worker"] == 10
    assert ray_["use_gpu"] is bool(gpus) and ray_["num_workers"] == 1
    assert ray_["num_cpus"] == max(2, cpus) and ray_["cpus_per_worker"] <= ray_["num_cpus"] / 2
    sc = cfg["scoring"]
    assert sc["pool_min"] == sc["pool_max"] == 1 and sc["cpus_per_actor"] <= ray_["num_cpus"] / 2
    assert sc["gpus_per_actor"] == (1.0 if gpus else 0.0)
    assert cfg["sweep"]["max_concurrent_trials"] == 1


def test_the_demo_smoke_test_keeps_its_sizes_and_set_still_wins(capsys):
    cfg, notes = _shown(capsys, "--smoke-test", "--set", "training.epochs=2", "--set", "name=x")
    assert notes == []
    (src,) = cfg["data"]["sources"]
    assert (src["real_train"], src["real_test"], src["synthetic"]) == (512, 256, 1024)
    assert src["noise"] == 0.05  # the demo's source, shrunk, not another one
    assert cfg["training"]["epochs"] == 2  # --set wins over the shrinking...
    assert cfg["name"] == "x-smoke"  # ...but a smoke test always has its own name
    assert cfg["tracking"]["experiment"] == "puma-ray-smoke"


def test_sources_that_are_here_are_limited_not_replaced(tmp_path, capsys):
    npz = tmp_path / "syn.npz"
    np.savez(npz, image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.int64))
    root = tmp_path / "tv"
    for f in ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    missing = tmp_path / "gone.npz"
    sources = (
        f"data.sources=[{{type: torchvision, name: cifar10, root: '{root}'}}, "
        f"{{type: npz, path: '{npz}'}}, {{type: npz, path: '{missing}', split: test}}]"
    )
    cfg, notes = _shown(capsys, "--smoke-test", "--set", sources)
    tv, here, gone = cfg["data"]["sources"]
    assert (tv["type"], tv["limit_train"], tv["limit_test"]) == ("torchvision", 512, 256)
    assert (here["type"], here["limit"]) == ("npz", SMOKE_ROWS["synthetic"])
    assert gone["type"] == "builtin" and gone["real_test"] == SMOKE_ROWS["real_test"]
    assert gone["real_train"] == gone["synthetic"] == 0
    assert notes == [
        f"smoke test: builtin data stands in for data.sources[2] (npz {missing}: no such file)"
    ]


def test_joining_a_cluster_keeps_its_resources_and_remote_sources(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    cfg, _ = _shown(capsys, EDM, "--smoke-test")
    assert cfg["ray"]["use_gpu"] is True and cfg["ray"]["cpus_per_worker"] == 10
    assert cfg["ray"]["num_workers"] == 1 and cfg["scoring"]["pool_max"] == 1
    npz = cfg["data"]["sources"][1]
    assert npz["type"] == "npz" and npz["limit"] == SMOKE_ROWS["synthetic"]


def test_smoke_test_is_idempotent_on_a_config_object():
    once = load_config(EDM, smoke_test=True, log=lambda m: None)
    twice = load_config(once, smoke_test=True, log=lambda m: None)
    assert twice.name == "cifar10_edm1m-smoke" and twice == once


def test_a_bad_value_is_one_line_before_any_shrinking():
    with pytest.raises(ConfigError, match=r"training\.batch_size"):
        load_config(None, ["training.batch_size=abc"], smoke_test=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--run-dir", "/data/x"], "/data/x-smoke"),
        (["--run-dir", "/data/x/"], "/data/x-smoke"),
        (["--run-dir", "s3://bucket/runs/x"], "s3://bucket/runs/x-smoke"),
        ([], os.path.join("runs", "demo-smoke")),
    ],
)
def test_smoke_run_dir_is_never_the_real_one(argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["run", "--smoke-test", *argv])
    run_dir = cli._run_dir(args, cli._config(args))
    assert run_dir == (expected if "://" in expected else os.path.abspath(expected))
    real = build_parser().parse_args(["run", *argv])
    assert cli._run_dir(real, cli._config(real)) != run_dir
