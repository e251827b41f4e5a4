"""k-NN extrapolation of margins (Nieth et al., arXiv 2406.13283): pure NumPy, no Ray, no I/O.

Only a hash-chosen subset of the rows is DeepFool-scored; every row's margin is then estimated
as the unweighted mean of its k nearest scored rows in an embedding space (Euclidean distance,
exact brute-force search). Two choices keep the extrapolated margins distributed like the true
ones, so that a threshold on them treats scored and unscored rows alike:

* **Same class** (`Reference(..., same_class=True)`): a row's neighbours are scored rows of its
  own label. The margin is measured towards the label, so a neighbour of another class measures
  a different boundary.
* **Every row ranked by its estimate**: a k-mean has a much smaller variance than a single
  score, so mixing exact scores with estimates puts the scored rows at both tails of the order.
  `estimate(..., leave_out=...)` gives a scored row the mean of its k nearest *other* scored
  rows (leave-one-out), an estimate of the same kind as an unscored row's.

`extrapolated_margins` puts the two together for one shard's rows; `rank_correlation`
(Spearman) and `quality` summarise estimates against true margins.
`puma_ray.selection` re-exports `knn_mean` (its historical home).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def knn_mean(
    queries: np.ndarray,
    ref: np.ndarray,
    ref_values: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    query_block: int = 1024,
    ref_block: int = 8192,
) -> np.ndarray:
    """float32[m]: mean of `ref_values` over each query's k nearest rows of `ref` (float[n, F]).

    `exclude` (int64[m], optional): the index into `ref` of one row query i must not use (its
    own row, for a leave-one-out estimate), -1 for none. Exact search in blocks: memory
    O(query_block x (ref_block + k)) besides the inputs, time O(m x n x F). Squared distances
    |q|^2 + |r|^2 - 2 q.r in float64 (embeddings are float16, so float64 products are exact and
    the sum is accurate to ~1e-16 relative). With fewer than k usable reference rows, all of
    them are used; a query left with none is an error."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    m, n = len(queries), len(ref)
    if n == 0:
        raise ValueError("no reference rows to extrapolate from")
    kk = min(k, n)
    ref_values = np.asarray(ref_values, np.float64)
    excl = None if exclude is None else np.asarray(exclude, np.int64)
    ref_sq = np.empty(n, np.float64)
    for j in range(0, n, ref_block):
        r = np.asarray(ref[j : j + ref_block], np.float64)
        ref_sq[j : j + len(r)] = np.einsum("ij,ij->i", r, r)
    out = np.empty(m, np.float32)
    for i in range(0, m, query_block):
        q = np.asarray(queries[i : i + query_block], np.float64)
        q_sq = np.einsum("ij,ij->i", q, q)
        best_d = np.full((len(q), 0), np.inf)
        best_i = np.zeros((len(q), 0), np.int64)
        for j in range(0, n, ref_block):
            r = np.asarray(ref[j : j + ref_block], np.float64)
            d = q_sq[:, None] + ref_sq[None, j : j + len(r)] - 2.0 * (q @ r.T)
            np.maximum(d, 0.0, out=d)
            if excl is not None:
                e = excl[i : i + len(q)]
                rows = np.flatnonzero((e >= j) & (e < j + len(r)))
                d[rows, e[rows] - j] = np.inf  # never a neighbour of itself
            cand_d = np.concatenate([best_d, d], axis=1)
            cand_i = np.concatenate(
                [best_i, np.broadcast_to(np.arange(j, j + len(r)), d.shape)], axis=1
            )
            if cand_d.shape[1] > kk:
                sel = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
                cand_d = np.take_along_axis(cand_d, sel, axis=1)
                cand_i = np.take_along_axis(cand_i, sel, axis=1)
            best_d, best_i = cand_d, cand_i
        if excl is None:
            out[i : i + len(q)] = ref_values[best_i].mean(axis=1)
            continue
        # an excluded row is only ever among the k when fewer than k + 1 rows exist
        usable = np.isfinite(best_d)
        count = usable.sum(axis=1)
        if (count == 0).any():
            raise ValueError("a leave-one-out query has no other reference row")
        out[i : i + len(q)] = (ref_values[best_i] * usable).sum(axis=1) / count
    return out


@dataclass
class Reference:
    """The scored rows, sorted by (label, id) when `same_class` (else by id): ids int64[n],
    embeddings float16[n, F], margins float32[n], labels int64[n]; `starts[c]:starts[c + 1]`
    is class c's slice (None without same_class). Sorted once, so a class is a view, never a
    copy, of what the object store holds."""

    ids: np.ndarray
    emb: np.ndarray
    margins: np.ndarray
    labels: np.ndarray
    same_class: bool
    starts: np.ndarray | None = None

    @classmethod
    def build(cls, ids, emb, margins, labels, *, same_class: bool) -> Reference:
        ids = np.asarray(ids, np.int64)
        labels = np.asarray(labels, np.int64)
        order = np.lexsort((ids, labels)) if same_class else np.argsort(ids, kind="stable")
        ref = cls(ids[order], np.asarray(emb)[order], np.asarray(margins, np.float32)[order],
                  labels[order], same_class)  # fmt: skip
        if same_class:
            top = int(labels.max()) + 1 if len(labels) else 0
            ref.starts = np.searchsorted(ref.labels, np.arange(top + 1), side="left")
        return ref

    def __len__(self) -> int:
        return len(self.ids)

    def part(self, label: int) -> slice:
        """The slice of reference rows a query of class `label` may use."""
        if not self.same_class:
            return slice(0, len(self.ids))
        if self.starts is None or label + 1 >= len(self.starts):
            return slice(0, 0)
        return slice(int(self.starts[label]), int(self.starts[label + 1]))


def estimate(
    ref: Reference,
    ids: np.ndarray,
    labels: np.ndarray,
    emb: np.ndarray,
    k: int,
    *,
    leave_out: np.ndarray | None = None,
) -> np.ndarray:
    """float32[m]: each query row's k-NN mean margin over the reference (its own class only if
    `ref.same_class`). A row with `leave_out[i]` that is itself a reference row (same id) does
    not count itself: its estimate is leave-one-out, of the same kind as an unscored row's.
    Raises ValueError naming the class when a query's class has no reference row."""
    ids = np.asarray(ids, np.int64)
    labels = np.asarray(labels, np.int64)
    out = np.empty(len(ids), np.float32)
    groups = np.unique(labels) if ref.same_class else np.zeros(1, np.int64)
    for c in groups:
        q = np.flatnonzero(labels == c) if ref.same_class else np.arange(len(ids))
        if not len(q):
            continue
        part = ref.part(int(c))
        part_ids = ref.ids[part]
        if not len(part_ids):
            raise ValueError(f"class {int(c)} has no scored row to extrapolate from")
        exclude = None
        if leave_out is not None:
            # part_ids is sorted (by id within the class): find each query's own row
            pos = np.clip(np.searchsorted(part_ids, ids[q]), 0, len(part_ids) - 1)
            own = np.asarray(leave_out, bool)[q] & (part_ids[pos] == ids[q])
            exclude = np.where(own, pos, -1)
        out[q] = knn_mean(emb[q], ref.emb[part], ref.margins[part], k, exclude=exclude)
    return out


def extrapolated_margins(
    ref: Reference,
    ids: np.ndarray,
    labels: np.ndarray,
    emb: np.ndarray,
    k: int,
    scored: np.ndarray,
    true_margins: np.ndarray,
    *,
    rank_scored: str = "estimate",
    also: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(margin each row is ranked by, its k-NN estimate or NaN where none was computed).

    `rank_scored="estimate"`: every row is ranked by its estimate, leave-one-out for the
    `scored` rows (bool[m]), so scored and unscored rows are ranked alike. `"exact"`: a scored
    row keeps `true_margins`, only the unscored rows (and those in `also`, e.g. a held-out
    check) are estimated."""
    if rank_scored not in ("estimate", "exact"):
        raise ValueError(f"unknown rank_scored {rank_scored!r}")
    scored = np.asarray(scored, bool)
    if rank_scored == "estimate":
        query = np.ones(len(ids), bool)
    else:
        query = ~scored if also is None else ~scored | np.asarray(also, bool)
    est = np.full(len(ids), np.nan, np.float32)
    if query.any():
        est[query] = estimate(
            ref, ids[query], labels[query], emb[query], k, leave_out=scored[query]
        )
    if rank_scored == "estimate":
        return est.copy(), est
    return np.where(scored, np.asarray(true_margins, np.float32), est).astype(np.float32), est


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    v = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / v) if v > 0 else None


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (Pearson correlation of the average ranks); None with < 2 pairs or a
    constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return None
    return _pearson(_average_ranks(x), _average_ranks(y))


def quality(estimated: np.ndarray, true: np.ndarray) -> dict:
    """rows, MAE, Pearson and Spearman correlation of estimated against true margins."""
    x, y = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    return {
        "rows": len(x),
        "mae": float(np.abs(x - y).mean()) if len(x) else None,
        "pearson": _pearson(x, y),
        "spearman": rank_correlation(x, y),
    }
