"""Bad input a user can give (issue 14): each is one line naming the file or field, exit status 2,
and nothing written; never a traceback, never a silently wrong result. All Ray-free and fast."""

import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
import yaml

from puma_ray.cli import main
from puma_ray.config import load_config
from puma_ray.data import dataset_dirs, open_dataset
from puma_ray.data import npz as npz_module
from puma_ray.data.npz import NpzArrays
from puma_ray.errors import DataError
from puma_ray.ingest import run_ingest
from puma_ray.models import create_model, save_checkpoint

TINY = "data.sources=[{type: builtin, real_train: 16, synthetic: 0, real_test: 16}]"


def _refused(capsys, argv, *expected) -> str:
    """Run the CLI; assert exit 2 and one stderr line `puma-ray CMD: error: ...` holding each of
    `expected`. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"puma-ray {argv[0]}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _written(run_dir) -> list[str]:
    """Stage outputs under run_dir (hidden bookkeeping such as a lock file does not count)."""
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(run_dir)
        for f in files
        if f.endswith((".json", ".parquet", ".db")) and not f.startswith(".")
    ]


def _npz(path, n, *, seed=0, shape=(32, 32, 3), compressed=False, fortran=False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    if fortran:
        images = np.asfortranarray(images)
    labels = rng.integers(0, 10, n).astype(np.int64)
    labels[: min(n, 10)] = np.arange(min(n, 10))  # every class, so num_classes is 10
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    return images, labels


def _member_data(path, member):
    """(offset, length) of a zip member's (compressed) bytes in the file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _write_config(path, sources, **data):
    path.write_text(yaml.safe_dump({"data": {"sources": sources, **data}}))
    return str(path)


# ----------------------------------------------------------------------------------------------
# 7. evaluate checks the checkpoint against the test data before running.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir with 16 builtin train and 16 test rows (10 classes, 32x32x3)."""
    run_dir = str(tmp_path_factory.mktemp("tiny") / "run")
    run_ingest(load_config(None, [TINY]), run_dir, parallel=False, log=lambda _m: None)
    return run_dir


def _evaluate(tiny_run, checkpoint, name):
    return [
        "evaluate",
        str(checkpoint),
        "--run-dir",
        tiny_run,
        "--name",
        name,
        "--set",
        "tracking.tracking_uri=none",
        "--set",
        "evaluation.pgd_steps=2",
    ]


@pytest.mark.parametrize(
    "label, num_classes, options, image_shape, expected",
    [
        ("five", 5, {}, None, "model has 5 classes but the dataset has 10"),
        ("hundred", 100, {}, None, "model has 100 classes but the dataset has 10"),
        ("big", 10, {}, (64, 64, 3), "trained on 64x64x3 images but the dataset's are 32x32x3"),
        ("gray", 10, {"in_channels": 1}, None, "32x32x1 images but the dataset's are 32x32x3"),
    ],
)
def test_evaluate_refuses_a_checkpoint_that_does_not_fit(
    tiny_run, tmp_path, capsys, label, num_classes, options, image_shape, expected
):
    ckpt = tmp_path / f"{label}.pt"
    model = create_model("small_cnn", num_classes, **options)
    save_checkpoint(ckpt, model, image_shape=image_shape)
    name = f"eval_{label}"
    _refused(capsys, _evaluate(tiny_run, ckpt, name), f"{ckpt}: ", expected)
    assert not os.path.exists(os.path.join(tiny_run, name))


def test_evaluate_accepts_a_checkpoint_that_fits(tiny_run, tmp_path, capsys):
    ckpt = tmp_path / "fits.pt"
    save_checkpoint(ckpt, create_model("small_cnn", 10))
    assert main(_evaluate(tiny_run, ckpt, "eval_fits")) == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(tiny_run, "eval_fits", "summary.json"))


# ----------------------------------------------------------------------------------------------
# 8. One line, not a traceback.


@pytest.mark.parametrize("index", ["x", "5", "-2"])
def test_set_a_bad_list_index(capsys, index):
    _refused(
        capsys,
        ["config", "--set", f"data.sources.{index}=1"],
        f"--set data.sources.{index}=1: '{index}' is not an index of data.sources (it has 1 item)",
    )


def test_config_given_a_directory(tmp_path, capsys):
    _refused(capsys, ["config", str(tmp_path)], f"{tmp_path}: is a directory")


def test_config_given_a_binary_file(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01binary")
    _refused(capsys, ["config", str(path)], f"{path}: not a text file")


def test_hdfs_run_dir_is_one_line(tmp_path, capsys):
    # pyarrow needs libhdfs and a JVM for hdfs://; without them (here) it raises a long OSError
    uri = "hdfs://namenode:8020/runs/x"
    _refused(
        capsys,
        ["ingest", "--no-parallel", "--set", TINY, "--run-dir", uri],
        "hdfs://namenode:8020/runs/x",
        "cannot reach the hdfs:// filesystem",
    )


def _npz_config(tmp_path, train_path):
    """A config of the npz `train_path` (32x32x3) plus builtin test rows."""
    sources = [
        {"type": "npz", "path": str(train_path)},
        {"type": "builtin", "real_train": 0, "synthetic": 0, "real_test": 8},
    ]
    return _write_config(tmp_path / "cfg.yaml", sources, rows_per_shard=100_000)


def test_npz_corrupt_deflate_stream_in_the_header(tmp_path, capsys):
    path = tmp_path / "deflate.npz"
    _npz(path, 64, compressed=True)
    start, _ = _member_data(path, "image.npy")
    _patch(path, start, b"\xff" * 16)  # BTYPE 11: an invalid block type (zlib.error)
    run_dir = tmp_path / "run"
    cfg = _npz_config(tmp_path, path)
    _refused(
        capsys,
        ["ingest", cfg, "--no-parallel", "--run-dir", str(run_dir)],
        f"{path}[image]: corrupt compressed data",
    )
    assert _written(run_dir) == []


def test_npz_corrupt_deflate_stream_in_the_rows(tmp_path, capsys):
    """The header and the first rows inflate; the stream then has an invalid block."""
    path = tmp_path / "rows.npz"
    _npz(path, 400, compressed=True)
    start, length = _member_data(path, "image.npy")
    with zipfile.ZipFile(path) as zf:
        member = zf.read("image.npy")
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    head = c.compress(member[: len(member) // 4]) + c.flush(zlib.Z_SYNC_FLUSH)
    assert len(head) < length
    _patch(path, start, head + b"\xff" * (length - len(head)))
    run_dir = tmp_path / "run"
    cfg = _npz_config(tmp_path, path)
    _refused(  # "corrupt at row": found while reading rows, after the header inflated
        capsys,
        ["ingest", cfg, "--no-parallel", "--run-dir", str(run_dir)],
        f"{path}[image]: corrupt at row",
        "invalid block type",
    )
    assert not [f for f in _written(run_dir) if f.endswith("dataset.json")]


def test_npz_bad_local_zip_header(tmp_path, capsys):
    path = tmp_path / "header.npz"
    _npz(path, 16)
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo("image.npy").header_offset
    _patch(path, offset, b"XXXX")  # the local file header's signature (BadZipFile)
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        ["ingest", _npz_config(tmp_path, path), "--no-parallel", "--run-dir", str(run_dir)],
        f"{path}[image]: corrupt zip member",
    )
    assert _written(run_dir) == []


def _tampered(tmp_path, name, change):
    good = tmp_path / "good.pt"
    save_checkpoint(good, create_model("small_cnn", 10))
    ckpt = torch.load(good, weights_only=True)
    change(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "label, change, expected",
    [
        (
            "lists",
            lambda c: c.update(state_dict={k: v.tolist() for k, v in c["state_dict"].items()}),
            "is a list, not a tensor",
        ),
        ("text_shape", lambda c: c.update(image_shape=["a", 32, 3]), "image_shape is ['a', 32, 3]"),
        ("none_shape", lambda c: c.update(image_shape=[None, 32, 3]), "image_shape is [None, 32"),
        ("float_shape", lambda c: c.update(image_shape=[32.5, 32, 3]), "is [32.5, 32, 3]"),
    ],
)
def test_malformed_checkpoint_is_one_line(tiny_run, tmp_path, capsys, label, change, expected):
    path = _tampered(tmp_path, f"{label}.pt", change)
    name = f"eval_{label}"
    _refused(
        capsys, _evaluate(tiny_run, path, name), f"{path}: not a puma_ray checkpoint", expected
    )
    assert not os.path.exists(os.path.join(tiny_run, name))


# ----------------------------------------------------------------------------------------------
# 9. Fortran-ordered npz images read as np.load reads them.


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("n", [1, 7])
def test_fortran_ordered_npz_reads_like_np_load(tmp_path, n, compressed):
    path = tmp_path / "fortran.npz"
    _npz(path, n, shape=(5, 4, 3), compressed=compressed, fortran=True)
    with np.load(path) as f:
        assert f["image"].flags.f_contiguous and not f["image"].flags.c_contiguous
        want_images, want_labels = f["image"], f["label"]
    chunks = list(NpzArrays(str(path)).iter_chunks(3))
    images = np.concatenate([im for im, _ in chunks])
    assert images.flags.c_contiguous
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(np.concatenate([lb for _, lb in chunks]), want_labels)
    limited = np.concatenate([im for im, _ in NpzArrays(str(path), limit=2).iter_chunks(1)])
    np.testing.assert_array_equal(limited, want_images[:2])


def test_fortran_ordered_npz_ingests_like_np_load(tmp_path):
    path = tmp_path / "one.npz"
    _npz(path, 1, fortran=True)
    run_dir = str(tmp_path / "run")
    cfg = load_config(_npz_config(tmp_path, path))
    run_ingest(cfg, run_dir, parallel=False, log=lambda _m: None)
    batch = next(open_dataset(dataset_dirs(run_dir)[0]).iter_batches(batch_size=10))
    with np.load(path) as f:
        np.testing.assert_array_equal(batch.images, f["image"])


def test_large_fortran_ordered_npz_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    _npz(path, 7, fortran=True)
    monkeypatch.setattr(npz_module, "FORTRAN_MAX_BYTES", 10_000)  # the images are 21 kB
    with pytest.raises(DataError) as e:
        NpzArrays(str(path))
    assert str(e.value).startswith(f"{path}: 'image' is Fortran-ordered")
    assert len(str(e.value).splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 10. model.arch is checked at config load.


@pytest.mark.parametrize("key", ["model.arch", "margin_model.model.arch"])
def test_unknown_arch_is_refused_at_config_load(capsys, key):
    _refused(
        capsys,
        ["config", "--set", f"{key}=resnet9000"],
        f"{key}: unknown model 'resnet9000' (known: preact_resnet18, small_cnn, wide_resnet",
    )


def test_config_model_names_equal_the_registry():
    from puma_ray.config import MODEL_NAMES
    from puma_ray.models import registry

    ours = {n for n, f in registry._MODELS.items() if f.__module__.startswith("puma_ray.")}
    assert set(MODEL_NAMES) == ours
    for name in MODEL_NAMES:
        assert load_config(None, [f"model.arch={name}"]).model.arch == name


def test_config_import_stays_free_of_torch():
    code = "import sys, puma_ray.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_user_registered_model_is_accepted():
    from puma_ray.models import registry

    @registry.register_model("zz_test_model")
    def _factory(num_classes, *, width: int = 4):  # pragma: no cover - never built
        raise AssertionError

    try:
        assert load_config(None, ["model.arch=zz_test_model"]).model.arch == "zz_test_model"
    finally:
        del registry._MODELS["zz_test_model"]


# ----------------------------------------------------------------------------------------------
# 11. npz sources can be the test split; no test rows at all is refused at ingest.


def test_npz_train_and_test_sources(tmp_path, capsys):
    train_path, test_path = tmp_path / "train.npz", tmp_path / "test.npz"
    _npz(train_path, 50, seed=1, shape=(8, 8, 3))
    _npz(test_path, 30, seed=2, shape=(8, 8, 3), compressed=True)
    sources = [
        {"type": "npz", "path": str(train_path), "source": "real"},
        {"type": "npz", "path": str(test_path), "source": "real", "split": "test"},
    ]
    cfg = _write_config(tmp_path / "cfg.yaml", sources, rows_per_shard=20, validation=0)
    run_dir = tmp_path / "run"
    code = main(["ingest", cfg, "--no-parallel", "--run-dir", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    train_uri, test_uri = dataset_dirs(str(run_dir))
    for uri, path, first_id in ((train_uri, train_path, 0), (test_uri, test_path, 2**40 + 2**39)):
        ds = open_dataset(uri)
        batches = list(ds.iter_batches(batch_size=1000))
        assert len(batches) == 1
        b = batches[0]
        with np.load(path) as f:
            np.testing.assert_array_equal(b.images, f["image"])
            np.testing.assert_array_equal(b.labels, f["label"])
        np.testing.assert_array_equal(b.ids, first_id + np.arange(len(b.labels)))
        assert not b.is_synthetic.any()
    assert open_dataset(test_uri).info.num_rows == 30


def test_npz_without_a_test_source_is_refused(tmp_path, capsys):
    path = tmp_path / "train.npz"
    _npz(path, 20)
    cfg = _write_config(tmp_path / "cfg.yaml", [{"type": "npz", "path": str(path)}])
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        ["ingest", cfg, "--no-parallel", "--run-dir", str(run_dir)],
        "data.sources: no test rows",
        "split: test",
    )
    assert _written(run_dir) == []
