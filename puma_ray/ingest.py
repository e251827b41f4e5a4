"""`puma-ray ingest`: configured sources -> `<run_dir>/data/{train,test}/` sample shards.

Plan, check, then write:
1. Open every source and check everything that can be checked before writing a byte: image
   shapes and class counts agree, no source is empty, every label is in [0, num_classes) (npz
   labels are scanned once, in chunks), id ranges of different sources do not overlap.
2. Per split, skip it if its `dataset.json` exists with the same config fingerprint; otherwise
   delete the old manifest first (so nothing half-redone looks complete), then the old shards.
3. Builtin shards are generated independently, one Ray task each (any shard is a pure function
   of the config); npz and torchvision rows are read sequentially in the driver, in chunks,
   while those tasks run. A line per finished shard reports rows/s and the ETA.
4. `dataset.json` of each split is written last, from the shards' infos.

Ray must already be initialised by the caller (`puma_ray.runtime.ensure_ray`, as the CLI does)
for `parallel=True`; if it is not, ingest says so and runs in-process: the bytes are identical,
only slower. We never call `ray.init()` here, so a library user is not surprised by a cluster.

Id scheme (see docs/data.md): `id = source offset + part block + row index`, where the source
offset is `data.sources[i].id_offset` or `i * 2**40`, and the part block is 0 for train rows,
2**38 for builtin synthetic rows and 2**39 for test rows.

Length: one module on purpose: planning, checking and writing share the per-source plan, and
the order of those steps (check everything, then write, manifest last) is the point.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from puma_ray import outputs, storage
from puma_ray.config import (
    BuiltinSource,
    DataConfig,
    NpzSource,
    PipelineConfig,
    TorchvisionSource,
)
from puma_ray.data import builtin, shards
from puma_ray.data.npz import NpzArrays
from puma_ray.errors import DataError
from puma_ray.storage import join

SPLITS = ("train", "val", "test")
TORCHVISION_SPLITS = ("train", "test")  # the parts torchvision ships; validation is carved
# id block of an npz source's rows by its split (builtin parts have their own, in builtin.py)
SPLIT_ID_BLOCK = {"train": 0, "val": 3 * 2**38, "test": 2**39}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Plan.


@dataclass
class _Item:
    """One source's rows in one split: a contiguous range of shards."""

    source_index: int
    kind: str  # builtin | npz | torchvision
    label: str  # for progress lines: "builtin:synthetic", "npz:/data/x.npz", ...
    source: str  # real | synthetic
    rows: int
    id_start: int
    first_shard: int = 0
    num_shards: int = 0
    part: str | None = None  # builtin part
    reader: Any = None  # NpzArrays | TorchvisionArrays
    fingerprint_fields: dict = field(default_factory=dict)
    # Validation carve: row indices (within this source part) held out of a train item, or, on
    # the val split's item made from them, the rows it holds. `rows` counts rows written.
    held_out: np.ndarray | None = None
    carved_from: _Item | None = None

    @property
    def source_rows(self) -> int:
        """Rows of the source part before any were held out for validation."""
        return self.rows + (0 if self.held_out is None else len(self.held_out))


@dataclass
class _Split:
    split: str
    uri: str
    items: list[_Item]
    config_fingerprint: str = ""

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)

    @property
    def num_shards(self) -> int:
        return sum(i.num_shards for i in self.items)


@dataclass
class _Plan:
    splits: list[_Split]
    image_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]


def _where(i: int, src) -> str:
    return f"data.sources[{i}] ({src.type})"


def _file_stamp(path: str, run_dir: str) -> dict:
    """The file's content hash: a file rewritten in place invalidates the ingest even if its
    path, size and mtime did not change (hashes are cached in the run dir by file stat)."""
    sha = storage.content_hash(path, cache_dir=run_dir)
    return {"sha256": sha} if sha else {}


_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _torchvision_files(src: TorchvisionSource) -> list[str]:
    """The files torchvision reads for this set (both splits), sorted; [] if absent."""
    import os

    from puma_ray.data import torchvision_sets

    root = torchvision_sets.root_dir(src)
    if src.name == "svhn":
        paths = [os.path.join(root, f"{s}_32x32.mat") for s in TORCHVISION_SPLITS]
        return [p for p in paths if os.path.isfile(p)]
    folder = os.path.join(root, _CIFAR_DIRS[src.name])
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def _source_stamp(src, run_dir: str) -> dict | None:
    import os

    if isinstance(src, NpzSource):
        return _file_stamp(src.path, run_dir)
    if isinstance(src, TorchvisionSource):
        return {os.path.basename(f): _file_stamp(f, run_dir) for f in _torchvision_files(src)}
    return None  # builtin reads no file


def source_stamps(data: DataConfig, run_dir: str) -> list[dict | None]:
    """Content hashes of the files each source reads: part of ingest's fingerprint, and what
    `puma-ray run` compares to decide whether ingest is up to date."""
    return [_source_stamp(src, run_dir) for src in data.sources]


def _plan(data: DataConfig, run_dir: str) -> _Plan:
    """Open and check every source; raise DataError before anything is written."""
    from puma_ray.data import torchvision_sets

    items: dict[str, list[_Item]] = {s: [] for s in SPLITS}
    shapes: list[tuple[str, tuple[int, ...]]] = []
    declared: list[tuple[str, int, list[str]]] = []  # (where, num_classes, class_names)
    npz_readers: list[tuple[str, NpzArrays]] = []
    for i, src in enumerate(data.sources):
        where = _where(i, src)
        offset = data.source_id_offset(i)
        common = src.model_dump(mode="json", exclude={"id_offset"}) | {"id_offset": offset}
        if isinstance(src, BuiltinSource):
            shapes.append((where, builtin.IMAGE_SHAPE))
            declared.append((where, builtin.NUM_CLASSES, list(builtin.CLASS_NAMES)))
            if src.real_train + src.synthetic + src.real_test == 0:
                raise DataError(f"{where}: empty source (real_train, synthetic, real_test are 0)")
            for part, split in (("train", "train"), ("synthetic", "train"), ("test", "test")):
                rows = builtin.part_size(src, part)
                if rows == 0:
                    continue
                irrelevant = {
                    "train": {
                        "synthetic",
                        "real_test",
                        "ambiguous_fraction",
                        "mislabeled_fraction",
                    },
                    "synthetic": {"real_train", "real_test"},
                    "test": {
                        "real_train",
                        "synthetic",
                        "ambiguous_fraction",
                        "mislabeled_fraction",
                    },
                }[part]
                items[split].append(
                    _Item(
                        i,
                        "builtin",
                        f"builtin:{part}",
                        builtin.PART_SOURCE[part],
                        rows,
                        offset + builtin.PART_ID_BLOCK[part],
                        part=part,
                        fingerprint_fields={k: v for k, v in common.items() if k not in irrelevant}
                        | {"part": part},
                    )
                )
        elif isinstance(src, NpzSource):
            reader = NpzArrays(src.path, limit=src.limit)
            shapes.append((f"{where} {src.path}", reader.image_shape))
            npz_readers.append((where, reader))
            fields = common | {"file": _source_stamp(src, run_dir)}
            if src.split == "train":  # the default: a config that omits it keeps its fingerprint
                del fields["split"]
            items[src.split].append(
                _Item(
                    i,
                    "npz",
                    f"npz:{src.path}",
                    src.source,
                    reader.num_rows,
                    offset + SPLIT_ID_BLOCK[src.split],
                    reader=reader,
                    fingerprint_fields=fields,
                )
            )
        elif isinstance(src, TorchvisionSource):
            shapes.append((where, torchvision_sets.IMAGE_SHAPE))
            n_cls = torchvision_sets.NUM_CLASSES[src.name]
            names: list[str] | None = None
            stamp = None
            for split in TORCHVISION_SPLITS:
                arrays = torchvision_sets.load(src, split)
                stamp = stamp or _source_stamp(src, run_dir)  # after load: the files exist
                names = arrays.class_names
                if arrays.num_rows == 0:
                    raise DataError(f"{where}: empty source ({src.name} {split} has 0 rows)")
                bad = (arrays.labels < 0) | (arrays.labels >= n_cls)
                if bad.any():
                    raise DataError(f"{where}: {src.name} label outside [0, {n_cls})")
                other = "limit_test" if split == "train" else "limit_train"
                items[split].append(
                    _Item(
                        i,
                        "torchvision",
                        f"torchvision:{src.name}:{split}",
                        "real",
                        arrays.num_rows,
                        offset + builtin.PART_ID_BLOCK[split],
                        reader=arrays,
                        fingerprint_fields={
                            k: v for k, v in common.items() if k not in {other, "download"}
                        }
                        | {"split": split, "files": stamp},
                    )
                )
            declared.append((where, n_cls, names or []))
        else:  # pragma: no cover - the config schema has no other source types
            raise DataError(f"{where}: unknown source type")

    image_shape = shapes[0][1]
    if any(s != image_shape for _, s in shapes):
        listing = "; ".join(f"{w}: {list(s)}" for w, s in shapes)
        raise DataError(f"data.sources disagree on image shape (H, W, C): {listing}")

    counts = {n for _, n, _ in declared}
    if len(counts) > 1:
        listing = "; ".join(f"{w}: {n}" for w, n, _ in declared)
        raise DataError(f"data.sources disagree on the number of classes: {listing}")
    if data.num_classes is not None and counts and data.num_classes not in counts:
        raise DataError(
            f"data.num_classes is {data.num_classes} but {declared[0][0]} has {declared[0][1]} "
            "classes"
        )
    num_classes = data.num_classes or (declared[0][1] if declared else None)
    # npz labels are scanned (in chunks) here, before anything is written; with only npz
    # sources and no data.num_classes, the labels themselves say how many classes there are.
    per_class = [r.check_labels(num_classes) for _, r in npz_readers]
    if num_classes is None:
        num_classes = max(len(c) for c in per_class)
    class_names = declared[0][2] if declared else [str(c) for c in range(num_classes)]

    _check_id_ranges(data, [_Split(s, "", items[s]) for s in SPLITS])
    carve = _carve_validation(data, items)
    splits = []
    for split in SPLITS:
        uri = join(run_dir, "data", split)
        next_shard = 0
        for item in items[split]:
            item.first_shard = next_shard
            # builtin shards cover index ranges of the part, held-out rows or not
            rows = item.source_rows if item.kind == "builtin" else item.rows
            item.num_shards = -(-rows // data.rows_per_shard)
            next_shard += item.num_shards
        if split != "val" or items[split]:
            splits.append(_Split(split, uri, items[split]))
    by_name = {s.split: s for s in splits}
    if by_name["train"].rows == 0:
        raise DataError("data.sources: no training rows (every source is empty for train)")
    if by_name["test"].rows == 0:  # else every training run fails at its first evaluation
        raise DataError(
            "data.sources: no test rows (evaluation needs them); add an npz source with "
            "`split: test`, a torchvision source, or builtin rows with real_test > 0"
        )
    for s in splits:
        s.config_fingerprint = _fingerprint(
            [
                shards.FORMAT,
                s.split,
                data.name,
                data.rows_per_shard,
                num_classes,
                list(image_shape),
                class_names,
                [i.fingerprint_fields for i in s.items],
                *([carve] if carve and s.split != "test" else []),
            ]
        )
    return _Plan(splits, tuple(image_shape), int(num_classes), list(class_names))


def _train_labels(item: _Item, src) -> np.ndarray:
    """Labels of a train item's rows, in row order (cheap: no images are made)."""
    if item.kind == "builtin":
        return builtin.synthetic_flags(src, item.part, np.arange(item.rows)).label
    if item.kind == "npz":
        return np.concatenate([np.asarray(c, np.int64) for c in item.reader.iter_labels()])
    return np.asarray(item.reader.labels, np.int64)


def _carve_validation(data: DataConfig, items: dict[str, list[_Item]]) -> dict | None:
    """Hold `data.validation` of the real training rows (of all training rows if none is real)
    out as the val split (`puma_ray.data.validation`): each such train item keeps the indices
    it loses in
    `held_out`, and a val item carved from it holds them. Returns what the carve depends on
    (for the fingerprints), or None without a carve."""
    from puma_ray.data.validation import validation_mask

    if not data.validation:
        return None
    # real rows are what the test split resembles; data with none holds out synthetic rows
    real = [i for i in items["train"] if i.source == "real" and i.rows] or [
        i for i in items["train"] if i.rows
    ]
    labels = [_train_labels(i, data.sources[i.source_index]) for i in real]
    ids = np.concatenate([i.id_start + np.arange(i.rows, dtype=np.int64) for i in real])
    try:
        mask = validation_mask(ids, np.concatenate(labels), data.validation, data.validation_seed)
    except ValueError as e:
        raise DataError(f"data.validation: {e}") from None
    at = 0
    for item, lab in zip(real, labels, strict=True):
        held = np.flatnonzero(mask[at : at + len(lab)])
        at += len(lab)
        if not len(held):
            continue
        item.held_out = held
        item.rows -= len(held)
        items["val"].append(
            _Item(
                item.source_index,
                item.kind,
                f"{item.label} (held out)",
                item.source,
                len(held),
                item.id_start,
                part=item.part,
                reader=item.reader,
                fingerprint_fields=item.fingerprint_fields,
                carved_from=item,
            )
        )
    return {"validation": data.validation, "seed": data.validation_seed}


def _check_id_ranges(data: DataConfig, splits: list[_Split]) -> None:
    ranges = sorted(
        (i.id_start, i.id_start + i.rows, i.source_index) for s in splits for i in s.items
    )
    for (lo_a, hi_a, a), (lo_b, _hi_b, b) in zip(ranges, ranges[1:], strict=False):
        if lo_b < hi_a:
            raise DataError(
                f"data.sources[{a}] and data.sources[{b}] have overlapping ids "
                f"([{lo_a}, {hi_a}) and from {lo_b}); change their id_offset"
            )


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Shard jobs.


def write_builtin_shard(
    src: BuiltinSource, part: str, rows: np.ndarray, id_offset: int, uri: str, index: int
) -> shards.ShardInfo:
    """Generate the builtin part's rows `rows` (ascending indices) and write them as shard
    `index` of `uri`. Runs as a Ray task or in-process; memory is one row group."""
    step = shards.row_group_rows(builtin.IMAGE_SHAPE)

    def chunks():
        for a in range(0, len(rows), step):
            index_ = np.asarray(rows[a : a + step], np.int64)
            images, labels = builtin.generate(src, part, index_)
            yield builtin.ids(id_offset, part, index_), images, labels, builtin.PART_SOURCE[part]

    return shards.write_shard(uri, index, builtin.IMAGE_SHAPE, chunks())


def _builtin_jobs(plan: _Plan, data: DataConfig, split: _Split) -> list[tuple]:
    """One job per builtin shard: a range of the part's rows less those held out for
    validation; a val item's rows are the held-out ones."""
    jobs = []
    for item in split.items:
        if item.kind != "builtin":
            continue
        src = data.sources[item.source_index]
        offset = data.source_id_offset(item.source_index)
        if item.carved_from is not None:
            rows = item.carved_from.held_out
        else:
            rows = np.arange(item.source_rows, dtype=np.int64)
            if item.held_out is not None:
                rows = np.setdiff1d(rows, item.held_out, assume_unique=True)
        for k in range(item.num_shards):
            start = k * data.rows_per_shard
            if item.carved_from is None:  # index ranges: a shard's rows do not move
                part_rows = rows[(rows >= start) & (rows < start + data.rows_per_shard)]
            else:
                part_rows = rows[start : start + data.rows_per_shard]
            jobs.append(
                ((src, item.part, part_rows, offset, split.uri, item.first_shard + k), item)
            )
    return jobs


def _write_sequential(item: _Item, split: _Split, data: DataConfig, plan: _Plan, on_shard):
    """npz / torchvision rows, read in chunks, rolled into shards by a DatasetWriter. A val
    item reads its source again and keeps only its rows (the source's held-out indices); a
    train item skips those."""
    writer = shards.DatasetWriter(
        split.uri, plan.image_shape, data.rows_per_shard, first_index=item.first_shard
    )
    # ~4 MB reads: the shard writer buffers a whole row group anyway, so bigger reads would only
    # add a second and third copy of a row group to the peak.
    step = max(1, shards.row_group_rows(plan.image_shape) // 4)
    origin = item.carved_from or item
    held = origin.held_out
    done = 0
    try:
        for images, labels in item.reader.iter_chunks(step):
            ids = np.arange(done, done + len(labels), dtype=np.int64) + item.id_start
            if held is not None:
                take = np.isin(ids - item.id_start, held)
                keep = take if item.carved_from is not None else ~take
                ids, images, labels = ids[keep], images[keep], labels[keep]
            done += len(take) if held is not None else len(labels)
            if len(ids):
                for info in writer.write(ids, images, labels, item.source):
                    on_shard(split, item, info)
        infos = writer.close()
    except BaseException:
        writer.abort()
        raise
    if infos and infos[-1].rows < data.rows_per_shard:
        on_shard(split, item, infos[-1])  # the last, partial shard
    return infos


# ----------------------------------------------------------------------------------------------
# Progress and summary.


class _Progress:
    def __init__(self, total_rows: int, total_shards: int, log):
        self.total_rows, self.total_shards = total_rows, total_shards
        self.rows = self.shards = 0
        self.start = time.perf_counter()
        self.log = log

    def __call__(self, split: _Split, item: _Item, info: shards.ShardInfo) -> None:
        self.rows += info.rows
        self.shards += 1
        elapsed = time.perf_counter() - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = (self.total_rows - self.rows) / rate if rate > 0 else float("nan")
        self.log(
            f"ingest: {split.split}/{info.file} {info.rows} rows ({item.label}) | "
            f"{self.shards}/{self.total_shards} shards, {self.rows}/{self.total_rows} rows, "
            f"{rate:,.0f} rows/s, ETA {eta:.0f}s"
        )


@dataclass
class SplitSummary:
    split: str
    uri: str
    rows: int
    shards: int
    bytes: int
    rows_per_source: dict[str, int]
    rows_per_class: list[int]
    fingerprint: str
    skipped: bool  # already up to date: nothing written


@dataclass
class IngestSummary:
    run_dir: str
    name: str
    class_names: list[str]
    splits: dict[str, SplitSummary]
    seconds: float
    rows_written: int
    mode: str  # "ray tasks" | "in-process"

    @property
    def skipped(self) -> bool:
        return all(s.skipped for s in self.splits.values())

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A one-screen summary: rows per split, source and class, bytes, time, rows/s."""
        lines = [f"ingest: dataset {self.name!r} -> {join(self.run_dir, 'data')}"]
        lines.append(
            f"  {'split':<6} {'rows':>10} {'real':>10} {'synthetic':>10} {'shards':>7} "
            f"{'size':>10}  status"
        )
        for s in self.splits.values():
            status = "up to date (skipped)" if s.skipped else "written"
            lines.append(
                f"  {s.split:<6} {s.rows:>10,} {s.rows_per_source.get('real', 0):>10,} "
                f"{s.rows_per_source.get('synthetic', 0):>10,} {s.shards:>7} "
                f"{_size(s.bytes):>10}  {status}"
            )
        names = self.class_names
        per_split = [s.rows_per_class for s in self.splits.values()]
        if len(names) <= 20:
            lines.append(f"  {'class':<14}" + "".join(f" {s:>10}" for s in self.splits))
            for c, name in enumerate(names):
                counts = "".join(f" {p[c] if c < len(p) else 0:>10,}" for p in per_split)
                lines.append(f"  {name[:14]:<14}{counts}")
        else:
            for split, p in zip(self.splits, per_split, strict=True):
                if p:
                    lines.append(
                        f"  {split}: {len(names)} classes, rows per class min {min(p):,} "
                        f"median {int(np.median(p)):,} max {max(p):,}"
                    )
        if self.rows_written:
            rate = self.rows_written / self.seconds if self.seconds > 0 else float("nan")
            lines.append(
                f"  wrote {self.rows_written:,} rows in {self.seconds:.1f}s "
                f"({rate:,.0f} rows/s, {self.mode})"
            )
        else:
            lines.append("  nothing to do: every split is up to date (use --force to redo)")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _split_summary(split: _Split, info: shards.DatasetInfo, skipped: bool) -> SplitSummary:
    return SplitSummary(
        split=split.split,
        uri=split.uri,
        rows=info.num_rows,
        shards=len(info.shards),
        bytes=sum(s.bytes for s in info.shards),
        rows_per_source=info.rows_per_source,
        rows_per_class=info.rows_per_class,
        fingerprint=info.fingerprint,
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------------------
# Stage.


def _ray_ready(parallel: bool, log) -> bool:
    if not parallel:
        return False
    import ray

    if not ray.is_initialized():
        log("ingest: Ray is not initialised; generating shards in this process instead")
        return False
    return True


def run_ingest(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    parallel: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Build `<run_dir>/data/train` and `<run_dir>/data/test` from `cfg.data`.

    A split whose `dataset.json` exists with the same config fingerprint is skipped unless
    `force`. Bad sources raise `DataError` before anything is written. `log` gets one line per
    finished shard (default: stderr).
    """
    log = log or _stderr
    data = cfg.data
    start = time.perf_counter()
    plan = _plan(data, run_dir)
    use_ray = _ray_ready(parallel, log)

    todo: list[_Split] = []
    summaries: dict[str, SplitSummary] = {}
    for split in plan.splits:
        old = _existing(split.uri)
        if old is not None and old.config_fingerprint == split.config_fingerprint and not force:
            log(f"ingest: {split.uri} is up to date ({old.num_rows} rows); skipping")
            summaries[split.split] = _split_summary(split, old, skipped=True)
        else:
            todo.append(split)
    planned = {s.split for s in plan.splits}
    for split in SPLITS:  # a val split the config no longer asks for must not be read
        uri = join(run_dir, "data", split)
        if split not in planned and storage.exists(uri):
            _clear_split(uri)
            storage.delete(uri)
    for split in todo:  # manifest first: an interrupted re-ingest never looks complete
        _clear_split(split.uri)
        storage.makedirs(split.uri)

    progress = _Progress(sum(s.rows for s in todo), sum(s.num_shards for s in todo), log)
    infos: dict[str, list[shards.ShardInfo]] = {s.split: [] for s in todo}
    jobs = [(split, job, item) for split in todo for job, item in _builtin_jobs(plan, data, split)]
    if use_ray:
        _warn_local_dir_on_cluster(run_dir, log)
        pending = _submit(jobs)
        try:
            for split in todo:
                for item in split.items:
                    if item.kind != "builtin":
                        infos[split.split] += _write_sequential(item, split, data, plan, progress)
                        _collect(pending, infos, progress, timeout=0)
            while pending:
                _collect(pending, infos, progress, timeout=None)
        except BaseException:
            import ray

            for ref in pending:
                ray.cancel(ref)
            raise
    else:
        for split in todo:
            for item in split.items:
                if item.kind != "builtin":
                    infos[split.split] += _write_sequential(item, split, data, plan, progress)
        for split, job, item in jobs:
            info = write_builtin_shard(*job)
            infos[split.split].append(info)
            progress(split, item, info)

    for split in todo:
        info = shards.finalize(
            split.uri,
            infos[split.split],
            name=data.name,
            split=split.split,
            image_shape=plan.image_shape,
            num_classes=plan.num_classes,
            class_names=plan.class_names,
            config_fingerprint=split.config_fingerprint,
            sources=[
                {
                    "index": i.source_index,
                    "kind": i.label,
                    "source": i.source,
                    "rows": i.rows,
                    "id_start": i.id_start,
                    "first_shard": i.first_shard,
                    "num_shards": i.num_shards,
                }
                for i in split.items
            ],
        )
        summaries[split.split] = _split_summary(split, info, skipped=False)
    return IngestSummary(
        run_dir=run_dir,
        name=data.name,
        class_names=plan.class_names,
        splits={s.split: summaries[s.split] for s in plan.splits},
        seconds=time.perf_counter() - start,
        rows_written=sum(s.rows for s in todo),
        mode="ray tasks" if use_ray else "in-process",
    )


_SHARD_FILE = re.compile(r"^\.?(part-\d{5,}\.parquet|dataset\.json)(\.tmp-[0-9a-f]{8})?$")


def _clear_split(uri: str) -> None:
    """Empty a split directory, manifest first; refused unless it holds only a shard set."""
    outputs.clear(
        uri,
        "dataset",
        legacy=_shard_set,
        hint="choose another --run-dir",
        first=(shards.MANIFEST,),
        mark=False,
    )


def _shard_set(uri: str, names: set[str]) -> bool:
    """A split directory is ours if it holds only what ingest writes (shards, their temp files,
    dataset.json): it carries no marker, its listing is the shard set's own."""
    return all(_SHARD_FILE.match(n) for n in names)


def _existing(uri: str) -> shards.DatasetInfo | None:
    try:
        return shards.read_info(uri)
    except DataError:
        return None


def _submit(jobs) -> dict:
    """One Ray task per builtin shard; returns {ref: (split, item)}."""
    import ray

    # Retrying is safe: a shard is a pure function of its job and is published atomically.
    task = ray.remote(num_cpus=1, max_retries=2)(write_builtin_shard)
    return {task.remote(*job): (split, item) for split, job, item in jobs}


def _collect(pending: dict, infos: dict, progress: _Progress, timeout: float | None) -> None:
    import ray

    if not pending:
        return
    ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
    if ready:  # take everything that has finished by now, not just the first
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
    for ref in ready:
        split, item = pending.pop(ref)
        info = ray.get(ref)
        infos[split.split].append(info)
        progress(split, item, info)


def _warn_local_dir_on_cluster(run_dir: str, log) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage.is_local(run_dir) and len(nodes) > 1:
        log(
            f"ingest: warning: {run_dir} is a local path on a {len(nodes)}-node cluster; shards "
            "written by tasks on other nodes land on those nodes unless it is a shared mount "
            "(use an s3:// / gs:// run dir or NFS)"
        )
