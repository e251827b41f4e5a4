"""Data layer: sample sources (builtin, npz, torchvision) and Parquet sample shards.

Pure data code: no Ray, no MLflow (the ingest stage in `puma_ray.ingest` adds those).
See docs/data.md for the shard format and the id scheme.
"""

from puma_ray.data.shards import (
    SOURCES,
    Batch,
    DatasetInfo,
    DatasetWriter,
    ShardInfo,
    ShardSet,
    ShardWriter,
    dataset_dirs,
    decode_images,
    finalize,
    open_dataset,
    read_info,
    split_dir,
    validation_dir,
    write_shard,
)

__all__ = [
    "SOURCES",
    "Batch",
    "DatasetInfo",
    "DatasetWriter",
    "ShardInfo",
    "ShardSet",
    "ShardWriter",
    "dataset_dirs",
    "decode_images",
    "split_dir",
    "validation_dir",
    "finalize",
    "open_dataset",
    "read_info",
    "write_shard",
]
