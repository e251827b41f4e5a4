"""Extrapolated margins (Nieth et al., arXiv 2406.13283) for `pruning.strategy: extrapolated`:
only a subset of rows is DeepFool-scored, every row gets the mean margin of its k nearest scored
rows in embedding space (of its own class by default; a scored row's estimate leaves itself
out). `_extrapolate` writes every row's margin to `<run_dir>/extrapolated/` (cached with its
own manifest while its inputs are unchanged), which the selection then reads like scores, and
reports how well the estimates match the true margins on a held-out part of the scored rows."""

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
from puma_ray.prune.shards import ShardInput, _column_names, _read_table
from puma_ray.selection.knn import Reference, extrapolated_margins, quality


def _embeddings(uri: str) -> tuple[np.ndarray, np.ndarray]:
    t = _read_table(uri, ["id", "embedding"], "embeddings")
    col = t.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise DataError(f"{uri}: embedding column is {col.type}, want fixed_size_list<float16>")
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)
    return t.column("id").to_numpy().astype(np.int64), values.reshape(-1, dim)


@dataclass
class _Scores:
    """A score shard by sorted id: margins, and the row flags when the shard has them."""

    ids: np.ndarray
    margins: np.ndarray
    misclassified: np.ndarray | None = None
    converged: np.ndarray | None = None


def _scores_by_id(uri: str | None) -> _Scores:
    """A score shard sorted by id; empty if it does not exist (a shard none of whose rows fell
    into the scored subset)."""
    if uri is None or not storage.exists(uri):  # no scored row: the flags are trivially known
        none = np.zeros(0, bool)
        return _Scores(np.zeros(0, np.int64), np.zeros(0, np.float32), none, none)
    flags = all(c in _column_names(uri) for c in ("pred", "converged"))
    cols = ["id", "label", "margin"] + (["pred", "converged"] if flags else [])
    t = _read_table(uri, cols, "scores")
    ids = t.column("id").to_numpy().astype(np.int64)
    order = np.argsort(ids)
    out = _Scores(ids[order], t.column("margin").to_numpy().astype(np.float32)[order])
    if flags:
        label = t.column("label").to_numpy().astype(np.int64)
        pred = t.column("pred").to_numpy().astype(np.int64)
        out.misclassified = (pred != label)[order]
        out.converged = t.column("converged").to_numpy(zero_copy_only=False).astype(bool)[order]
    return out


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


@dataclass(frozen=True)
class _Settings:
    """What the extrapolated margins depend on besides the inputs (their cache key)."""

    scored_fraction: float
    seed: int
    k: int
    same_class: bool
    rank_scored: str  # estimate | exact
    holdout_fraction: float


def _scored_part(job: _ExtrapolationShard, st: _Settings):
    """Check one shard's embeddings and scores; return a small stats dict and its
    scored-subset rows (ids, float16 embeddings, margins, labels)."""
    sample = _read_table(job.sample, ["id", "label"], "sample shard")
    sample_ids = sample.column("id").to_numpy().astype(np.int64)
    emb_ids, emb = _embeddings(job.embeddings)
    if len(emb_ids) != len(sample_ids) or not np.array_equal(np.sort(emb_ids), np.sort(sample_ids)):
        missing = np.setdiff1d(sample_ids, emb_ids)
        raise DataError(
            f"{job.embeddings}: embeddings must cover every row of {job.sample} "
            f"({len(missing)} missing); rerun `puma-ray score --embeddings`"
        )
    subset = selection.extrapolation_subset(emb_ids, st.scored_fraction, st.seed)
    scores = _scores_by_id(job.scores)
    found, m = _lookup(scores.ids, scores.margins, emb_ids[subset])
    if not found.all():
        raise DataError(
            f"{job.scores}: no score for {int((~found).sum())} of the {int(subset.sum())} rows "
            f"of the extrapolation subset (e.g. id {int(emb_ids[subset][~found][0])}); rerun "
            "`puma-ray score` with the same pruning.extrapolation settings"
        )
    if np.isnan(m).any():
        raise DataError(f"{job.scores}: NaN margins in the scored subset")
    order = np.argsort(sample_ids)
    _, label_pos = _lookup(sample_ids[order], order, emb_ids[subset])
    labels = sample.column("label").to_numpy().astype(np.int64)[label_pos]
    part = (emb_ids[subset], np.asarray(emb[subset], np.float16), m, labels)
    return {"rows": len(emb_ids), "scored": int(subset.sum()), "dim": emb.shape[1]}, part


def _reference(same_class: bool, *parts) -> Reference:
    """The scored rows of all shards, sorted once (by class, then id): what every k-NN task
    reads, from the object store under Ray."""
    ids, emb, margins, labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return Reference.build(ids, emb, margins, labels, same_class=same_class)


def _extrapolate_task(job: _ExtrapolationShard, ref: Reference, st: _Settings) -> dict:
    """Every row's margin for one shard: its k-NN estimate (leave-one-out for scored rows), or
    for `rank_scored: exact` the true margin of a scored row. Writes (id, label, source,
    margin, scored[, misclassified, converged]); returns quality stats: against true scores of
    unscored rows when those exist, and the (estimate, true) pairs of the held-out rows."""
    s = _read_table(job.sample, ["id", "label", "source"], "sample shard")
    ids = s.column("id").to_numpy().astype(np.int64)
    labels = s.column("label").to_numpy().astype(np.int64)
    emb_ids, emb = _embeddings(job.embeddings)
    order = np.argsort(emb_ids)
    _, pos = _lookup(emb_ids[order], order, ids)
    emb = emb[pos]
    subset = selection.extrapolation_subset(ids, st.scored_fraction, st.seed)
    holdout = subset & selection.holdout_subset(ids, st.holdout_fraction, st.seed)
    scores = _scores_by_id(job.scores)
    has_true, true_margin = _lookup(scores.ids, scores.margins, ids)
    try:
        margin, est = extrapolated_margins(
            ref, ids, labels, emb, st.k, subset, true_margin,
            rank_scored=st.rank_scored, also=holdout,
        )  # fmt: skip
    except ValueError as e:
        raise DataError(
            f"{job.sample}: {e}; raise pruning.extrapolation.scored_fraction or set "
            "pruning.extrapolation.same_class=false"
        ) from None
    columns = {
        "id": pa.array(ids),
        "label": s.column("label"),
        "source": s.column("source"),
        "margin": pa.array(margin, pa.float32()),
        "scored": pa.array(subset),
    }
    if scores.misclassified is not None:  # flags known for the scored rows only
        _, mis = _lookup(scores.ids, scores.misclassified, ids)
        _, conv = _lookup(scores.ids, scores.converged, ids)
        columns["misclassified"] = pa.array(subset & mis)
        columns["converged"] = pa.array(~subset | conv)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, compression="zstd")
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
        "holdout": (est[holdout], true_margin[holdout]),
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

    Memory: the scored subset (ids, float16 embeddings, margins, labels: ~(2F + 20) bytes per
    scored row, e.g. 100k rows x 512 dims = 100 MB) is held once: in the Ray object store,
    shared read-only by the per-shard k-NN tasks, or in this process without Ray. The held-out
    check brings its (estimate, true) pairs to the driver: 8 bytes per held-out row
    (holdout_fraction x scored rows: 160 kB for 100k scored rows at 0.2)."""
    ex = cfg.pruning.extrapolation
    st = _Settings(
        scored_fraction=ex.scored_fraction,
        seed=cfg.pruning.seed,
        k=ex.k,
        same_class=ex.same_class,
        rank_scored=ex.rank_scored,
        holdout_fraction=ex.holdout_fraction,
    )
    out_dir = extrapolated_dir(run_dir)
    settings = {
        "scored_fraction": st.scored_fraction,
        "k": st.k,
        "seed": st.seed,
        "same_class": st.same_class,
        "rank_scored": st.rank_scored,
        "holdout_fraction": st.holdout_fraction,
    }
    fp = _fingerprint({"format": EXTRAPOLATED_FORMAT, "inputs": fps, "settings": settings})
    manifest_path = storage.join(out_dir, MANIFEST)
    shards = [
        ShardInput(n, storage.join(out_dir, f"{n}.parquet"), sample=f, flags="extrapolated")
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
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(_scored_part).options(num_returns=2)
        refs = [task.remote(j, st) for j in jobs]
        stats = [_get(r[0]) for r in refs]  # raises the first shard's error, nothing written
        ref = ray.remote(num_cpus=1)(_reference).remote(st.same_class, *[r[1] for r in refs])
        del refs
        ray.wait([ref])
    else:
        parts = [_scored_part(j, st) for j in jobs]
        stats = [p[0] for p in parts]
        ref = _reference(st.same_class, *[p[1] for p in parts])
        del parts
    rows, scored = sum(s["rows"] for s in stats), sum(s["scored"] for s in stats)
    if scored == 0:
        raise DataError(
            f"pruning.extrapolation.scored_fraction={ex.scored_fraction}: no row of the "
            f"{rows} was selected for scoring; raise the fraction"
        )
    log(
        f"prune: extrapolating margins of {rows} rows from {scored} scored rows "
        f"(k={ex.k}, {'same class' if st.same_class else 'any class'}, "
        f"{stats[0]['dim']}-dim embeddings)"
    )
    # any version's manifest makes the folder ours (the format prefix without the version)
    own_manifest = outputs.manifest_with(format=EXTRAPOLATED_FORMAT.rsplit("/", 1)[0] + "/")
    owner = outputs.either(own_manifest, _OWN_PARTS)
    outputs.check_clearable(out_dir, "extrapolated", legacy=owner, hint="choose another --run-dir")
    outputs.claim(out_dir, "extrapolated")
    storage.delete(manifest_path)
    check = np.zeros(7)
    held_est, held_true = [], []
    for res in _map(_extrapolate_task, jobs, (ref, st), use_ray):
        check += np.asarray(res["check"], np.float64)
        held_est.append(res["holdout"][0])
        held_true.append(res["holdout"][1])
    n = int(check[0])
    x, y = np.concatenate(held_est), np.concatenate(held_true)
    order = np.lexsort((y, x))  # tasks finish in any order: the sums must not depend on it
    held = quality(x[order], y[order])
    summary = {
        "rows": rows,
        "scored_rows": scored,
        "scoring_compute_saved": 1.0 - scored / rows,
        "k": ex.k,
        "same_class": st.same_class,
        "rank_scored": st.rank_scored,
        "embedding_dim": stats[0]["dim"],
        "seconds": time.perf_counter() - start,
        "check_rows": n,  # unscored rows that nevertheless had a true score
        "check_mae": float(check[1] / n) if n else None,
        "check_pearson": _pearson(n, *check[2:]),
        # scored rows whose own estimate left them out, against their true margin
        "holdout": {"fraction": st.holdout_fraction, **held},
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
