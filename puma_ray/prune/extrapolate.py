"""Extrapolated margins (Nieth et al., arXiv 2406.13283) for `pruning.strategy: extrapolated`:
only a subset of rows is DeepFool-scored, every other row gets the mean margin of its k nearest
scored rows in embedding space. `_extrapolate` writes every row's margin to
`<run_dir>/extrapolated/` (cached with its own manifest while its inputs are unchanged), which
the selection then reads like scores."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray import outputs, selection, storage
from puma_ray.config import PipelineConfig
from puma_ray.errors import DataError
from puma_ray.prune.layout import (
    _OWN_PARTS,
    EXTRAPOLATED_FORMAT,
    MANIFEST,
    _fingerprint,
    extrapolated_dir,
)
from puma_ray.prune.passes import _get, _map
from puma_ray.prune.shards import ShardInput, _read_table


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
