"""The work on one shard, as plain functions that run inside Ray tasks (or in this process):
read and validate its rows table (`_read_rows`, `_validate`), answer one selection pass
(`_pass_task`), count the outcome of the cuts (`_count_task`) and write the shard's kept rows
with their `eps` (`_write_task`). Each returns small stats, never a row list.

The row policies (`pruning.misclassified`, `pruning.nonconverged`) read two flags per row: a
score shard has them as `pred` (misclassified iff pred != label) and `converged`; an
extrapolated margins file as `misclassified` and `converged` (known for the scored rows; the
estimated ones count as correctly classified and converged)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puma_ray import selection, storage
from puma_ray.errors import DataError
from puma_ray.selection import SelectionParams

SOURCES = ("real", "synthetic")
STATUSES = ("kept", "eps_adjusted", "pruned")  # kept = kept with the base epsilon
FLAGS = ("misclassified", "nonconverged")
# how a policy treated a flagged in-scope row: left in the order at its margin, moved below or
# above every converged row, kept at the base epsilon outside the order, dropped
TREATMENTS = ("ranked", "below_converged", "above_converged", "kept_base_eps", "dropped")
FLAG_COLUMNS = {"scores": ("pred", "converged"), "extrapolated": ("misclassified", "converged")}
# ~12% wide bins from 1e-4 to 1e2, mirrored below 0 for signed margins (scoring.signed:
# misclassified rows are negative): HIST_SIDE bins each side of [-1e-4, 0) and [0, 1e-4).
HIST_SIDE = 120
_POSITIVE_EDGES = np.geomspace(1e-4, 1e2, HIST_SIDE + 1)
HIST_EDGES = np.concatenate([-_POSITIVE_EDGES[::-1], [0.0], _POSITIVE_EDGES])


@dataclass(frozen=True)
class ShardInput:
    """One unit of work: the table holding id/label/source[/margin] of a sample shard's rows
    (a score shard directory, an extrapolated margins file, or the sample shard itself), and
    the sample shard (checked against in the first pass, copied from in the write pass)."""

    name: str  # part-XXXXX
    rows: str
    sample: str | None = None
    has_margin: bool = True
    flags: str | None = "scores"  # where the row flags are (FLAG_COLUMNS), None: no flags


@dataclass
class _Rows:
    ids: np.ndarray
    labels: np.ndarray
    is_synthetic: np.ndarray
    margins: np.ndarray | None
    misclassified: np.ndarray | None = None  # bool[n]; None: flags not read
    converged: np.ndarray | None = None


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


def _read_rows(spec: ShardInput, with_margin: bool, flags: str = "no") -> _Rows:
    """The rows table; `flags`: "no", "if_present" (for the counts of the write pass) or
    "required" (a policy needs them: a table without them is refused)."""
    cols = ["id", "label", "source"] + (["margin"] if with_margin else [])
    what = "margins" if with_margin else "rows"
    flag_cols = list(FLAG_COLUMNS.get(spec.flags, ())) if flags != "no" else []
    if flags == "required" and not flag_cols:
        raise DataError(f"{spec.rows}: no misclassified / converged flags to apply the policies")
    if flags == "if_present" and flag_cols:
        names = _column_names(spec.rows)
        flag_cols = flag_cols if all(c in names for c in flag_cols) else []
    try:
        t = _read_table(spec.rows, cols + flag_cols, what)
    except DataError:  # a clearer line if the table is fine but lacks the flags
        names = _column_names(spec.rows, missing_ok=True)
        missing = [c for c in flag_cols if c not in names]
        if names and missing:
            raise DataError(
                f"{spec.rows}: no {'/'.join(missing)} column (scores of an older version?); "
                "rescore, or set pruning.misclassified=eps_rule and pruning.nonconverged=as_is"
            ) from None
        raise
    labels = t.column("label").to_numpy().astype(np.int64)
    rows = _Rows(
        ids=t.column("id").to_numpy().astype(np.int64, copy=False),
        labels=labels,
        is_synthetic=np.asarray(
            pc.equal(t.column("source"), "synthetic").to_numpy(zero_copy_only=False), bool
        ),
        margins=t.column("margin").to_numpy().astype(np.float32) if with_margin else None,
    )
    if flag_cols:
        first = t.column(flag_cols[0]).to_numpy(zero_copy_only=False)
        rows.misclassified = (
            first.astype(np.int64) != labels if flag_cols[0] == "pred" else first.astype(bool)
        )
        rows.converged = t.column("converged").to_numpy(zero_copy_only=False).astype(bool)
    return rows


def _column_names(uri: str, *, missing_ok: bool = False) -> list[str]:
    fs, path = storage.resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").schema.names
    except (OSError, pa.ArrowException) as e:
        if missing_ok:
            return []
        raise DataError(f"{uri}: unreadable ({_one_line(e)})") from None


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
    """(hi, lo, group codes) of the rows: their keys and groups after the row policies."""
    return selection.selection_rows(
        rows.ids,
        rows.labels,
        rows.is_synthetic,
        rows.margins,
        params,
        misclassified=rows.misclassified,
        converged=rows.converged,
    )


def _pass_task(
    spec: ShardInput,
    requests: list[selection.Request],
    params: SelectionParams,
    n_groups: int,
    num_classes: int,
    validate: bool,
) -> list[dict]:
    """One shard's answer to one selection pass (validating the shard in the first)."""
    rows = _read_rows(
        spec,
        with_margin=params.needs_margins or (validate and spec.has_margin),
        flags="required" if params.uses_flags else "no",
    )
    if validate:
        _validate(spec, rows, num_classes)
    hi, lo, groups = _keys(rows, params)
    return selection.shard_stats(hi, lo, groups, n_groups, requests)


def _outcome(spec: ShardInput, params: SelectionParams, cuts: dict, num_classes: int):
    """Apply the cuts to one shard: (rows, kept, eps, stats). Stats are small: counts per
    (class, source, status), margin histograms per (source, kept/pruned), eps min and sum, and
    (when the rows have flags) counts per (flag, treatment, status) of the flagged rows."""
    rows = _read_rows(
        spec,
        with_margin=spec.has_margin,
        flags="required" if params.uses_flags else "if_present",
    )
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
    if rows.misclassified is not None:
        stats["flags"] = _flag_counts(rows, hi, groups, status, params)
    if rows.margins is not None:
        m = np.clip(rows.margins, HIST_EDGES[0], HIST_EDGES[-1])
        hist = np.zeros((len(SOURCES), 2, len(HIST_EDGES) - 1), np.int64)
        for s in range(len(SOURCES)):
            for k, sel in enumerate((kept, ~kept)):
                hist[s, k] = np.histogram(m[(src == s) & sel], HIST_EDGES)[0]
        stats["hist"] = hist
    return rows, kept, eps, stats


def _flag_counts(rows: _Rows, hi, groups, status, params: SelectionParams) -> np.ndarray:
    """int64[len(FLAGS), 1 + len(TREATMENTS), len(STATUSES)]: per flag, the out-of-scope rows
    (index 0) and the in-scope rows by treatment (1 + TREATMENTS index), by status."""
    if params.order == "margin":
        tier = (hi >> np.uint64(32)).astype(np.int64)
    else:
        tier = np.full(len(hi), selection.TIER_NORMAL, np.int64)
    treatment = np.select(
        [
            groups == selection.OUT_OF_SCOPE,
            groups <= -2,
            tier == selection.TIER_BELOW,
            tier == selection.TIER_ABOVE,
        ],
        [
            0,
            np.where((-groups) % 2 == selection.FORCED_BASE, 4, 5),
            2,
            3,
        ],
        default=1,
    )
    out = np.zeros((len(FLAGS), 1 + len(TREATMENTS), len(STATUSES)), np.int64)
    for f, flagged in enumerate((rows.misclassified, ~rows.converged)):
        flat = treatment[flagged] * len(STATUSES) + status[flagged]
        out[f] = np.bincount(flat, minlength=out[f].size).reshape(out[f].shape)
    return out


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
