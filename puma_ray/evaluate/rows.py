"""The rows an evaluation reads: the first `evaluation.subset` rows of the test or validation
split, in shard order, as tensors. Test and validation splits are small (10k rows for CIFAR),
so a chunk task reads the prefix it needs and slices it."""

from __future__ import annotations

import numpy as np
import torch

from puma_ray.data import open_dataset
from puma_ray.errors import DataError

SPLITS = ("test", "val")


def split_rows(uri: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Rows [start, stop) of a shard set as (x float [N, C, H, W] in [0, 1], y int64 [N],
    ids int64 [N])."""
    ds = open_dataset(uri)
    stop = min(stop, ds.num_rows)
    xs, ys, ids, have = [], [], [], 0
    for b in ds.iter_batches(batch_size=min(4096, max(1, stop)), columns=["id", "image", "label"]):
        xs.append(b.images)
        ys.append(b.labels)
        ids.append(b.ids)
        have += len(b)
        if have >= stop:
            break
    if have == 0:
        raise DataError(f"{uri}: the split is empty")
    images = np.concatenate(xs)[start:stop]
    labels = np.concatenate(ys)[start:stop].astype(np.int64)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(labels), np.concatenate(ids)[start:stop]


def load_split_rows(uri: str, subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `subset` rows of a shard set (all when None) as (x, y), as `split_rows`."""
    n = open_dataset(uri).num_rows
    x, y, _ = split_rows(uri, 0, n if subset is None else min(subset, n))
    return x, y


def rows_evaluated(uri: str, subset: int | None) -> int:
    n = open_dataset(uri).num_rows
    return n if subset is None else min(subset, n)
