"""Failure and first-use paths that the stage tests do not reach: a training process killed in
the middle of an epoch and run again ends exactly where an uninterrupted run ends (history,
learning rate per epoch, final weights), and the torchvision CIFAR-10 source ingests a
`cifar-10-batches-py` directory in the real format without touching the network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from puma_ray.config import load_config
from puma_ray.data import dataset_dirs, open_dataset


def _quiet(_msg):
    pass


# ----------------------------------------------------------------------------------------------
# torchvision CIFAR-10 from a local directory.


class _Py2Pickler(pickle._Pickler):
    """Pickles `str` and `bytes` as Python 2 strings (SHORT_BINSTRING / BINSTRING), as the
    CIFAR-10 batches were written (cPickle, protocol 2): read with encoding='bytes' their keys
    are b'data', b'labels', ...; torchvision reads them with encoding='latin1'."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path, obj) -> str:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


LABEL_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar10(root, per_batch: int, test_rows: int, monkeypatch):
    """`root/cifar-10-batches-py/` as the CIFAR-10 python tarball unpacks: data_batch_1..5 and
    test_batch ({data: uint8 [N, 3072] (1024 R, 1024 G, 1024 B per row), labels: [N] ints,
    batch_label, filenames}) and batches.meta ({label_names, num_cases_per_batch, num_vis}).
    torchvision checks each file's md5 against the real files'; those are replaced by the md5s
    of these files (its check still runs). Returns the (images HWC, labels) written per split."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    written = {"train": ([], []), "test": ([], [])}
    train_list, test_list = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = per_batch if name != "test_batch" else test_rows
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        split = "test" if name == "test_batch" else "train"
        batch = {
            "batch_label": f"{split} batch {i + 1}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(n)],
        }
        md5 = _write_py2_pickle(folder / name, batch)
        (test_list if split == "test" else train_list).append([name, md5])
        written[split][0].append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
        written[split][1].append(np.array(labels, np.int64))
    meta = {"num_cases_per_batch": per_batch, "label_names": LABEL_NAMES, "num_vis": 3072}
    meta_md5 = _write_py2_pickle(folder / "batches.meta", meta)
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return {s: (np.concatenate(im), np.concatenate(lb)) for s, (im, lb) in written.items()}


def _read_split(uri):
    ds = open_dataset(uri)
    parts = list(ds.iter_batches(batch_size=4096))
    return ds.info, tuple(
        np.concatenate([getattr(b, k) for b in parts]) for k in ("ids", "images", "labels")
    )


def test_torchvision_cifar10_from_a_local_directory(tmp_path, monkeypatch):
    def no_network(*_args, **_kw):
        raise AssertionError("ingest tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from puma_ray.ingest import run_ingest

    root = tmp_path / "tv"
    want = _fake_cifar10(root, per_batch=20, test_rows=30, monkeypatch=monkeypatch)
    sources = f"data.sources=[{{type: torchvision, name: cifar10, root: '{root}'}}]"
    cfg = load_config(None, [sources, "data.rows_per_shard=64", "data.validation=0"])
    run_dir = str(tmp_path / "run")
    summary = run_ingest(cfg, run_dir, parallel=False, log=_quiet)
    assert summary.rows_written == 130
    assert summary.splits["train"].rows == 100 and summary.splits["test"].rows == 30

    train_uri, test_uri = dataset_dirs(run_dir)
    for split, uri, first_id in (("train", train_uri, 0), ("test", test_uri, 2**39)):
        info, (ids, images, labels) = _read_split(uri)
        images_want, labels_want = want[split]
        assert info.class_names == LABEL_NAMES and info.num_classes == 10
        assert list(info.image_shape) == [32, 32, 3]
        assert info.rows_per_source == {"real": len(labels_want), "synthetic": 0}
        np.testing.assert_array_equal(ids, first_id + np.arange(len(labels_want)))
        np.testing.assert_array_equal(images, images_want)  # the batches' rows, in file order
        np.testing.assert_array_equal(labels, labels_want)
    assert len(open_dataset(train_uri).files) == 2  # 100 rows at 64 per shard

    again = run_ingest(cfg, run_dir, parallel=False, log=_quiet)
    assert again.skipped and again.rows_written == 0

    # limits take the first rows of each split
    limited = load_config(
        None,
        [
            f"data.sources=[{{type: torchvision, name: cifar10, root: '{root}', "
            "limit_train: 37, limit_test: 5}]",
            "data.validation=0",
        ],
    )
    other = str(tmp_path / "limited")
    run_ingest(limited, other, parallel=False, log=_quiet)
    for split, uri, n in zip(("train", "test"), dataset_dirs(other), (37, 5), strict=True):
        _, (_ids, images, labels) = _read_split(uri)
        np.testing.assert_array_equal(images, want[split][0][:n])
        np.testing.assert_array_equal(labels, want[split][1][:n])


# ----------------------------------------------------------------------------------------------
# Training killed mid-epoch, then run again, against an uninterrupted run.

TRAIN = [
    "data.sources=[{type: builtin, real_train: 0, real_test: 32, synthetic: 160}]",
    "data.rows_per_shard=1024",  # one shard: one read task, rows in file order
    "pruning.strategy=random",
    "pruning.ratio=0.25",
    "pruning.eps_rule=none",
    "training.epochs=2",
    "training.batch_size=32",
    "training.lr=0.05",
    "training.warmup_epochs=0.5",
    "training.attack.steps=1",
    "evaluation.subset=16",
    "evaluation.epoch_subset=16",
    "evaluation.epoch_pgd_steps=1",
    "evaluation.batch_size=16",
    "ray.num_workers=0",
]
# timing, not results; attempt_start_epoch tells the runs apart on purpose
TIMING = {"samples_per_s", "epoch_s", "device_seconds", "attempt_start_epoch"}

# One training run in a fresh process that joins the session's Ray: what `puma-ray train` does,
# with one thread and Ray Data keeping block order, so two runs are bit-for-bit comparable.
_TRAIN_PROCESS = """
import json, sys
import ray, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
ray.init(address=args["address"], log_to_driver=False)
ray.data.DataContext.get_current().execution_options.preserve_order = True
from puma_ray.config import load_config
from puma_ray.train import run_train
s = run_train(load_config(None, args["sets"]), args["run_dir"], log=lambda _m: None,
              debug_fail=args["fail"])
print("RESULT " + json.dumps({"history": s.history, "resumed": s.resumed_from_epoch,
                              "mlflow_run_id": s.mlflow_run_id}))
"""


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """Ingested shards and a random kept set (in-process, no Ray), shared read-only."""
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune

    run_dir = str(tmp_path_factory.mktemp("resume_data"))
    cfg = load_config(None, TRAIN)
    run_ingest(cfg, run_dir, parallel=False, log=_quiet)
    run_prune(cfg, run_dir, parallel=False, log=_quiet)
    return run_dir


def _run_dir(train_data, path):
    path.mkdir()
    for sub in ("data", "kept"):
        os.symlink(os.path.join(train_data, sub), path / sub)
    return str(path)


def _train(ray_local, run_dir, fail=None):
    args = {
        "address": ray_local.get_runtime_context().gcs_address,
        "sets": TRAIN,
        "run_dir": run_dir,
        "fail": fail,
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", _TRAIN_PROCESS, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
@pytest.mark.ray
def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    ray_local, train_data, tmp_path
):
    from mlflow.tracking import MlflowClient

    from puma_ray.models import load_checkpoint

    whole = _run_dir(train_data, tmp_path / "whole")
    a = _result(_train(ray_local, whole))
    assert a["resumed"] == 0 and [m["attempt_start_epoch"] for m in a["history"]] == [0, 0]

    # the process dies (os._exit) after the first step of epoch 2, with epoch 1 checkpointed
    cut = _run_dir(train_data, tmp_path / "cut")
    marker = str(tmp_path / "killed-once")
    fail = {"rank": 0, "epoch": 1, "marker": marker, "delay_s": 0}
    killed = _train(ray_local, cut, fail)
    assert killed.returncode == 1 and os.path.exists(marker), killed.stderr[-4000:]
    train_dir = os.path.join(cut, "train")
    assert not os.path.exists(os.path.join(train_dir, "model.pt"))
    assert not os.path.exists(os.path.join(train_dir, "summary.json"))
    states = [d for d in os.listdir(train_dir) if d.startswith("local-")]
    assert len(states) == 1 and os.path.exists(os.path.join(train_dir, states[0], "state.pt"))

    b = _result(_train(ray_local, cut, fail))  # the marker is there: it does not die again
    assert b["resumed"] == 1
    assert [m["attempt_start_epoch"] for m in b["history"]] == [0, 1]
    assert [m["epoch"] for m in b["history"]] == [1, 2]
    # history, learning rate and accuracies of every epoch: exactly the uninterrupted run's
    for ma, mb in zip(a["history"], b["history"], strict=True):
        assert {k: v for k, v in ma.items() if k not in TIMING} == {
            k: v for k, v in mb.items() if k not in TIMING
        }
    assert a["history"][0]["lr"] != a["history"][1]["lr"]  # the schedule moved

    wa, _ = load_checkpoint(os.path.join(whole, "train", "model.pt"))
    wb, _ = load_checkpoint(os.path.join(cut, "train", "model.pt"))
    sa, sb = wa.state_dict(), wb.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"final weights differ: {different}"

    # the MLflow run of the killed process continued: each epoch logged once
    client = MlflowClient(f"sqlite:///{cut}/mlflow.db")
    assert b["mlflow_run_id"] is not None
    steps = [m.step for m in client.get_metric_history(b["mlflow_run_id"], "train_loss")]
    assert sorted(steps) == [1, 2]
    assert client.get_run(b["mlflow_run_id"]).info.status == "FINISHED"
