"""The validation split: which real training rows are held out for training-time decisions.

Per-epoch checks, ASHA and `sweep.metric` read the validation split; the test split is read
only by the final evaluation, so a sweep's "best" is not chosen on the rows it is reported on.
Rows are drawn per class, so every class is represented in proportion: in each class, the rows
with the smallest hash(seed, id) (ties, impossible for distinct ids, broken by id). A row's
fate depends on its id, its class and the class's size only, never on shard layout or read
order, so re-ingesting the same sources holds out the same rows. Pure NumPy.
"""

from __future__ import annotations

import numpy as np

from puma_ray.selection import hash_ids, round_half_up

VALIDATION_SALT = 0x56414C4944  # "VALID": independent of the pruning and extrapolation hashes


def per_class_counts(class_rows: np.ndarray, validation: int | float) -> np.ndarray:
    """int64[K]: validation rows per class for a class-size vector `class_rows`.

    A float in (0, 1) is a fraction of each class (round half up, as pruning counts); an int is
    a total, split across classes in proportion to their sizes by the largest-remainder rule
    (ties to the lower class index), so the counts sum exactly to it. 0 gives none."""
    class_rows = np.asarray(class_rows, np.int64)
    total = int(class_rows.sum())
    if isinstance(validation, float):
        if not 0 < validation < 1:
            raise ValueError(f"a validation fraction must be in (0, 1), got {validation}")
        return np.array([round_half_up(validation, int(n)) for n in class_rows], np.int64)
    count = int(validation)
    if count < 0:
        raise ValueError(f"a validation count must be >= 0, got {count}")
    if count > total:
        raise ValueError(f"{count} validation rows asked for, but only {total} real rows exist")
    if count == 0 or total == 0:
        return np.zeros(len(class_rows), np.int64)
    share = class_rows * count
    base = share // total
    remainder = share - base * total
    short = count - int(base.sum())
    order = np.lexsort((np.arange(len(class_rows)), -remainder))  # largest remainder first
    base[order[:short]] += 1
    return base


def validation_mask(
    ids: np.ndarray, labels: np.ndarray, validation: int | float, seed: int
) -> np.ndarray:
    """bool[n]: the rows (ids, labels of every eligible row, any order) held out for validation.

    Per class c, the `per_class_counts(...)[c]` rows with the smallest hash(seed, id)."""
    ids = np.asarray(ids, np.int64)
    labels = np.asarray(labels, np.int64)
    mask = np.zeros(len(ids), bool)
    if len(ids) == 0:
        return mask
    num_classes = int(labels.max()) + 1
    counts = per_class_counts(np.bincount(labels, minlength=num_classes), validation)
    h = hash_ids(ids, seed, VALIDATION_SALT)
    order = np.lexsort((ids, h, labels))  # by class, then hash, then id
    starts = np.searchsorted(labels[order], np.arange(num_classes))
    for c in range(num_classes):
        mask[order[starts[c] : starts[c] + counts[c]]] = True
    return mask
