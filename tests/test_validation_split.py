"""The validation split: carved per class from the real training rows by hash(seed, id), written
as data/val, disjoint from data/train, the same rows whatever the sharding; an npz file can be
the validation split instead; bad settings are one-line errors."""

import os

import numpy as np
import pytest

from puma_ray.config import load_config
from puma_ray.data import builtin, open_dataset, validation_dir
from puma_ray.data.validation import per_class_counts, validation_mask
from puma_ray.errors import ConfigError, DataError
from puma_ray.ingest import run_ingest
from puma_ray.selection import hash_ids

SOURCES = "data.sources=[{type: builtin, real_train: 600, synthetic: 400, real_test: 100}]"


def _quiet(_msg):
    pass


def _cfg(*sets):
    return load_config(None, [SOURCES, "data.rows_per_shard=250", *sets])


def _rows(uri):
    ids, labels, synth = [], [], []
    for b in open_dataset(uri).iter_batches(batch_size=4096, columns=["id", "label", "source"]):
        ids.append(b.ids)
        labels.append(b.labels)
        synth.append(b.is_synthetic)
    return tuple(np.concatenate(a) for a in (ids, labels, synth))


# ------------------------------------------------------------------------------------------------
# The rule, against a plain reference.


def test_fraction_and_count_per_class():
    np.testing.assert_array_equal(per_class_counts([10, 15, 0], 0.1), [1, 2, 0])  # 1.5 -> 2
    counts = per_class_counts([50, 30, 20], 7)
    assert counts.sum() == 7
    np.testing.assert_array_equal(counts, [4, 2, 1])  # 3.5, 2.1, 1.4: the largest remainder
    np.testing.assert_array_equal(per_class_counts([5, 5], 0), [0, 0])
    with pytest.raises(ValueError, match="only 10 real rows"):
        per_class_counts([5, 5], 11)


def test_mask_is_the_smallest_hashes_of_each_class():
    rng = np.random.default_rng(0)
    ids = rng.permutation(10_000)[:3000].astype(np.int64) * 7 + 3
    labels = rng.integers(0, 5, len(ids))
    mask = validation_mask(ids, labels, 0.1, seed=4)
    h = hash_ids(ids, 4, 0x56414C4944)
    for c in range(5):
        rows = np.flatnonzero(labels == c)
        want = rows[np.argsort(h[rows])[: int(np.floor(0.1 * len(rows) + 0.5))]]
        assert set(np.flatnonzero(mask & (labels == c))) == set(want)
    # a row's fate depends on (seed, id, its class), not on the order rows come in
    perm = rng.permutation(len(ids))
    np.testing.assert_array_equal(validation_mask(ids[perm], labels[perm], 0.1, 4), mask[perm])
    assert not np.array_equal(validation_mask(ids, labels, 0.1, 5), mask)


# ------------------------------------------------------------------------------------------------
# Through ingest.


def test_ingest_carves_val_from_real_train_rows(tmp_path):
    run_dir = str(tmp_path)
    summary = run_ingest(_cfg("data.validation=0.1"), run_dir, parallel=False, log=_quiet)
    assert list(summary.splits) == ["train", "val", "test"]
    train_ids, _, train_synth = _rows(os.path.join(run_dir, "data", "train"))
    val_uri = validation_dir(run_dir)
    assert val_uri is not None
    val_ids, val_labels, val_synth = _rows(val_uri)
    assert not val_synth.any()  # only real rows are held out
    assert len(np.intersect1d(train_ids, val_ids)) == 0
    # every real row is in exactly one of the two; synthetic rows all stay in train
    index = np.arange(600)
    real_ids = builtin.ids(0, "train", index)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_ids[~train_synth], val_ids])), real_ids
    )
    assert train_synth.sum() == 400
    # the per-class rule on the real rows' labels
    labels = builtin.synthetic_flags(
        load_config(None, [SOURCES]).data.sources[0], "train", index
    ).label
    want = real_ids[validation_mask(real_ids, labels, 0.1, 0)]
    np.testing.assert_array_equal(np.sort(val_ids), np.sort(want))
    assert len(val_ids) == per_class_counts(np.bincount(labels, minlength=10), 0.1).sum()
    # the val rows are the builtin rows themselves (same bytes as if they had stayed in train)
    val = next(open_dataset(val_uri).iter_batches(batch_size=4096))
    order = np.argsort(val.ids)
    images, want_labels = builtin.generate(
        load_config(None, [SOURCES]).data.sources[0], "train", np.sort(val.ids)
    )
    np.testing.assert_array_equal(val.images[order], images)
    np.testing.assert_array_equal(val.labels[order], want_labels)
    assert np.array_equal(val_labels[order], want_labels)


def test_val_rows_do_not_depend_on_sharding(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_ingest(_cfg("data.validation=37"), a, parallel=False, log=_quiet)
    run_ingest(_cfg("data.validation=37", "data.rows_per_shard=97"), b, parallel=False, log=_quiet)
    ids_a = np.sort(_rows(validation_dir(a))[0])
    np.testing.assert_array_equal(ids_a, np.sort(_rows(validation_dir(b))[0]))
    assert len(ids_a) == 37


def test_validation_zero_writes_no_val_split_and_removes_an_old_one(tmp_path):
    run_dir = str(tmp_path)
    run_ingest(_cfg("data.validation=0.2"), run_dir, parallel=False, log=_quiet)
    assert validation_dir(run_dir) is not None
    summary = run_ingest(_cfg("data.validation=0"), run_dir, parallel=False, log=_quiet)
    assert list(summary.splits) == ["train", "test"]
    assert validation_dir(run_dir) is None
    assert not os.path.exists(os.path.join(run_dir, "data", "val"))
    assert open_dataset(os.path.join(run_dir, "data", "train")).num_rows == 1000


def test_npz_val_split(tmp_path):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "val.npz")
    np.savez(
        path,
        image=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        label=rng.integers(0, 10, 30),
    )
    cfg = _cfg(
        "data.validation=0",
        "data.sources=[{type: builtin, real_train: 100, synthetic: 0, real_test: 50}, "
        f"{{type: npz, path: '{path}', split: val, source: real}}]",
    )
    summary = run_ingest(cfg, str(tmp_path / "run"), parallel=False, log=_quiet)
    assert summary.splits["val"].rows == 30
    assert summary.splits["train"].rows == 100


def test_bad_validation_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.validation"):
        _cfg("data.validation=1.5")
    with pytest.raises(ConfigError, match="data.validation"):
        _cfg("data.validation=true")
    with pytest.raises(ConfigError, match="split: val"):
        load_config(
            None,
            [
                "data.validation=0.1",
                "data.sources=[{type: builtin}, {type: npz, path: x.npz, split: val}]",
            ],
        )
    with pytest.raises(DataError, match="only 600 real rows"):
        run_ingest(_cfg("data.validation=601"), str(tmp_path / "a"), parallel=False, log=_quiet)
    assert not os.path.exists(tmp_path / "a" / "data" / "train" / "dataset.json")


def test_data_without_real_rows_holds_out_synthetic_rows(tmp_path):
    synthetic_only = "data.sources=[{type: builtin, real_train: 0, synthetic: 100, real_test: 10}]"
    run_dir = str(tmp_path)
    summary = run_ingest(
        _cfg(synthetic_only, "data.validation=0.1"), run_dir, parallel=False, log=_quiet
    )
    assert summary.splits["val"].rows == 10
    assert summary.splits["val"].rows_per_source["synthetic"] == 10
    assert summary.splits["train"].rows == 90
    assert not os.path.exists(tmp_path / "a" / "data" / "train" / "dataset.json")
