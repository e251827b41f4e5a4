"""Sample shards: zstd Parquet files of (id, image, label, source) plus a `dataset.json` manifest.

A shard set is one directory (local path or any pyarrow-filesystem URI):

    part-00000.parquet, part-00001.parquet, ...   written under a hidden temp name, then renamed
    dataset.json                                  written last; without it the set is incomplete

Shards are written independently (one per Ray task, or rolled over by `DatasetWriter`), each
returning a `ShardInfo` with its own content fingerprint; `finalize` turns those into the
manifest. Reading streams row group by row group (`ParquetFile.iter_batches`), so memory does
not grow with the number of rows.

Images are stored as `fixed_size_binary(H*W*C)` of raw uint8 HWC bytes: no codec to decode, no
per-row length to check, and a column that slices straight into a numpy array.

Length: one module on purpose: it is the on-disk format, writer and reader side by side, so
the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puma_ray import storage
from puma_ray.errors import DataError

FORMAT = "puma_ray.samples/1"
MANIFEST = "dataset.json"
COLUMNS = ("id", "image", "label", "source")
SOURCES = ("real", "synthetic")
ROW_GROUP_BYTES = 16 * 2**20  # image bytes per row group: the unit a streaming reader holds


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def dataset_dirs(run_dir: str) -> tuple[str, str]:
    """(train_uri, test_uri) of the sample shard sets inside a run directory."""
    return storage.join(run_dir, "data", "train"), storage.join(run_dir, "data", "test")


def validation_dir(run_dir: str) -> str | None:
    """The validation split's shard set (`data/val`) if ingest wrote one, else None."""
    uri = storage.join(run_dir, "data", "val")
    return uri if storage.exists(storage.join(uri, MANIFEST)) else None


def split_dir(run_dir: str, split: str) -> str | None:
    """The shard set of `split` ('train', 'val' or 'test'); None for a val split not written."""
    if split == "val":
        return validation_dir(run_dir)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}")
    return storage.join(run_dir, "data", split)


def schema(image_shape: Sequence[int]) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.binary(int(np.prod(image_shape)))),
            ("label", pa.int16()),
            ("source", pa.string()),
        ],
        metadata={"image_shape": json.dumps([int(s) for s in image_shape])},
    )


def row_group_rows(image_shape: Sequence[int]) -> int:
    """Rows per Parquet row group: ~16 MiB of images, so readers stream in small steps."""
    return max(256, ROW_GROUP_BYTES // int(np.prod(image_shape)))


# ----------------------------------------------------------------------------------------------
# Manifest dataclasses.


@dataclass
class ShardInfo:
    """One written shard. `fingerprint` hashes its ids, labels, sources and image bytes."""

    file: str  # name relative to the shard-set directory
    rows: int
    bytes: int
    fingerprint: str
    id_min: int
    id_max: int
    rows_per_source: dict[str, int]
    rows_per_class: list[int]  # index = label; may be shorter than num_classes


@dataclass
class DatasetInfo:
    """The content of `dataset.json`."""

    name: str
    split: str  # train | test
    image_shape: list[int]  # [H, W, C]
    num_classes: int
    class_names: list[str]
    num_rows: int
    rows_per_source: dict[str, int]
    rows_per_class: list[int]
    shards: list[ShardInfo]
    fingerprint: str  # content: stable across re-ingest of the same config
    config_fingerprint: str  # the data config that produced it (ingest skips when it matches)
    sources: list[dict] = field(default_factory=list)  # what each configured source contributed
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "") -> DatasetInfo:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise DataError(f"{where}: unknown format {raw.get('format')!r} (want {FORMAT})")
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{where}: unreadable dataset manifest ({e})") from None


# ----------------------------------------------------------------------------------------------
# Writing.


class _Fingerprint:
    """Per-column hashes, so the result does not depend on how rows were split into writes."""

    def __init__(self):
        self._h = [hashlib.sha256() for _ in range(4)]

    def update(self, ids, images, labels, is_synthetic) -> None:
        arrays = (ids.astype("<i8"), images, labels.astype("<i2"), is_synthetic)
        for h, a in zip(self._h, arrays, strict=True):
            h.update(np.ascontiguousarray(a).data)

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(h.digest() for h in self._h)).hexdigest()[:32]


def _is_synthetic(sources, n: int) -> np.ndarray:
    if isinstance(sources, str):
        if sources not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES} (got {sources!r})")
        return np.full(n, sources == "synthetic")
    return np.asarray(sources, dtype=bool)


class ShardWriter:
    """Writes one shard file incrementally, in row groups, under a hidden temp name; `close()`
    renames it into place and returns its `ShardInfo`. Memory: one row group of images."""

    def __init__(self, dir_uri: str, index: int, image_shape: Sequence[int]):
        self.name = shard_name(index)
        self.uri = storage.join(dir_uri, self.name)
        self.image_shape = tuple(int(s) for s in image_shape)
        self._nbytes = int(np.prod(self.image_shape))
        self._schema = schema(self.image_shape)
        self._group = row_group_rows(self.image_shape)
        self._fs, self._path = storage.resolve(self.uri)
        parent, base = self._path.rsplit("/", 1)
        self._fs.create_dir(parent, recursive=True)
        # Leading dot: pyarrow.dataset and Ray Data directory readers skip hidden files.
        self._tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        self._sink = self._fs.open_output_stream(self._tmp)
        self._writer = pq.ParquetWriter(
            self._sink,
            self._schema,
            compression="zstd",
            use_dictionary=["source"],
            write_statistics=["id", "label"],
            write_page_checksum=True,
        )
        self._buffer: tuple[np.ndarray, ...] | None = None  # one row group being filled
        self._filled = 0
        self._fp = _Fingerprint()
        self.rows = 0
        self._id_min, self._id_max = None, None
        self._per_source = {s: 0 for s in SOURCES}
        self._per_class = np.zeros(0, np.int64)

    def write(self, ids, images, labels, sources) -> None:
        """Append rows. `images` uint8 [n, H, W, C]; `sources` 'real'|'synthetic' or bool[n]."""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        if n == 0:
            return
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape != (n, *self.image_shape):
            raise ValueError(f"images have shape {images.shape}, want {(n, *self.image_shape)}")
        labels = np.asarray(labels)
        synth = _is_synthetic(sources, n)
        if labels.shape != (n,) or synth.shape != (n,):
            raise ValueError("ids, labels and sources must have the same length")
        if n and (labels.min() < 0 or labels.max() > np.iinfo(np.int16).max):
            raise ValueError("labels must be in [0, 32767]")
        self._fp.update(ids, images, labels, synth)
        self._append((ids, images.reshape(n, -1), labels.astype(np.int16), synth))
        self.rows += n
        lo, hi = int(ids.min()), int(ids.max())
        self._id_min = lo if self._id_min is None else min(lo, self._id_min)
        self._id_max = hi if self._id_max is None else max(hi, self._id_max)
        k = int(synth.sum())
        self._per_source["synthetic"] += k
        self._per_source["real"] += n - k
        counts = np.bincount(labels.astype(np.int64))
        if len(counts) > len(self._per_class):
            counts[: len(self._per_class)] += self._per_class
            self._per_class = counts
        else:
            self._per_class[: len(counts)] += counts

    def _append(self, columns: tuple[np.ndarray, ...]) -> None:
        """Copy rows into the row-group buffer, writing each full group. Memory is one group
        whatever the callers' write sizes; whole groups at a group boundary are written
        straight from the caller's arrays, without a copy."""
        n, start, group = len(columns[0]), 0, self._group
        while start < n:
            if self._filled == 0 and n - start >= group:
                self._write_group(*(c[start : start + group] for c in columns))
                start += group
                continue
            if self._buffer is None:
                self._buffer = tuple(np.empty((group, *c.shape[1:]), c.dtype) for c in columns)
            take = min(n - start, group - self._filled)
            for buf, c in zip(self._buffer, columns, strict=True):
                buf[self._filled : self._filled + take] = c[start : start + take]
            self._filled += take
            start += take
            if self._filled == group:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as one row group and drop the buffer."""
        if self._filled:
            self._write_group(*(b[: self._filled] for b in self._buffer))
        self._buffer, self._filled = None, 0

    def _write_group(self, ids, flat, labels, synth) -> None:
        image_col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self._nbytes), len(ids), [None, pa.py_buffer(flat)]
        )
        source_col = pa.DictionaryArray.from_arrays(
            pa.array(synth.astype(np.int8)), pa.array(SOURCES)
        ).cast(pa.string())
        table = pa.Table.from_arrays(
            [pa.array(ids), image_col, pa.array(labels), source_col], schema=self._schema
        )
        self._writer.write_table(table, row_group_size=len(ids))

    def close(self) -> ShardInfo:
        """Flush, close, rename into place; return the shard's info."""
        try:
            self._flush()
            self._writer.close()
            self._sink.close()
            size = self._fs.get_file_info(self._tmp).size
            self._fs.move(self._tmp, self._path)
        except BaseException:
            self.abort()
            raise
        return ShardInfo(
            file=self.name,
            rows=self.rows,
            bytes=int(size),
            fingerprint=self._fp.hexdigest(),
            id_min=-1 if self._id_min is None else self._id_min,
            id_max=-1 if self._id_max is None else self._id_max,
            rows_per_source=dict(self._per_source),
            rows_per_class=self._per_class.tolist(),
        )

    def abort(self) -> None:
        """Drop the temp file (after an error); the final name was never written."""
        for closer in (self._writer.close, self._sink.close):
            try:
                closer()
            except Exception:
                pass
        if self._fs.get_file_info(self._tmp).type != pafs.FileType.NotFound:
            self._fs.delete_file(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(dir_uri: str, index: int, image_shape, chunks) -> ShardInfo:
    """Write shard `index` from an iterable of (ids, images, labels, sources) chunks."""
    with ShardWriter(dir_uri, index, image_shape) as w:
        for ids, images, labels, sources in chunks:
            w.write(ids, images, labels, sources)
        return w.close()


class DatasetWriter:
    """Sequential writer for a stream of rows: rolls over to a new shard every `rows_per_shard`
    rows, numbering shards from `first_index`. `close()` returns the infos for `finalize`."""

    def __init__(self, dir_uri: str, image_shape, rows_per_shard: int, first_index: int = 0):
        self.dir_uri = dir_uri
        self.image_shape = tuple(image_shape)
        self.rows_per_shard = int(rows_per_shard)
        self._next = first_index
        self._current: ShardWriter | None = None
        self.shards: list[ShardInfo] = []

    def write(self, ids, images, labels, sources) -> list[ShardInfo]:
        """Append rows; returns the infos of shards completed by this call (for progress)."""
        ids = np.asarray(ids)
        synth = _is_synthetic(sources, len(ids))
        done, start = [], 0
        while start < len(ids):
            if self._current is None:
                self._current = ShardWriter(self.dir_uri, self._next, self.image_shape)
                self._next += 1
            room = self.rows_per_shard - self._current.rows
            stop = min(len(ids), start + room)
            sl = slice(start, stop)
            self._current.write(ids[sl], images[sl], np.asarray(labels)[sl], synth[sl])
            start = stop
            if self._current.rows >= self.rows_per_shard:
                done.append(self._current.close())
                self._current = None
        self.shards += done
        return done

    def close(self) -> list[ShardInfo]:
        if self._current is not None and self._current.rows:
            self.shards.append(self._current.close())
        elif self._current is not None:
            self._current.abort()
        self._current = None
        return self.shards

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


def finalize(
    dir_uri: str,
    shards: Sequence[ShardInfo],
    *,
    name: str,
    split: str,
    image_shape: Sequence[int],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    config_fingerprint: str = "",
    sources: list[dict] | None = None,
) -> DatasetInfo:
    """Write `dataset.json` for `shards` (in shard order), atomically and last; return it.

    Shards may come from independent parallel tasks; they are ordered by file name here.
    """
    shards = sorted(shards, key=lambda s: s.file)
    names = [s.file for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate shard files: {names}")
    per_class = np.zeros(num_classes, np.int64)
    per_source = {s: 0 for s in SOURCES}
    for s in shards:
        if len(s.rows_per_class) > num_classes:
            raise DataError(
                f"{storage.join(dir_uri, s.file)}: labels up to {len(s.rows_per_class) - 1} "
                f"but num_classes is {num_classes}"
            )
        per_class[: len(s.rows_per_class)] += s.rows_per_class
        for k, v in s.rows_per_source.items():
            per_source[k] += v
    digest = hashlib.sha256()
    digest.update(json.dumps([list(image_shape), num_classes]).encode())
    for s in shards:
        digest.update(s.fingerprint.encode())
    info = DatasetInfo(
        name=name,
        split=split,
        image_shape=[int(x) for x in image_shape],
        num_classes=int(num_classes),
        class_names=list(class_names or [str(i) for i in range(num_classes)]),
        num_rows=sum(s.rows for s in shards),
        rows_per_source=per_source,
        rows_per_class=per_class.tolist(),
        shards=list(shards),
        fingerprint=digest.hexdigest()[:32],
        config_fingerprint=config_fingerprint,
        sources=list(sources or []),
    )
    storage.atomic_write_bytes(storage.join(dir_uri, MANIFEST), info.to_json().encode())
    return info


# ----------------------------------------------------------------------------------------------
# Reading.


@dataclass
class Batch:
    """Rows of a shard set as numpy arrays. Columns not requested are None.

    `is_synthetic` (bool[n]) is the stored `source` column; `sources` spells it out as strings.
    """

    ids: np.ndarray | None  # int64 [n]
    images: np.ndarray | None  # uint8 [n, H, W, C]
    labels: np.ndarray | None  # int64 [n]
    is_synthetic: np.ndarray | None  # bool [n]

    def __len__(self) -> int:
        for a in (self.ids, self.labels, self.is_synthetic, self.images):
            if a is not None:
                return len(a)
        return 0

    @property
    def sources(self) -> np.ndarray | None:
        if self.is_synthetic is None:
            return None
        return np.where(self.is_synthetic, "synthetic", "real")


def decode_images(column, image_shape: Sequence[int]) -> np.ndarray:
    """Raw image bytes -> writable uint8 [n, H, W, C].

    Accepts what Parquet readers and Ray Data hand over: a pyarrow (Chunked)Array of
    fixed-size or variable binary, a numpy object array of `bytes`, a numpy `S`/`V` array, or
    an already-decoded uint8 array. Every value must be exactly H*W*C bytes.
    """
    shape = tuple(int(s) for s in image_shape)
    nbytes = int(np.prod(shape))
    if isinstance(column, pa.ChunkedArray):
        chunks = [_arrow_bytes(c, nbytes) for c in column.chunks]
        flat = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        if len(chunks) == 1:
            flat = flat.copy()
    elif isinstance(column, pa.Array):
        flat = _arrow_bytes(column, nbytes).copy()
    else:
        arr = np.asarray(column) if not isinstance(column, np.ndarray) else column
        if arr.dtype == np.uint8:
            if arr.size % nbytes:
                raise DataError(f"image array of {arr.size} bytes is not a multiple of {nbytes}")
            flat = np.array(arr, copy=True).reshape(-1)
        elif arr.dtype.kind in "SV" and arr.dtype.itemsize == nbytes:
            flat = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8)
        elif arr.dtype == object:
            lengths = {len(v) for v in arr.reshape(-1)}
            if lengths - {nbytes}:
                raise DataError(f"image values of {sorted(lengths)} bytes, want {nbytes}")
            flat = np.frombuffer(b"".join(arr.reshape(-1)), np.uint8).copy()
        else:
            raise DataError(f"cannot decode images from an array of dtype {arr.dtype}")
    return flat.reshape(-1, *shape)


def _arrow_bytes(arr: pa.Array, nbytes: int) -> np.ndarray:
    """The data bytes of a binary arrow array, zero-copy (read-only view)."""
    if arr.null_count:
        raise DataError("image column contains nulls")
    n = len(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        if arr.type.byte_width != nbytes:
            raise DataError(f"images of {arr.type.byte_width} bytes, want {nbytes}")
        data = arr.buffers()[1]
        start = arr.offset * nbytes
        return np.frombuffer(data, np.uint8, count=n * nbytes, offset=start)
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], off_type, count=arr.offset + n + 1)
        offsets = offsets[arr.offset :]
        if n and not np.all(np.diff(offsets) == nbytes):
            raise DataError(f"image values are not all {nbytes} bytes")
        return np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[0] + n * nbytes]
    raise DataError(f"cannot decode images from an arrow column of type {arr.type}")


class ShardSet:
    """A complete shard set (its `dataset.json` exists). Open with `open_dataset`."""

    def __init__(self, uri: str, info: DatasetInfo):
        self.uri = uri
        self.info = info

    @property
    def files(self) -> list[str]:
        """Shard paths/URIs in order (what `ray.data.read_parquet` takes)."""
        return [storage.join(self.uri, s.file) for s in self.info.shards]

    @property
    def num_rows(self) -> int:
        return self.info.num_rows

    def __len__(self) -> int:
        return self.info.num_rows

    def iter_batches(
        self, batch_size: int = 1024, columns: Sequence[str] | None = None
    ) -> Iterator[Batch]:
        """Stream `Batch`es of exactly `batch_size` rows (the last may be shorter), in shard
        order, one Parquet row group in memory at a time. Page checksums are verified, so a
        corrupt shard raises `DataError` naming the file."""
        columns = list(COLUMNS if columns is None else columns)
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)} (have {COLUMNS})")
        pending: list[Batch] = []
        pending_rows = 0
        for path in self.files:
            for batch in self._iter_file(path, batch_size, columns):
                pending.append(batch)
                pending_rows += len(batch)
                while pending_rows >= batch_size:
                    out, pending = _take(pending, batch_size)
                    pending_rows -= batch_size
                    yield out
        if pending_rows:
            yield _take(pending, pending_rows)[0]

    def _iter_file(self, path: str, batch_size: int, columns: list[str]) -> Iterator[Batch]:
        fs, p = storage.resolve(path)
        shape = self.info.image_shape
        try:
            with fs.open_input_file(p) as f:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                missing = set(columns) - set(pf.schema_arrow.names)
                if missing:
                    raise DataError(f"{path}: not a sample shard (no columns {sorted(missing)})")
                # One reader per row group: with pre_buffer (pyarrow's default, which coalesces
                # reads on object stores) a file-wide reader keeps every row group it has read
                # cached until the file ends, i.e. memory grows with the shard's size.
                for group in range(pf.num_row_groups):
                    for rb in pf.iter_batches(
                        batch_size=batch_size, row_groups=[group], columns=columns
                    ):
                        yield _to_batch(rb, shape)
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{path}: corrupt or truncated Parquet shard ({_one_line(e)}); "
                "re-run `puma-ray ingest --force`"
            ) from None

    def verify(self) -> None:
        """Re-read every shard and compare its content fingerprint with the manifest."""
        for info, path in zip(self.info.shards, self.files, strict=True):
            fp = _Fingerprint()
            rows = 0
            for b in self._iter_file(path, 8192, list(COLUMNS)):
                fp.update(b.ids, b.images, b.labels, b.is_synthetic)
                rows += len(b)
            if rows != info.rows or fp.hexdigest() != info.fingerprint:
                raise DataError(f"{path}: content does not match dataset.json (modified?)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _to_batch(rb: pa.RecordBatch, image_shape) -> Batch:
    names = rb.schema.names

    def col(name):
        return rb.column(names.index(name)) if name in names else None

    ids, images, labels, source = col("id"), col("image"), col("label"), col("source")
    return Batch(
        ids=None if ids is None else ids.to_numpy().astype(np.int64, copy=False),
        images=None if images is None else decode_images(images, image_shape),
        labels=None if labels is None else labels.to_numpy().astype(np.int64),
        is_synthetic=None
        if source is None
        else np.asarray(pc.equal(source, "synthetic").to_numpy(zero_copy_only=False)),
    )


def _take(pending: list[Batch], rows: int) -> tuple[Batch, list[Batch]]:
    """Split the first `rows` rows off a list of batches."""
    parts, rest, taken = [], [], 0
    for i, b in enumerate(pending):
        if taken >= rows:
            rest = pending[i:]
            break
        need = rows - taken
        if len(b) <= need:
            parts.append(b)
            taken += len(b)
        else:
            parts.append(_slice(b, slice(0, need)))
            rest = [_slice(b, slice(need, None)), *pending[i + 1 :]]
            taken += need
            break
    if len(parts) == 1:
        return parts[0], rest
    fields = ("ids", "images", "labels", "is_synthetic")
    merged = {
        f: None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts])
        for f in fields
    }
    return Batch(**merged), rest


def _slice(b: Batch, sl: slice) -> Batch:
    return Batch(
        *(None if a is None else a[sl] for a in (b.ids, b.images, b.labels, b.is_synthetic))
    )


def read_info(uri: str) -> DatasetInfo:
    """Read `dataset.json`; a directory without it is incomplete and refused."""
    path = storage.join(uri, MANIFEST)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:
        if storage.exists(uri):
            raise DataError(
                f"{uri}: no {MANIFEST}: the shard set is incomplete (an interrupted ingest?); "
                "run `puma-ray ingest`"
            ) from None
        raise DataError(f"{uri}: no such dataset directory; run `puma-ray ingest`") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
    return DatasetInfo.from_json(text, where=path)


def open_dataset(uri: str) -> ShardSet:
    """Open a complete shard set. Checks that every listed shard exists with the listed size
    (one directory listing), so truncated or missing files are refused before any reading."""
    info = read_info(uri)
    fs, path = storage.resolve(uri)
    listing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    sizes = {i.base_name: i.size for i in listing if i.type == pafs.FileType.File}
    for s in info.shards:
        where = storage.join(uri, s.file)
        if s.file not in sizes:
            raise DataError(f"{where}: shard listed in {MANIFEST} is missing; re-run ingest")
        if sizes[s.file] != s.bytes:
            raise DataError(
                f"{where}: {sizes[s.file]} bytes but {MANIFEST} says {s.bytes} "
                "(truncated or replaced); re-run `puma-ray ingest --force`"
            )
    return ShardSet(uri, info)
