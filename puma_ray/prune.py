"""`puma-ray prune`: the global selection (PUMA and its baselines) and the kept set it writes.

Inputs (under the run directory):
  data/train/        sample shards + dataset.json
  scores/            DeepFool margins per sample shard (`shard=part-XXXXX/`), manifest.json last;
                     needed by puma / high_margin / low_margin / extrapolated, optional for
                     random / none (used for the margin histogram only)
  embeddings/        per-row embeddings, same layout; only for `extrapolated`

Output `<run_dir>/kept/` (DESIGN.md "Kept set"):
  part-XXXXX.parquet the kept rows of sample shard part-XXXXX (id, image, label, source) plus
                     `eps` float32, the per-sample training epsilon; one file per input shard,
                     written under a hidden temp name and renamed
  margin_hist.png    kept vs pruned margins per source
  manifest.json      written last: strategy, parameters, cut keys, counts, input fingerprints
  .puma-ray-output   the marker that makes the folder prune's to replace (`puma_ray.outputs`);
                     an `--out-dir` holding anything else is refused, never cleared

For `extrapolated`, `<run_dir>/extrapolated/` holds every row's margin (exact for the scored
subset, k-NN mean otherwise) with its own manifest, reused while its inputs are unchanged.

How the selection scales: the exact cut keys come from `selection.find_cuts`, a radix select
whose passes are one Ray task per shard (or the same function in-process when Ray is not up);
each task reads only the id/label/source/margin columns of its shard and returns a histogram or
a few candidate keys. The driver holds O(buckets x targets), never a row list. A last pass per
shard applies the cuts and writes that shard's kept rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puma_ray import outputs, selection, storage
from puma_ray.config import PipelineConfig
from puma_ray.errors import ConfigError, DataError, PumaRayError
from puma_ray.selection import SelectionParams

FORMAT = "puma_ray.kept/1"
EXTRAPOLATED_FORMAT = "puma_ray.extrapolated/1"
MANIFEST = "manifest.json"
SOURCES = ("real", "synthetic")
STATUSES = ("kept", "eps_adjusted", "pruned")  # kept = kept with the base epsilon
HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-4, 1e2, 121)])  # ~12% wide bins


# What a kept / extrapolated folder of a version before the output marker holds: its manifest,
# or (interrupted) only shard files, their temp files and the histogram.
_OWN_PARTS = outputs.only_files(
    r"\.?(part-\d{5,}\.parquet|margin_hist\.png)(\.tmp-[0-9a-f]{8})?|manifest\.json\.tmp-[0-9a-f]{8}"
)
_KEPT_LEGACY = outputs.either(outputs.manifest_with(format=FORMAT), _OWN_PARTS)


def kept_dir(run_dir: str) -> str:
    return storage.join(run_dir, "kept")


def extrapolated_dir(run_dir: str) -> str:
    return storage.join(run_dir, "extrapolated")


def kept_files(kept_uri: str) -> tuple[list[str], dict]:
    """(shard URIs, manifest) of a finished kept set; refuses one without its manifest (an
    interrupted prune). Read these files rather than the directory: it also holds the manifest
    and the histogram PNG."""
    manifest = _read_manifest(storage.join(kept_uri, MANIFEST))
    if manifest is None:
        raise DataError(f"{kept_uri}: no finished kept set (run `puma-ray prune` first)")
    return [storage.join(kept_uri, s["file"]) for s in manifest["shards"]], manifest


# ----------------------------------------------------------------------------------------------
# Shards and their passes. Everything here runs inside Ray tasks (or in-process), one shard each.


@dataclass(frozen=True)
class ShardInput:
    """One unit of work: the table holding id/label/source[/margin] of a sample shard's rows
    (a score shard directory, an extrapolated margins file, or the sample shard itself), and
    the sample shard (checked against in the first pass, copied from in the write pass)."""

    name: str  # part-XXXXX
    rows: str
    sample: str | None = None
    has_margin: bool = True


@dataclass
class _Rows:
    ids: np.ndarray
    labels: np.ndarray
    is_synthetic: np.ndarray
    margins: np.ndarray | None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _read_table(uri: str, columns: list[str], what: str) -> pa.Table:
    """A Parquet file or a directory of them, as one table; DataError naming `uri` if absent."""
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no {what}")
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{uri}: unreadable {what} ({_one_line(e)})") from None


def _read_rows(spec: ShardInput, with_margin: bool) -> _Rows:
    cols = ["id", "label", "source"] + (["margin"] if with_margin else [])
    t = _read_table(spec.rows, cols, "margins" if with_margin else "rows")
    return _Rows(
        ids=t.column("id").to_numpy().astype(np.int64, copy=False),
        labels=t.column("label").to_numpy().astype(np.int64),
        is_synthetic=np.asarray(
            pc.equal(t.column("source"), "synthetic").to_numpy(zero_copy_only=False), bool
        ),
        margins=t.column("margin").to_numpy().astype(np.float32) if with_margin else None,
    )


def _validate(spec: ShardInput, rows: _Rows, num_classes: int) -> None:
    """First pass: the rows table is usable and covers its sample shard's ids exactly."""
    if rows.margins is not None:
        nan = np.isnan(rows.margins)
        if nan.any():
            example = int(rows.ids[np.flatnonzero(nan)[0]])
            raise DataError(f"{spec.rows}: {int(nan.sum())} NaN margins (e.g. id {example})")
    sorted_ids = np.sort(rows.ids)
    dup = sorted_ids[1:] == sorted_ids[:-1]
    if dup.any():
        raise DataError(f"{spec.rows}: id {int(sorted_ids[1:][dup][0])} occurs more than once")
    if len(rows.labels) and (rows.labels.min() < 0 or rows.labels.max() >= num_classes):
        raise DataError(f"{spec.rows}: labels outside [0, {num_classes})")
    if spec.sample is None or spec.sample == spec.rows:
        return
    s = _read_table(spec.sample, ["id", "label", "source"], "sample shard")
    sample_ids = s.column("id").to_numpy().astype(np.int64)
    order = np.argsort(sample_ids)
    sample_sorted = sample_ids[order]
    if len(sample_sorted) != len(sorted_ids) or not np.array_equal(sample_sorted, sorted_ids):
        missing = np.setdiff1d(sample_sorted, sorted_ids)
        extra = np.setdiff1d(sorted_ids, sample_sorted)
        detail = (
            f"{len(missing)} of its {len(sample_ids)} sample ids are missing (e.g. id "
            f"{int(missing[0])})"
            if len(missing)
            else f"{len(extra)} ids are not in the sample shard (e.g. id {int(extra[0])})"
        )
        raise DataError(
            f"{spec.rows}: does not cover sample shard {spec.sample}: {detail}; "
            "rerun `puma-ray score`"
        )
    mine = np.argsort(rows.ids)
    labels = s.column("label").to_numpy().astype(np.int64)[order]
    synth = pc.equal(s.column("source"), "synthetic").to_numpy(zero_copy_only=False)[order]
    if not (
        np.array_equal(labels, rows.labels[mine]) and np.array_equal(synth, rows.is_synthetic[mine])
    ):
        raise DataError(
            f"{spec.rows}: labels or sources differ from sample shard {spec.sample}; "
            "rerun `puma-ray score`"
        )


def _keys(rows: _Rows, params: SelectionParams):
    hi, lo = selection.row_keys(params.order, rows.ids, rows.margins, params.seed)
    return hi, lo, selection.group_index(rows.labels, rows.is_synthetic, params)


def _pass_task(
    spec: ShardInput,
    requests: list[selection.Request],
    params: SelectionParams,
    n_groups: int,
    num_classes: int,
    validate: bool,
) -> list[dict]:
    """One shard's answer to one selection pass (validating the shard in the first)."""
    rows = _read_rows(spec, with_margin=params.needs_margins or (validate and spec.has_margin))
    if validate:
        _validate(spec, rows, num_classes)
    hi, lo, groups = _keys(rows, params)
    return selection.shard_stats(hi, lo, groups, n_groups, requests)


def _outcome(spec: ShardInput, params: SelectionParams, cuts: dict, num_classes: int):
    """Apply the cuts to one shard: (rows, kept, eps, stats). Stats are small: counts per
    (class, source, status), margin histograms per (source, kept/pruned), eps min and sum."""
    rows = _read_rows(spec, with_margin=spec.has_margin)
    hi, lo, groups = _keys(rows, params)
    kept, eps = selection.apply_cuts(hi, lo, groups, rows.margins, cuts, params)
    adjusted = kept & (eps != np.float32(params.eps))
    status = np.where(kept, np.where(adjusted, 1, 0), 2)
    src = rows.is_synthetic.astype(np.int64)
    flat = (rows.labels * len(SOURCES) + src) * len(STATUSES) + status
    counts = np.bincount(flat, minlength=num_classes * len(SOURCES) * len(STATUSES))
    stats = {
        "counts": counts.reshape(num_classes, len(SOURCES), len(STATUSES)),
        "eps_min": float(eps[kept].min()) if kept.any() else None,
        "eps_sum": float(eps[kept].astype(np.float64).sum()),
        "digest": selection.selection_digest(rows.ids[kept], eps[kept]),
    }
    if rows.margins is not None:
        m = np.clip(rows.margins, 0.0, HIST_EDGES[-1])
        hist = np.zeros((len(SOURCES), 2, len(HIST_EDGES) - 1), np.int64)
        for s in range(len(SOURCES)):
            for k, sel in enumerate((kept, ~kept)):
                hist[s, k] = np.histogram(m[(src == s) & sel], HIST_EDGES)[0]
        stats["hist"] = hist
    return rows, kept, eps, stats


def _count_task(spec, params, cuts, num_classes) -> dict:
    return _outcome(spec, params, cuts, num_classes)[3]


def _write_task(spec: ShardInput, params, cuts, num_classes: int, out_dir: str) -> dict:
    """Stream the sample shard row group by row group and write its kept rows plus `eps` to
    `<out_dir>/<name>.parquet` (temp name, then rename). Memory: one row group + 13 B/row."""
    rows, kept, eps, stats = _outcome(spec, params, cuts, num_classes)
    order = np.argsort(rows.ids)
    sorted_ids, kept_sorted, eps_sorted = rows.ids[order], kept[order], eps[order]
    fs, src_path = storage.resolve(spec.sample)
    out_uri = storage.join(out_dir, f"{spec.name}.parquet")
    ofs, out_path = storage.resolve(out_uri)
    parent, base = out_path.rsplit("/", 1)
    tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
    written = 0
    try:
        with fs.open_input_file(src_path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow.append(pa.field("eps", pa.float32()))
            with ofs.open_output_stream(tmp) as sink:
                writer = pq.ParquetWriter(
                    sink,
                    schema,
                    compression="zstd",
                    use_dictionary=["source"],
                    write_statistics=["id", "label", "eps"],
                    write_page_checksum=True,
                )
                for i in range(pf.num_row_groups):
                    rg = pf.read_row_group(i)
                    pos = np.searchsorted(sorted_ids, rg.column("id").to_numpy())
                    keep = kept_sorted[pos]
                    part = rg.filter(pa.array(keep)).append_column(
                        "eps", pa.array(eps_sorted[pos][keep], pa.float32())
                    )
                    writer.write_table(part.cast(schema))
                    written += len(part)
                writer.close()
        size = ofs.get_file_info(tmp).size
        ofs.move(tmp, out_path)
    except (OSError, pa.ArrowException) as e:
        if ofs.get_file_info(tmp).type != pafs.FileType.NotFound:
            ofs.delete_file(tmp)
        raise DataError(f"{spec.sample}: cannot copy kept rows ({_one_line(e)})") from None
    if written != int(kept.sum()):
        raise DataError(f"{spec.sample}: wrote {written} kept rows, expected {int(kept.sum())}")
    return {**stats, "file": f"{spec.name}.parquet", "rows": written, "bytes": int(size)}


# ----------------------------------------------------------------------------------------------
# Running a function over shards: Ray tasks when Ray is up, else the same calls in this process.


def _use_ray(parallel: bool) -> bool:
    if not parallel:
        return False
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _map(fn: Callable, items: list, args: tuple, use_ray: bool) -> Iterator:
    """Yield fn(item, *args) for each item, in completion order. Under Ray at most ~2 tasks per
    CPU are in flight, so finished results wait in the object store only briefly."""
    if not use_ray:
        for item in items:
            yield fn(item, *args)
        return
    import ray

    # Retrying is safe: passes only read; the write pass publishes each shard by rename.
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    arg_refs = [ray.put(a) if _big(a) else a for a in args]
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(items)
    pending = []
    try:
        while queue or pending:
            while queue and len(pending) < window:
                pending.append(task.remote(queue.pop(0), *arg_refs))
            ready, pending = ray.wait(pending, num_returns=1)
            yield _get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def _big(obj) -> bool:
    return isinstance(obj, dict | list) and len(obj) > 64


def _get(ref):
    """ray.get that re-raises a user error from a task as itself (one line, no remote trace)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PumaRayError):
            raise cause from None
        raise


def select_scalable(
    shards: list[ShardInput],
    params: SelectionParams,
    num_classes: int,
    *,
    parallel: bool = True,
    collect_limit: int = 1 << 16,
    validate: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[dict, dict, int]:
    """Exact cut keys of the selection over `shards`: (plans per group, cuts per group, passes).

    Equal to `selection.select_reference` on all rows at once; see `selection.find_cuts`. The
    first pass also validates each shard (NaN margins, duplicate ids, coverage of the sample
    shard), so bad input fails before anything is written."""
    use_ray = _use_ray(parallel)
    n_groups = num_classes if params.per_class else 1
    state = {"pass": 0}

    def run_pass(requests):
        first = state["pass"] == 0
        state["pass"] += 1
        log(
            f"prune: selection pass {state['pass']}: {len(requests)} requests over "
            f"{len(shards)} shards"
        )
        args = (requests, params, n_groups, num_classes, validate and first)
        yield from _map(_pass_task, shards, args, use_ray)

    try:
        return selection.find_cuts(run_pass, n_groups, params, collect_limit=collect_limit)
    except selection.DuplicateKeyError as e:
        where = os.path.dirname(shards[0].rows) if shards else "?"
        raise DataError(f"{where}: {e} (ids must be unique across shards)") from None


def count_selection(
    shards: list[ShardInput],
    params: SelectionParams,
    cuts: dict,
    num_classes: int,
    *,
    parallel: bool = True,
) -> dict:
    """Kept / eps-adjusted / pruned counts and eps stats of the selection, computed per shard
    without writing (what the write pass computes, for benchmarks and dry runs)."""
    total = _Totals(num_classes)
    for stats in _map(_count_task, shards, (params, cuts, num_classes), _use_ray(parallel)):
        total.add(stats)
    return total.as_dict()


class _Totals:
    def __init__(self, num_classes: int):
        self.counts = np.zeros((num_classes, len(SOURCES), len(STATUSES)), np.int64)
        self.hist = None
        self.eps_min = None
        self.eps_sum = 0.0
        self.digest = 0
        self.shards: list[dict] = []

    def add(self, stats: dict) -> None:
        self.counts += stats["counts"]
        if "hist" in stats:
            self.hist = stats["hist"] if self.hist is None else self.hist + stats["hist"]
        if stats["eps_min"] is not None:
            m = stats["eps_min"]
            self.eps_min = m if self.eps_min is None else min(self.eps_min, m)
        self.eps_sum += stats["eps_sum"]
        self.digest = (self.digest + stats["digest"]) % (1 << 64)
        if "file" in stats:
            # kept rows per source: training routes each file to its real / synthetic stream
            kept = stats["counts"][:, :, :2].sum(axis=(0, 2))
            per_source = {s: int(kept[i]) for i, s in enumerate(SOURCES)}
            self.shards.append(
                {**{k: stats[k] for k in ("file", "rows", "bytes")}, "rows_per_source": per_source}
            )

    def as_dict(self) -> dict:
        c = self.counts
        kept = int(c[..., :2].sum())
        return {
            "rows": int(c.sum()),
            "kept": kept,
            "pruned": int(c[..., 2].sum()),
            "eps_adjusted": int(c[..., 1].sum()),
            "eps_min": self.eps_min,
            "eps_mean": self.eps_sum / kept if kept else None,
            "digest": f"{self.digest:016x}",  # selection_digest of all kept (id, eps)
        }


# ----------------------------------------------------------------------------------------------
# Extrapolation (Nieth et al., arXiv 2406.13283).


def _embeddings(uri: str) -> tuple[np.ndarray, np.ndarray]:
    t = _read_table(uri, ["id", "embedding"], "embeddings")
    col = t.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise DataError(f"{uri}: embedding column is {col.type}, want fixed_size_list<float16>")
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)
    return t.column("id").to_numpy().astype(np.int64), values.reshape(-1, dim)


def _scores_by_id(uri: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, margins) of a score shard; empty if it does not exist (a shard none of whose
    rows fell into the scored subset)."""
    if uri is None or not storage.exists(uri):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    t = _read_table(uri, ["id", "margin"], "scores")
    ids = t.column("id").to_numpy().astype(np.int64)
    order = np.argsort(ids)
    return ids[order], t.column("margin").to_numpy().astype(np.float32)[order]


def _lookup(sorted_ids: np.ndarray, values: np.ndarray, ids: np.ndarray):
    """(found bool[n], values at ids)."""
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(0, len(sorted_ids) - 1))
    if not len(sorted_ids):
        return np.zeros(len(ids), bool), np.zeros(len(ids), values.dtype)
    found = sorted_ids[pos] == ids
    return found, values[pos]


@dataclass(frozen=True)
class _ExtrapolationShard:
    name: str
    sample: str
    embeddings: str
    scores: str
    out: str


def _scored_part(job: _ExtrapolationShard, fraction: float, seed: int):
    """Check one shard's embeddings and scores; return its scored-subset rows
    (ids, float16 embeddings, margins) and a small stats dict."""
    sample = _read_table(job.sample, ["id"], "sample shard").column("id").to_numpy()
    emb_ids, emb = _embeddings(job.embeddings)
    if len(emb_ids) != len(sample) or not np.array_equal(np.sort(emb_ids), np.sort(sample)):
        missing = np.setdiff1d(sample, emb_ids)
        raise DataError(
            f"{job.embeddings}: embeddings must cover every row of {job.sample} "
            f"({len(missing)} missing); rerun `puma-ray score --embeddings`"
        )
    subset = selection.extrapolation_subset(emb_ids, fraction, seed)
    score_ids, margins = _scores_by_id(job.scores)
    found, m = _lookup(score_ids, margins, emb_ids[subset])
    if not found.all():
        raise DataError(
            f"{job.scores}: no score for {int((~found).sum())} of the {int(subset.sum())} rows "
            f"of the extrapolation subset (e.g. id {int(emb_ids[subset][~found][0])}); rerun "
            "`puma-ray score` with the same pruning.extrapolation settings"
        )
    if np.isnan(m).any():
        raise DataError(f"{job.scores}: NaN margins in the scored subset")
    part = (emb_ids[subset], np.asarray(emb[subset], np.float16), m)
    return {"rows": len(emb_ids), "scored": int(subset.sum()), "dim": emb.shape[1]}, part


def _concat_parts(*parts):
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _extrapolate_task(job: _ExtrapolationShard, ref, fraction: float, seed: int, k: int):
    """Every row's margin for one shard: exact for the scored subset, else the mean of its k
    nearest scored rows. Writes (id, label, source, margin, scored); returns quality stats
    against true scores of unscored rows when those exist."""
    ref_ids, ref_emb, ref_margin = ref
    s = _read_table(job.sample, ["id", "label", "source"], "sample shard")
    ids = s.column("id").to_numpy().astype(np.int64)
    emb_ids, emb = _embeddings(job.embeddings)
    order = np.argsort(emb_ids)
    _, pos = _lookup(emb_ids[order], order, ids)
    emb = emb[pos]
    subset = selection.extrapolation_subset(ids, fraction, seed)
    score_ids, margins = _scores_by_id(job.scores)
    has_true, true_margin = _lookup(score_ids, margins, ids)
    margin = np.empty(len(ids), np.float32)
    margin[subset] = true_margin[subset]
    if (~subset).any():
        margin[~subset] = selection.knn_mean(emb[~subset], ref_emb, ref_margin, k)
    table = pa.table(
        {
            "id": pa.array(ids),
            "label": s.column("label"),
            "source": s.column("source"),
            "margin": pa.array(margin, pa.float32()),
            "scored": pa.array(subset),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.atomic_write_bytes(job.out, sink.getvalue())
    check = (~subset) & has_true
    x, y = margin[check].astype(np.float64), true_margin[check].astype(np.float64)
    return {
        "rows": len(ids),
        "scored": int(subset.sum()),
        "check": [
            int(check.sum()),
            float(np.abs(x - y).sum()),
            x.sum(),
            y.sum(),
            (x * x).sum(),
            (y * y).sum(),
            (x * y).sum(),
        ],
    }


def _pearson(n, sx, sy, sxx, syy, sxy) -> float | None:
    if n < 2:
        return None
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    return float((n * sxy - sx * sy) / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else None


def _extrapolate(
    cfg: PipelineConfig, run_dir: str, dataset, names, fps: dict, *, use_ray, force, log
) -> tuple[list[ShardInput], dict]:
    """Margins for every row (see `_extrapolate_task`), cached in `<run_dir>/extrapolated/`.

    Memory: the scored subset (ids, float16 embeddings, margins: ~(2F + 12) bytes per scored
    row, e.g. 100k rows x 512 dims = 100 MB) is held once: in the Ray object store, shared
    read-only by the per-shard k-NN tasks, or in this process without Ray."""
    ex = cfg.pruning.extrapolation
    seed = cfg.pruning.seed
    out_dir = extrapolated_dir(run_dir)
    settings = {"scored_fraction": ex.scored_fraction, "k": ex.k, "seed": seed}
    fp = _fingerprint({"format": EXTRAPOLATED_FORMAT, "inputs": fps, "settings": settings})
    manifest_path = storage.join(out_dir, MANIFEST)
    shards = [
        ShardInput(n, storage.join(out_dir, f"{n}.parquet"), sample=f, has_margin=True)
        for n, f in zip(names, dataset.files, strict=True)
    ]
    if storage.exists(manifest_path) and not force:
        old = json.loads(storage.read_bytes(manifest_path))
        if old.get("fingerprint") == fp:
            log(f"prune: extrapolated margins in {out_dir} are up to date")
            return shards, old["summary"]
    jobs = [
        _ExtrapolationShard(
            name=n,
            sample=f,
            embeddings=storage.join(run_dir, "embeddings", f"shard={n}"),
            scores=storage.join(run_dir, "scores", f"shard={n}"),
            out=storage.join(out_dir, f"{n}.parquet"),
        )
        for n, f in zip(names, dataset.files, strict=True)
    ]
    start = time.perf_counter()
    args = (ex.scored_fraction, seed)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(_scored_part).options(num_returns=2)
        refs = [task.remote(j, *args) for j in jobs]
        stats = [_get(r[0]) for r in refs]  # raises the first shard's error, nothing written
        ref = ray.remote(num_cpus=1)(_concat_parts).remote(*[r[1] for r in refs])
        del refs
        ray.wait([ref])
    else:
        parts = [_scored_part(j, *args) for j in jobs]
        stats = [p[0] for p in parts]
        ref = _concat_parts(*[p[1] for p in parts])
        del parts
    rows, scored = sum(s["rows"] for s in stats), sum(s["scored"] for s in stats)
    if scored == 0:
        raise DataError(
            f"pruning.extrapolation.scored_fraction={ex.scored_fraction}: no row of the "
            f"{rows} was selected for scoring; raise the fraction"
        )
    log(
        f"prune: extrapolating margins of {rows - scored} rows from {scored} scored rows "
        f"(k={ex.k}, {stats[0]['dim']}-dim embeddings)"
    )
    owner = outputs.either(outputs.manifest_with(format=EXTRAPOLATED_FORMAT), _OWN_PARTS)
    outputs.check_clearable(out_dir, "extrapolated", legacy=owner, hint="choose another --run-dir")
    outputs.claim(out_dir, "extrapolated")
    storage.delete(manifest_path)
    check = np.zeros(7)
    for res in _map(_extrapolate_task, jobs, (ref, *args, ex.k), use_ray):
        check += np.asarray(res["check"], np.float64)
    n = int(check[0])
    summary = {
        "rows": rows,
        "scored_rows": scored,
        "scoring_compute_saved": 1.0 - scored / rows,
        "k": ex.k,
        "embedding_dim": stats[0]["dim"],
        "seconds": time.perf_counter() - start,
        "check_rows": n,  # unscored rows that nevertheless had a true score
        "check_mae": float(check[1] / n) if n else None,
        "check_pearson": _pearson(n, *check[2:]),
    }
    manifest = {
        "format": EXTRAPOLATED_FORMAT,
        "fingerprint": fp,
        "inputs": fps,
        "settings": settings,
        "summary": summary,
    }
    storage.atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return shards, summary


# ----------------------------------------------------------------------------------------------
# The stage.


@dataclass
class PruneSummary:
    out_dir: str
    strategy: str
    description: str
    rows: int
    kept: int
    pruned: int
    eps_adjusted: int
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    thresholds: list[str] = field(default_factory=list)
    eps_base: float = 0.0
    eps_min: float | None = None
    eps_mean: float | None = None
    mode: str = ""
    passes: int = 0
    shards: int = 0
    wall_s: float = 0.0
    extrapolation: dict | None = None
    skipped_stage: bool = False

    def format(self) -> str:
        if self.skipped_stage:
            return (
                f"prune: up to date ({self.kept} of {self.rows} rows kept in {self.out_dir}); "
                "nothing to do"
            )
        lines = [f"prune: {self.description} -> {self.out_dir}"]
        lines.append(f"  {'source':<12}{'rows':>10}{'kept':>10}{'pruned':>10}{'eps-adjusted':>14}")
        for src, c in self.per_source.items():
            lines.append(
                f"  {src:<12}{c['rows']:>10,}{c['kept']:>10,}{c['pruned']:>10,}"
                f"{c['eps_adjusted']:>14,}"
            )
        lines.append(
            f"  {'total':<12}{self.rows:>10,}{self.kept:>10,}{self.pruned:>10,}"
            f"{self.eps_adjusted:>14,}"
        )
        lines += [f"  {t}" for t in self.thresholds]
        if self.eps_min is not None:
            lines.append(
                f"  eps: base {self.eps_base:.5f}, min {self.eps_min:.5f}, mean "
                f"{self.eps_mean:.5f} over kept rows"
            )
        if self.extrapolation:
            e = self.extrapolation
            lines.append(
                f"  extrapolated: {e['scored_rows']:,} of {e['rows']:,} rows DeepFool-scored "
                f"({100 * e['scoring_compute_saved']:.0f}% of scoring compute saved), "
                f"k={e['k']}"
                + (f", check MAE {e['check_mae']:.4f}" if e.get("check_mae") is not None else "")
            )
        lines.append(
            f"  selection: {self.passes} pass{'es' if self.passes != 1 else ''} over "
            f"{self.shards} shards ({self.mode}) + write; "
            f"{self.wall_s:.1f}s"
        )
        return "\n".join(lines)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_manifest(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError:
        raise DataError(f"{path}: unreadable manifest") from None


def _describe(params: SelectionParams, cfg: PipelineConfig) -> str:
    p = cfg.pruning
    name = params.strategy
    if p.strategy == "extrapolated":
        name = f"extrapolated/{params.strategy}"
    if params.strategy == "none":
        return f"{name} (every row kept)"
    parts = [
        f"ratio {params.ratio:g}",
        f"scope {params.scope}",
        "per class" if params.per_class else "global",
    ]
    if params.strategy == "random":
        parts.append(f"seed {params.seed}")
    if params.eps_rule == "scale_lowest":
        parts.append(f"eps x{params.eps_scale:g} for the lowest {params.eps_quantile:g} of kept")
    elif params.eps_rule == "margin_cap":
        parts.append(f"eps = max({params.eps_floor:g}, min(eps, {params.eps_alpha:g} x margin))")
    return f"{name} ({', '.join(parts)})"


def _check_config(cfg: PipelineConfig, params: SelectionParams) -> None:
    rule = selection.EPS_RULES[params.eps_rule]
    if rule.compares_margin_with_eps and cfg.scoring.norm != cfg.training.attack.norm:
        raise ConfigError(
            f"pruning.eps_rule={params.eps_rule} compares margins with the training epsilon: "
            f"scoring.norm ({cfg.scoring.norm}) must equal training.attack.norm "
            f"({cfg.training.attack.norm})"
        )
    if params.eps_rule == "margin_cap" and params.eps_floor > params.eps:
        raise ConfigError(
            f"pruning.eps_floor ({params.eps_floor:g}) must not exceed training.attack.epsilon "
            f"({params.eps:g})"
        )


def _scores_input(cfg, run_dir, dataset, required: bool, log) -> dict | None:
    """The scores manifest if it belongs to this dataset; refuse (if required) otherwise."""
    path = storage.join(run_dir, "scores", MANIFEST)
    manifest = _read_manifest(path)
    problem = None
    if manifest is None:
        problem = f"{path}: no scores (run `puma-ray score` first)"
    elif manifest.get("state", {}).get("dataset_fingerprint") != dataset.info.fingerprint:
        problem = (
            f"{path}: the scores belong to a different dataset (fingerprint "
            f"{manifest.get('state', {}).get('dataset_fingerprint')}, data/train has "
            f"{dataset.info.fingerprint}); rerun `puma-ray score`"
        )
    if problem is None:
        return manifest
    if required:
        raise DataError(problem)
    if manifest is not None:
        log(f"prune: ignoring scores ({problem})")
    return None


def _embeddings_input(run_dir, dataset) -> dict:
    path = storage.join(run_dir, "embeddings", MANIFEST)
    manifest = _read_manifest(path)
    if manifest is None:
        raise DataError(
            f"{path}: no embeddings (pruning.strategy=extrapolated needs them: run "
            "`puma-ray score --embeddings` first)"
        )
    if manifest.get("state", {}).get("dataset_fingerprint") != dataset.info.fingerprint:
        raise DataError(f"{path}: embeddings belong to a different dataset; rerun scoring")
    return manifest


def run_prune(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: bool = False,
    parallel: bool = True,
    out_dir: str | None = None,
    collect_limit: int = 1 << 16,
    log: Callable[[str], None] = print,
) -> PruneSummary:
    """Select the kept set of `cfg.pruning` and write it to `<run_dir>/kept` (or `out_dir`).

    Uses Ray tasks when Ray is initialised (and `parallel`), else runs the same passes here.
    Skips when the manifest's fingerprint (inputs + parameters) matches, unless `force`. Bad
    input raises ConfigError/DataError before anything is written."""
    start = time.perf_counter()
    from puma_ray.data import dataset_dirs, open_dataset

    p = cfg.pruning
    out_dir = out_dir or kept_dir(run_dir)
    # before any work: a kept set replaces only a directory that is ours (or empty / new)
    outputs.check_clearable(out_dir, "kept", legacy=_KEPT_LEGACY)
    try:
        params = SelectionParams.from_config(p, cfg.training.attack.epsilon)
    except ValueError as e:
        raise ConfigError(f"pruning: {e}") from None
    _check_config(cfg, params)
    dataset = open_dataset(dataset_dirs(run_dir)[0])
    info = dataset.info
    names = [os.path.basename(f).rsplit(".", 1)[0] for f in dataset.files]
    extrapolated = p.strategy == "extrapolated"
    scores = _scores_input(cfg, run_dir, dataset, params.needs_margins or extrapolated, log)
    embeddings = _embeddings_input(run_dir, dataset) if extrapolated else None
    scoring_norm = scores["state"].get("deepfool", {}).get("norm") if scores else None
    if selection.EPS_RULES[params.eps_rule].compares_margin_with_eps:
        if scoring_norm != cfg.training.attack.norm:
            raise ConfigError(
                f"pruning.eps_rule={params.eps_rule}: the scores were measured in "
                f"{scoring_norm} (scoring.norm) but training.attack.norm is "
                f"{cfg.training.attack.norm}; rescore with scoring.norm="
                f"{cfg.training.attack.norm}"
            )

    fps = {
        "dataset": info.fingerprint,
        "scores": scores.get("state_fingerprint") if scores else None,
        "embeddings": embeddings.get("state_fingerprint") if embeddings else None,
    }
    parameters = {
        "pruning": p.model_dump(mode="json"),
        "resolved": asdict(params),
        "training_attack": cfg.training.attack.model_dump(mode="json"),
        "scoring_norm": scoring_norm,
    }
    fingerprint = _fingerprint({"format": FORMAT, "inputs": fps, "parameters": parameters})
    manifest_path = storage.join(out_dir, MANIFEST)
    old = _read_manifest(manifest_path) if not force else None
    if old is not None and old.get("fingerprint") == fingerprint:
        return PruneSummary(**{**old["summary"], "skipped_stage": True})

    use_ray = _use_ray(parallel)
    extra = None
    if extrapolated:
        shards, extra = _extrapolate(
            cfg, run_dir, dataset, names, fps, use_ray=use_ray, force=force, log=log
        )
    elif scores is not None:
        shards = [
            ShardInput(n, storage.join(run_dir, "scores", f"shard={n}"), sample=f)
            for n, f in zip(names, dataset.files, strict=True)
        ]
    else:
        shards = [
            ShardInput(n, f, sample=f, has_margin=False)
            for n, f in zip(names, dataset.files, strict=True)
        ]
    plans, cuts, passes = select_scalable(
        shards, params, info.num_classes, parallel=parallel, collect_limit=collect_limit, log=log
    )

    # Inputs are valid: replace the old kept set, manifest first so it never looks complete.
    outputs.clear(out_dir, "kept", legacy=_KEPT_LEGACY)
    totals = _Totals(info.num_classes)
    for stats in _map(_write_task, shards, (params, cuts, info.num_classes, out_dir), use_ray):
        totals.add(stats)
    counts = totals.as_dict()
    if counts["rows"] != info.num_rows:
        raise DataError(f"{out_dir}: saw {counts['rows']} rows, dataset has {info.num_rows}")
    totals.shards.sort(key=lambda s: s["file"])

    if totals.hist is not None:
        _plot_hist(storage.join(out_dir, "margin_hist.png"), totals.hist, _describe(params, cfg))
    groups = _group_report(plans, cuts, totals.counts, params, info.class_names)
    per_source = {
        src: {
            "rows": int(totals.counts[:, s].sum()),
            "kept": int(totals.counts[:, s, :2].sum()),
            "pruned": int(totals.counts[:, s, 2].sum()),
            "eps_adjusted": int(totals.counts[:, s, 1].sum()),
        }
        for s, src in enumerate(SOURCES)
    }
    summary = PruneSummary(
        out_dir=out_dir,
        strategy=p.strategy,
        description=_describe(params, cfg),
        rows=counts["rows"],
        kept=counts["kept"],
        pruned=counts["pruned"],
        eps_adjusted=counts["eps_adjusted"],
        per_source=per_source,
        thresholds=_threshold_lines(groups, params),
        eps_base=params.eps,
        eps_min=counts["eps_min"],
        eps_mean=counts["eps_mean"],
        mode="ray tasks" if use_ray else "in-process",
        passes=passes,
        shards=len(shards),
        wall_s=time.perf_counter() - start,
        extrapolation=extra,
    )
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "strategy": p.strategy,
        "base_strategy": params.strategy,
        "order": "(margin, id) ascending" if params.order == "margin" else "(hash(seed, id), id)",
        "parameters": parameters,
        "inputs": fps,
        "counts": {
            **{k: counts[k] for k in ("rows", "kept", "pruned", "eps_adjusted")},
            "per_source": per_source,
            "per_class": [
                {
                    "class": c,
                    "name": info.class_names[c] if c < len(info.class_names) else str(c),
                    **{
                        s: int(totals.counts[c, :, j].sum())
                        for j, s in enumerate(("kept_base_eps", "eps_adjusted", "pruned"))
                    },
                    "kept": int(totals.counts[c, :, :2].sum()),
                }
                for c in range(info.num_classes)
            ],
        },
        "groups": groups,
        "eps": {"base": params.eps, "min": counts["eps_min"], "mean": counts["eps_mean"]},
        "selection_digest": counts["digest"],
        "extrapolation": extra,
        "shards": totals.shards,
        "selection": {"mode": summary.mode, "passes": passes, "collect_limit": collect_limit},
        "summary": asdict(summary),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return summary


def _group_report(plans, cuts, counts, params: SelectionParams, class_names) -> list[dict]:
    """Per selection group: sizes and the cut keys (null where a cut is at an end)."""
    in_scope = [1] if params.scope == "synthetic" else [0, 1]
    out = []
    for g, plan in sorted(plans.items()):
        c = counts[g] if params.per_class else counts.sum(axis=0)
        c = c[in_scope].sum(axis=0)
        described = {}
        for name, key in cuts[g].items():
            if 0 < key < selection.KEY_END:
                described[name] = selection.describe_key(key, params.order)
        out.append(
            {
                "group": f"class {g} ({class_names[g]})" if params.per_class else "all",
                "rows": plan.rows,
                "kept": plan.kept,
                "pruned": plan.rows - plan.kept,
                "eps_adjusted": int(c[1]),
                "ranks": {
                    "keep_from": plan.keep_from,
                    "keep_until": plan.keep_until,
                    **{f"eps_{q}": r for q, r in plan.eps_ranks.items()},
                },
                "cuts": described,
            }
        )
    return out


def _threshold_lines(groups: list[dict], params: SelectionParams) -> list[str]:
    if params.order != "margin":
        return []

    def span(name: str) -> str | None:
        ms = [g["cuts"][name]["margin"] for g in groups if name in g["cuts"]]
        if not ms:
            return None
        lo, hi = min(ms), max(ms)
        text = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
        return text + (f" over {len(ms)} groups" if len(ms) > 1 else "")

    lines = []
    if s := span("keep_until"):
        lines.append(f"pruned: rows at or above the cut (margin, id); cut margin {s}")
    if s := span("keep_from"):
        lines.append(f"pruned: rows below the cut (margin, id); cut margin {s}")
    for q in selection.EPS_RULES[params.eps_rule].quantiles(params):
        if s := span(f"eps_{q}"):
            lines.append(f"eps x{params.eps_scale:g}: kept rows below the cut; cut margin {s}")
    return lines


def _plot_hist(uri: str, hist: np.ndarray, title: str) -> None:
    """Kept vs pruned margin histograms, one panel per source, log-spaced bins; the first bin
    (margins below 1e-4, mostly 0: misclassified by the margin model) is counted in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = np.sqrt(HIST_EDGES[1:-1] * HIST_EDGES[2:])
    fig, axes = plt.subplots(1, len(SOURCES), figsize=(11, 3.8), squeeze=False)
    for s, src in enumerate(SOURCES):
        ax = axes[0, s]
        for k, (label, color) in enumerate((("kept", "tab:blue"), ("pruned", "tab:red"))):
            h = hist[s, k]
            ax.step(
                centers,
                h[1:],
                where="mid",
                color=color,
                label=f"{label} ({h.sum():,}; {h[0]:,} below 1e-4)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("DeepFool margin")
        ax.set_ylabel("rows")
        ax.set_title(src)
        ax.minorticks_off()  # minor log ticks dominate the drawing time
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.atomic_write_bytes(uri, buf.getvalue())


__all__ = [
    "PruneSummary",
    "ShardInput",
    "count_selection",
    "kept_dir",
    "kept_files",
    "run_prune",
    "select_scalable",
]
