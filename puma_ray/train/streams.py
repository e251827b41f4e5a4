"""The training data streams of one worker: which shard files feed each stream of an
`EpochPlan` (`stream_files`), the reshuffled passes over a stream (`_passes`), their re-cut into
batches of exactly n rows for mixed batches (`_exact`), and a pyarrow batch as tensors
(`_batch_tensors`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from puma_ray.data import SOURCES, decode_images
from puma_ray.train.plan import TrainingError


def _batch_tensors(batch, image_shape, has_eps: bool, uniform_eps: float):
    """pyarrow batch -> (ids int64 [n], x float [n,C,H,W] in [0,1], y int64 [n], eps [n])."""
    images = decode_images(batch["image"], image_shape)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(batch["label"].to_numpy().astype(np.int64))
    ids = batch["id"].to_numpy().astype(np.int64)
    if has_eps:
        eps = torch.from_numpy(batch["eps"].to_numpy().astype(np.float32))
    else:
        eps = torch.full((len(y),), float(uniform_eps), dtype=torch.float32)
    return ids, x.contiguous(), y, eps


def _passes(data, batch_size: int, seed: int, first_pass: int, *, endless: bool, name: str):
    """pyarrow batches of one stream, reshuffled every pass (local shuffle buffer of 4 batches,
    at least 256 rows); each pass ends with a smaller batch. An endless stream starts its next
    pass when one ends, so a small real set recurs within an epoch of a large synthetic one."""
    p = first_pass
    while True:
        rows = 0
        for batch in data.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=False,
            local_shuffle_buffer_size=min(max(batch_size * 4, 256), 10_000),
            local_shuffle_seed=seed + p * 31,
        ):
            rows += len(batch)
            yield batch
        if not endless:
            return
        if rows == 0:
            raise TrainingError(f"the {name} stream gave this worker no rows")
        p += 1


def _exact(batches, n: int):
    """Re-cut a stream of tables into tables of exactly n rows (a pass's short last batch is
    topped up from the next pass), so a mixed batch keeps its real:synthetic ratio."""
    buf: list[pa.Table] = []
    have = 0
    for table in batches:
        buf.append(table)
        have += len(table)
        while have >= n:
            joined = buf[0] if len(buf) == 1 else pa.concat_tables(buf)
            yield joined.slice(0, n)
            rest = joined.slice(n)
            buf, have = ([rest] if len(rest) else []), len(rest)


def stream_files(
    files: list[str], file_sources: list[dict | None], streams
) -> dict[str, tuple[list[str], bool]]:
    """Which shard files feed each stream of an `EpochPlan`: {stream: (files, filter_rows)}.
    A file goes to the real / synthetic stream when it holds rows of that source (by its
    per-source counts); `filter_rows` is set when some file also holds the other source, or
    its counts are unknown (None), so rows must be filtered by the `source` column."""
    out = {}
    for stream in streams:
        if stream not in SOURCES:
            out[stream] = (list(files), False)
            continue
        chosen, mixed = [], False
        for f, counts in zip(files, file_sources, strict=True):
            if counts is None:
                chosen.append(f)
                mixed = True
            elif counts.get(stream, 0) > 0:
                chosen.append(f)
                mixed |= sum(counts.values()) > counts[stream]
        out[stream] = (chosen, mixed)
    return out
