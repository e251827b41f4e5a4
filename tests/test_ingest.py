"""`puma-ray ingest`: Ray tasks write the same bytes as one process; reruns skip, changes and
--force rewrite; npz files stream in chunks with bounded memory; every bad input is one clear
DataError naming the file and problem, raised before anything is written."""

import json
import os
import socket
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from puma_ray.config import load_config
from puma_ray.data import dataset_dirs, open_dataset, torchvision_sets  # noqa: F401
from puma_ray.data.npz import NpzArrays
from puma_ray.errors import DataError
from puma_ray.ingest import run_ingest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20
SMALL = "data.sources=[{type: builtin, real_train: 2000, synthetic: 3000, real_test: 500}]"


def _quiet(_msg):
    pass


def _cfg(*sets, sources=SMALL, rows_per_shard=1000):
    # no validation split: these tests count train rows (tests/test_validation_split.py)
    sets = [sources, f"data.rows_per_shard={rows_per_shard}", "data.validation=0", *sets]
    return load_config(None, sets)


def _npz_cfg(*paths, num_classes=None, rows_per_shard=1000, test=False):
    items = ", ".join(f"{{type: npz, path: '{p}'}}" for p in paths)
    if test:  # ingest refuses a dataset without test rows: the first file's first row
        items += f", {{type: npz, path: '{paths[0]}', split: test, source: real, limit: 1}}"
    sets = [f"data.num_classes={num_classes}"] if num_classes else []
    return _cfg(*sets, sources=f"data.sources=[{items}]", rows_per_shard=rows_per_shard)


def _read(uri):
    ids, images, labels, synth = [], [], [], []
    for b in open_dataset(uri).iter_batches(batch_size=4096):
        ids.append(b.ids)
        images.append(b.images)
        labels.append(b.labels)
        synth.append(b.is_synthetic)
    return tuple(np.concatenate(a) for a in (ids, images, labels, synth))


def _shard_bytes(run_dir):
    out = {}
    for split_dir in dataset_dirs(run_dir):
        for name in sorted(os.listdir(split_dir)):
            if name.endswith(".parquet"):
                with open(os.path.join(split_dir, name), "rb") as f:
                    out[f"{os.path.basename(split_dir)}/{name}"] = f.read()
    return out


def _mtimes(run_dir):
    return {
        f"{d}/{n}": os.stat(os.path.join(d, n)).st_mtime_ns
        for d in dataset_dirs(run_dir)
        for n in os.listdir(d)
    }


# ------------------------------------------------------------------------------------------------
# Builtin through the stage.


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("serial"))
    summary = run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    return run_dir, summary


def test_ingest_writes_both_splits(serial_run):
    run_dir, summary = serial_run
    assert summary.mode == "in-process" and not summary.skipped
    assert summary.rows_written == 5500
    train_uri, test_uri = dataset_dirs(run_dir)
    train, test = open_dataset(train_uri), open_dataset(test_uri)
    assert train.info.split == "train" and test.info.split == "test"
    assert train.num_rows == 5000 and test.num_rows == 500
    assert train.info.rows_per_source == {"real": 2000, "synthetic": 3000}
    assert test.info.rows_per_source == {"real": 500, "synthetic": 0}
    assert len(train.info.shards) == 5 and len(test.info.shards) == 1
    assert train.info.class_names[:2] == ["disk", "ring"] and train.info.num_classes == 10
    ids, _, labels, synth = _read(train_uri)
    assert len(np.unique(ids)) == 5000
    assert (ids[synth] >= 2**38).all() and (ids[~synth] < 2000).all()
    assert labels.min() >= 0 and labels.max() <= 9
    test_ids, *_ = _read(test_uri)
    assert test_ids.min() == 2**39 and not set(test_ids) & set(ids)
    text = summary.format()
    assert "train" in text and "5,000" in text and "rows/s" in text and "disk" in text


@pytest.mark.ray
def test_ray_tasks_write_the_same_bytes(serial_run, ray_local, tmp_path):
    run_dir, serial = serial_run
    lines = []
    summary = run_ingest(_cfg(), str(tmp_path), parallel=True, log=lines.append)
    assert summary.mode == "ray tasks"
    assert sum("rows/s" in line for line in lines) == 6  # one progress line per shard
    assert _shard_bytes(str(tmp_path)) == _shard_bytes(run_dir)
    for split in ("train", "test"):
        assert summary.splits[split].fingerprint == serial.splits[split].fingerprint


def test_rerun_skips_changes_rewrite_force_rewrites(tmp_path):
    run_dir = str(tmp_path)
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    before = _mtimes(run_dir)

    again = run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    assert again.skipped and again.rows_written == 0
    assert "nothing to do" in again.format()
    assert _mtimes(run_dir) == before

    # A synthetic-only change rewrites train; the test split does not depend on it.
    changed = run_ingest(
        _cfg("data.sources.0.mislabeled_fraction=0.2"), run_dir, parallel=False, log=_quiet
    )
    assert not changed.splits["train"].skipped and changed.splits["test"].skipped
    assert changed.splits["train"].fingerprint != again.splits["train"].fingerprint
    after = _mtimes(run_dir)
    test_dir = dataset_dirs(run_dir)[1]
    assert all(after[k] == v for k, v in before.items() if k.startswith(test_dir))
    assert all(after[k] != v for k, v in before.items() if not k.startswith(test_dir))

    # The noise level changes every split.
    noisier = run_ingest(_cfg("data.sources.0.noise=0.2"), run_dir, parallel=False, log=_quiet)
    assert not noisier.splits["train"].skipped and not noisier.splits["test"].skipped

    forced = run_ingest(
        _cfg("data.sources.0.noise=0.2"), run_dir, parallel=False, force=True, log=_quiet
    )
    assert not forced.skipped and forced.rows_written == 5500
    assert forced.splits["train"].fingerprint == noisier.splits["train"].fingerprint


def test_fewer_rows_leave_no_stale_shards(tmp_path):
    run_dir = str(tmp_path)
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    small = "data.sources=[{type: builtin, real_train: 1000, synthetic: 0, real_test: 200}]"
    run_ingest(_cfg(sources=small), run_dir, parallel=False, log=_quiet)
    train_uri = dataset_dirs(run_dir)[0]
    assert sorted(os.listdir(train_uri)) == ["dataset.json", "part-00000.parquet"]
    assert open_dataset(train_uri).num_rows == 1000


def test_builtin_rows_do_not_depend_on_sharding(serial_run, tmp_path):
    run_dir, _ = serial_run
    run_ingest(_cfg(rows_per_shard=700), str(tmp_path), parallel=False, log=_quiet)
    for a, b in zip(dataset_dirs(run_dir), dataset_dirs(str(tmp_path)), strict=True):
        ra, rb = _read(a), _read(b)
        order_a, order_b = np.argsort(ra[0]), np.argsort(rb[0])
        for x, y in zip(ra, rb, strict=True):
            np.testing.assert_array_equal(x[order_a], y[order_b])


def test_manifest_is_written_last(serial_run):
    run_dir, _ = serial_run
    for uri in dataset_dirs(run_dir):
        times = {n: os.stat(os.path.join(uri, n)).st_mtime_ns for n in os.listdir(uri)}
        manifest = times.pop("dataset.json")
        assert times and all(t <= manifest for t in times.values())
        assert not [n for n in os.listdir(uri) if n.startswith(".")]  # no temp files left


def test_interrupted_ingest_is_refused_then_redone(tmp_path):
    run_dir = str(tmp_path)
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    train_uri = dataset_dirs(run_dir)[0]
    os.remove(os.path.join(train_uri, "dataset.json"))  # as if killed before the manifest
    with pytest.raises(DataError, match="incomplete"):
        open_dataset(train_uri)
    summary = run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    assert not summary.splits["train"].skipped and summary.splits["test"].skipped
    assert open_dataset(train_uri).num_rows == 5000


# ------------------------------------------------------------------------------------------------
# npz sources.


def _npz(path, n, shape=(32, 32, 3), compressed=False, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {
        "image": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, n),
    }
    arrays.update(extra)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_chunks_match_the_arrays(tmp_path, compressed):
    path = str(tmp_path / "x.npz")
    arrays = _npz(path, 1000, compressed=compressed)
    reader = NpzArrays(path)
    assert reader.num_rows == 1000 and reader.image_shape == (32, 32, 3)
    chunks = list(reader.iter_chunks(96))  # much smaller than the file
    assert [len(lb) for _, lb in chunks] == [96] * 10 + [40]
    np.testing.assert_array_equal(np.concatenate([im for im, _ in chunks]), arrays["image"])
    np.testing.assert_array_equal(np.concatenate([lb for _, lb in chunks]), arrays["label"])
    assert NpzArrays(path, limit=250).num_rows == 250


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_ingest_is_exact_and_bounded(tmp_path, compressed):
    """117 MiB of images ingested with a peak of Python/numpy memory far below the file."""
    n = 40_000
    path = str(tmp_path / "big.npz")
    rng = np.random.default_rng(0)
    if compressed:  # deflate is slow on random bytes; low-entropy images keep the test fast
        images = np.repeat(rng.integers(0, 4, (n, 1, 32, 3), dtype=np.uint8) * 60, 32, axis=1)
    else:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    del images
    # Warm up first: pyarrow imports ~25 MB of modules lazily on first use, once per process.
    _npz(str(tmp_path / "tiny.npz"), 10)
    run_ingest(
        _npz_cfg(str(tmp_path / "tiny.npz"), test=True),
        str(tmp_path / "warm"),
        parallel=False,
        log=_quiet,
    )
    run_dir = str(tmp_path / "run")
    tracemalloc.start()
    try:
        summary = run_ingest(
            _npz_cfg(path, rows_per_shard=15_000, test=True), run_dir, parallel=False, log=_quiet
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    raw = n * 32 * 32 * 3
    # One 16 MiB row-group buffer plus ~4 MB reads (measured: 24 MiB stored, 32 MiB deflated).
    assert peak < 48 * MB < raw / 2, (
        f"tracemalloc peak {peak / MB:.0f} MiB, {raw / MB:.0f} MiB file"
    )
    assert summary.splits["train"].rows == n and summary.splits["train"].shards == 3
    assert summary.splits["test"].rows == 1
    ids, got_images, got_labels, synth = _read(dataset_dirs(run_dir)[0])
    np.testing.assert_array_equal(ids, np.arange(n))
    np.testing.assert_array_equal(got_labels, labels)
    assert synth.all()  # npz sources are synthetic unless configured otherwise
    with np.load(path) as f:
        np.testing.assert_array_equal(got_images, f["image"])


def test_npz_and_builtin_together(tmp_path):
    path = str(tmp_path / "extra.npz")
    arrays = _npz(path, 300)
    sources = (
        "data.sources=[{type: builtin, real_train: 500, synthetic: 0, real_test: 100}, "
        f"{{type: npz, path: '{path}'}}]"
    )
    summary = run_ingest(_cfg(sources=sources), str(tmp_path / "run"), parallel=False, log=_quiet)
    assert summary.splits["train"].rows_per_source == {"real": 500, "synthetic": 300}
    ids, images, labels, synth = _read(dataset_dirs(str(tmp_path / "run"))[0])
    npz_rows = ids >= 2**40  # the second source's id block
    np.testing.assert_array_equal(ids[npz_rows], 2**40 + np.arange(300))
    np.testing.assert_array_equal(images[npz_rows], arrays["image"])
    np.testing.assert_array_equal(labels[npz_rows], arrays["label"])


# ------------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file and the problem, and nothing written.


def _assert_refused(cfg, run_dir, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        run_ingest(cfg, str(run_dir), parallel=False, log=_quiet)
    assert "\n" not in str(info.value)
    assert not os.path.exists(os.path.join(run_dir, "data"))
    return str(info.value)


def test_npz_wrong_keys(tmp_path):
    path = str(tmp_path / "keys.npz")
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    msg = _assert_refused(
        _npz_cfg(path), tmp_path / "run", r"missing key\(s\) \['image', 'label'\]"
    )
    assert path in msg and "found ['x', 'y']" in msg


def test_npz_not_four_dimensional(tmp_path):
    path = str(tmp_path / "flat.npz")
    np.savez(path, image=np.zeros((4, 32, 32), np.uint8), label=np.zeros(4, np.int64))
    _assert_refused(_npz_cfg(path), tmp_path / "run", r"flat.npz: 'image' has shape \(4, 32, 32\)")


def test_sources_with_different_image_shapes(tmp_path):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    _npz(a, 10)
    _npz(b, 10, shape=(28, 28, 3))
    msg = _assert_refused(_npz_cfg(a, b), tmp_path / "run", "disagree on image shape")
    assert "b.npz: [28, 28, 3]" in msg
    # ... and an npz next to the builtin source (32x32x3)
    sources = f"data.sources=[{{type: builtin}}, {{type: npz, path: '{b}'}}]"
    _assert_refused(_cfg(sources=sources), tmp_path / "run", "disagree on image shape")


def test_npz_labels_outside_num_classes(tmp_path):
    path = str(tmp_path / "labels.npz")
    labels = np.arange(20) % 10
    labels[13] = 12
    np.savez(path, image=np.zeros((20, 8, 8, 3), np.uint8), label=labels)
    _assert_refused(
        _npz_cfg(path, num_classes=10),
        tmp_path / "run",
        r"labels.npz: label 12 at row 13 is outside \[0, 10\)",
    )
    labels[13] = -1
    np.savez(path, image=np.zeros((20, 8, 8, 3), np.uint8), label=labels)
    _assert_refused(_npz_cfg(path), tmp_path / "run", "labels.npz: negative label -1 at row 13")


def test_npz_labels_outside_builtin_classes(tmp_path):
    path = str(tmp_path / "more.npz")
    np.savez(path, image=np.zeros((5, 32, 32, 3), np.uint8), label=np.array([0, 1, 2, 10, 3]))
    sources = f"data.sources=[{{type: builtin}}, {{type: npz, path: '{path}'}}]"
    _assert_refused(_cfg(sources=sources), tmp_path / "run", r"label 10 at row 3 .* \[0, 10\)")


def test_npz_non_uint8_images(tmp_path):
    path = str(tmp_path / "float.npz")
    np.savez(path, image=np.zeros((4, 32, 32, 3), np.float32), label=np.zeros(4, np.int64))
    _assert_refused(_npz_cfg(path), tmp_path / "run", "float.npz: 'image' has dtype float32")


def test_npz_label_count_differs(tmp_path):
    path = str(tmp_path / "count.npz")
    np.savez(path, image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(5, np.int64))
    _assert_refused(_npz_cfg(path), tmp_path / "run", "count.npz: 5 labels for 4 images")


def test_npz_empty(tmp_path):
    path = str(tmp_path / "empty.npz")
    np.savez(path, image=np.zeros((0, 32, 32, 3), np.uint8), label=np.zeros(0, np.int64))
    _assert_refused(_npz_cfg(path), tmp_path / "run", r"empty.npz: empty source \(0 rows\)")


def test_npz_missing_or_not_a_zip(tmp_path):
    _assert_refused(
        _npz_cfg(str(tmp_path / "nope.npz")), tmp_path / "run", "nope.npz: npz file not found"
    )
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    _assert_refused(_npz_cfg(str(path)), tmp_path / "run", "junk.npz: not an .npz file")


def test_npz_truncated_member(tmp_path):
    path = str(tmp_path / "cut.npz")
    _npz(path, 200)
    # Keep the zip readable but cut the image member short.
    with zipfile.ZipFile(path) as zf:
        image_member = zf.read("image.npy")
        label_member = zf.read("label.npy")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("image.npy", image_member[: len(image_member) // 2])
        zf.writestr("label.npy", label_member)
    with pytest.raises(DataError, match=r"cut.npz\[image\]: file ends at row"):
        run_ingest(_npz_cfg(path, test=True), str(tmp_path / "run"), parallel=False, log=_quiet)
    assert not os.path.exists(os.path.join(tmp_path, "run", "data", "train", "dataset.json"))


def test_builtin_all_zero_is_empty(tmp_path):
    sources = "data.sources=[{type: builtin, real_train: 0, synthetic: 0, real_test: 0}]"
    _assert_refused(_cfg(sources=sources), tmp_path / "run", r"data.sources\[0\].*empty source")


def test_torchvision_offline_says_where_to_put_files(tmp_path, monkeypatch):
    def no_network(*_args, **_kw):
        raise AssertionError("ingest tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    root = tmp_path / "tv"
    for name, where in (("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat")):
        sources = f"data.sources=[{{type: torchvision, name: {name}, root: '{root}'}}]"
        msg = _assert_refused(_cfg(sources=sources), tmp_path / "run", "files not found")
        assert str(root) in msg and where in msg and "download: true" in msg


# ------------------------------------------------------------------------------------------------
# CLI.


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "puma_ray", "ingest", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_cli_ingest_prints_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("--smoke-test", "--no-parallel", "--run-dir", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ingest: dataset 'builtin'" in proc.stdout
    # 512 real + 1024 synthetic, the demo's quarter of each class's real rows held out
    assert "train       1,407" in proc.stdout and "written" in proc.stdout
    assert "val           129" in proc.stdout
    assert "part-00000.parquet" in proc.stderr  # progress lines
    assert not run_dir.exists()  # a smoke test writes beside the run dir it is given
    info = json.loads((tmp_path / "run-smoke" / "data" / "train" / "dataset.json").read_text())
    assert info["num_rows"] == 1407
    again = _cli("--smoke-test", "--no-parallel", "--run-dir", str(run_dir), cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_cli_bad_npz_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "missing.npz"
    proc = _cli(
        "--no-parallel",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.sources=[{{type: npz, path: '{missing}'}}]",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("puma-ray ingest: error:") and str(missing) in lines[0]
