"""The builtin dataset: a pure function of (seed, part, row index), whatever the chunking or
sharding; seeds and parts differ; the synthetic part's flaws come at the configured rates."""

import numpy as np
import pytest

from puma_ray.config import BuiltinSource
from puma_ray.data import builtin


def _src(**kw):
    return BuiltinSource(**kw)


def test_same_rows_same_bytes_however_split():
    src = _src(seed=3)
    for part in builtin.PARTS:
        index = np.arange(1500)
        images, labels = builtin.generate(src, part, index)
        assert images.shape == (1500, 32, 32, 3) and images.dtype == np.uint8
        # Contiguous pieces of uneven sizes, crossing the generator's internal chunk size.
        cuts = [0, 1, 300, 511, 512, 1100, 1500]
        pieces = [
            builtin.generate(src, part, index[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)
        ]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), images)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), labels)
        # Any order and any subset: row i is always the same row.
        perm = np.random.default_rng(0).permutation(1500)[:700]
        im_p, lb_p = builtin.generate(src, part, perm)
        np.testing.assert_array_equal(im_p, images[perm])
        np.testing.assert_array_equal(lb_p, labels[perm])


def test_far_rows_are_independent_of_size():
    """Row 10**9 can be generated alone: no state carried from row 0."""
    src = _src(seed=1)
    far = np.array([10**9, 10**9 + 1, 5])
    images, labels = builtin.generate(src, "synthetic", far)
    again, _ = builtin.generate(src, "synthetic", far[::-1])
    np.testing.assert_array_equal(images, again[::-1])
    alone, _ = builtin.generate(src, "synthetic", far[2:])
    np.testing.assert_array_equal(alone[0], images[2])


def test_seeds_and_parts_differ():
    index = np.arange(200)
    a, la = builtin.generate(_src(seed=0), "train", index)
    b, lb = builtin.generate(_src(seed=1), "train", index)
    assert (a != b).reshape(200, -1).any(1).all()  # every row differs
    assert (la != lb).mean() > 0.5
    t, _ = builtin.generate(_src(seed=0), "test", index)
    assert (a != t).reshape(200, -1).any(1).all()
    # Within one part, no two rows are the same image.
    assert len({row.tobytes() for row in a}) == 200


def test_settings_change_the_bytes():
    index = np.arange(50)
    base, _ = builtin.generate(_src(), "train", index)
    noisy, _ = builtin.generate(_src(noise=0.3), "train", index)
    clean, _ = builtin.generate(_src(noise=0.0), "train", index)
    assert not np.array_equal(base, noisy) and not np.array_equal(base, clean)
    # Noise is zero-mean: removing it moves pixels by about noise * 255 on average.
    diff = base.astype(np.float64) - clean
    assert abs(diff.mean()) < 2 and 0.08 * 255 < diff.std() < 0.16 * 255


def test_labels_in_range_and_balanced():
    src = _src()
    for part in builtin.PARTS:
        _, labels = builtin.generate(src, part, np.arange(5000))
        assert labels.min() >= 0 and labels.max() < builtin.NUM_CLASSES
        counts = np.bincount(labels, minlength=builtin.NUM_CLASSES)
        assert counts.min() > 400 and counts.max() < 600  # ~500 each


def test_pixel_values_use_the_range():
    images, _ = builtin.generate(_src(), "train", np.arange(500))
    assert images.min() < 20 and images.max() > 235
    assert 90 < images.mean() < 165


def test_synthetic_flags_follow_the_configured_fractions():
    src = _src(ambiguous_fraction=0.2, mislabeled_fraction=0.1, seed=5)
    n = 20000
    index = np.arange(n)
    flags = builtin.synthetic_flags(src, "synthetic", index)
    assert abs(flags.ambiguous.mean() - 0.2) < 0.015
    assert abs(flags.mislabeled.mean() - 0.1) < 0.01
    assert (flags.label != flags.true_label).sum() == flags.mislabeled.sum()
    assert (flags.second_label[flags.ambiguous] != flags.true_label[flags.ambiguous]).all()
    assert (flags.second_label[~flags.ambiguous] == flags.true_label[~flags.ambiguous]).all()
    for a in (flags.label, flags.true_label, flags.second_label):
        assert a.min() >= 0 and a.max() < builtin.NUM_CLASSES
    # The stored labels are exactly what generate() returns.
    _, labels = builtin.generate(src, "synthetic", index[:1000])
    np.testing.assert_array_equal(labels, flags.label[:1000])
    # Real parts are clean.
    real = builtin.synthetic_flags(src, "train", index)
    assert not real.ambiguous.any() and not real.mislabeled.any()
    assert (real.label == real.true_label).all()


def test_zero_fractions_make_synthetic_clean():
    src = _src(ambiguous_fraction=0.0, mislabeled_fraction=0.0)
    flags = builtin.synthetic_flags(src, "synthetic", np.arange(3000))
    assert not flags.ambiguous.any() and not flags.mislabeled.any()


def test_ambiguous_rows_blend_two_classes():
    """Ambiguous rows differ from the clean rendering of the same row; others do not."""
    index = np.arange(400)
    amb = _src(ambiguous_fraction=0.5, mislabeled_fraction=0.0, noise=0.0)
    clean = _src(ambiguous_fraction=0.0, mislabeled_fraction=0.0, noise=0.0)
    a, _ = builtin.generate(amb, "synthetic", index)
    c, _ = builtin.generate(clean, "synthetic", index)
    flags = builtin.synthetic_flags(amb, "synthetic", index)
    changed = (a != c).reshape(400, -1).any(1)
    np.testing.assert_array_equal(changed, flags.ambiguous)


def test_ids_have_one_block_per_part():
    index = np.arange(3)
    assert builtin.ids(0, "train", index).tolist() == [0, 1, 2]
    assert builtin.ids(0, "synthetic", index)[0] == 2**38
    assert builtin.ids(2**40, "test", index)[0] == 2**40 + 2**39
    with pytest.raises(ValueError, match="row index"):
        builtin.ids(0, "train", np.array([-1]))
    with pytest.raises(ValueError, match="part"):
        builtin.generate(_src(), "valid", index)
