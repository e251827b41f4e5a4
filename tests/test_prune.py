"""The prune stage on real shards: kept set == in-memory reference (ids and eps per id) for every
strategy and row policy, in-process and on a real local Ray; manifest counts; rerun/skip;
extrapolation; bad input refused with nothing written. Score and embedding shards are written
here directly in the layout `puma-ray score` produces, with margins we control (many exact
ties) and flags we control (a row with margin 0 is misclassified, ~10% did not converge)."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from puma_ray import selection as sel
from puma_ray.config import load_config
from puma_ray.errors import ConfigError, DataError
from puma_ray.prune import run_prune
from puma_ray.selection import SelectionParams

BASE = [
    "data.sources=[{type: builtin, real_train: 300, synthetic: 700, real_test: 100}]",
    "data.rows_per_shard=250",
    "data.validation=0",  # these tests count every training row
]
EMB_DIM = 6


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


def _samples(run_dir):
    from puma_ray.data import dataset_dirs, open_dataset

    return open_dataset(dataset_dirs(run_dir)[0])


def _converged_of(ids):
    """~10% of the rows did not converge, by a hash of the id."""
    return sel.hash_ids(ids, 77).astype(np.float64) / 2**64 >= 0.1


def _write_scores(
    run_dir, margin_of, *, only=None, manifest=None, norm="l2", converged_of=_converged_of,
    flags=True,
):  # fmt: skip
    """Score shards as `puma-ray score` lays them out: scores/shard=part-XXXXX/*.parquet. A row
    is misclassified (pred != label) iff its margin is <= 0; `flags=False` writes neither
    `pred` nor `converged` (scores of an older layout)."""
    data = _samples(run_dir)
    shutil.rmtree(os.path.join(run_dir, "scores"), ignore_errors=True)
    for f in data.files:
        t = pq.read_table(f, columns=["id", "label", "source"])
        ids = t.column("id").to_numpy()
        keep = np.ones(len(ids), bool) if only is None else only(ids)
        t, ids = t.filter(pa.array(keep)), ids[keep]
        n = len(ids)
        name = os.path.basename(f).rsplit(".", 1)[0]
        d = os.path.join(run_dir, "scores", f"shard={name}")
        os.makedirs(d)
        zeros16 = pa.array(np.zeros(n, np.int16))
        margins = margin_of(ids)
        labels = t.column("label").to_numpy().astype(np.int16)
        columns = {
            "id": t.column("id"),
            "label": t.column("label"),
            "source": t.column("source"),
            "margin": pa.array(margins, pa.float32()),
            "pred": pa.array(np.where(margins > 0, labels, (labels + 1) % 10).astype(np.int16)),
            "adv_class": zeros16,
            "iters": zeros16,
            "converged": pa.array(converged_of(ids)),
            "seconds": pa.array(np.zeros(n, np.float32)),
        }
        if not flags:
            del columns["pred"], columns["converged"]
        table = pa.table(columns)
        pq.write_table(table.take(np.argsort(-ids)), os.path.join(d, "0.parquet"))  # any order
    state = {
        "margin_model_fingerprint": "m0",
        "dataset_fingerprint": data.info.fingerprint,
        "deepfool": {"norm": norm, "overshoot": 0.02, "max_iter": 50},
    }
    manifest = manifest or {"kind": "margins", "state": state, "state_fingerprint": f"s-{norm}"}
    with open(os.path.join(run_dir, "scores", "manifest.json"), "w") as fh:
        json.dump(manifest, fh)


def _embedding_of(ids):
    """A 6-dim embedding that is essentially 2-dimensional, deterministic per id."""
    rng = np.random.default_rng(ids.astype(np.uint64) % np.uint64(2**32))
    base = rng.normal(size=(len(ids), EMB_DIM)) if len(ids) else np.zeros((0, EMB_DIM))
    return (base * np.array([1, 1, 0.05, 0.05, 0.05, 0.05])).astype(np.float16)


def _embeddings_rowwise(ids):
    return np.stack([_embedding_of(np.array([i]))[0] for i in ids]) if len(ids) else None


def _smooth_margin(ids):
    e = _embeddings_rowwise(ids).astype(np.float64)
    return (0.3 + 0.2 * np.sin(e[:, 0]) + 0.1 * e[:, 1] ** 2).astype(np.float32)


def _write_embeddings(run_dir):
    data = _samples(run_dir)
    for f in data.files:
        ids = pq.read_table(f, columns=["id"]).column("id").to_numpy()
        emb = _embeddings_rowwise(ids)
        name = os.path.basename(f).rsplit(".", 1)[0]
        d = os.path.join(run_dir, "embeddings", f"shard={name}")
        os.makedirs(d)
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), EMB_DIM)
        pq.write_table(pa.table({"id": pa.array(ids), "embedding": col}), f"{d}/0.parquet")
    manifest = {
        "kind": "embeddings",
        "state": {"dataset_fingerprint": data.info.fingerprint},
        "state_fingerprint": "e0",
    }
    with open(os.path.join(run_dir, "embeddings", "manifest.json"), "w") as fh:
        json.dump(manifest, fh)


def _tie_margins(ids):
    """Margins with heavy exact ties: ~40% are 0 (misclassified), ~15% exactly 0.125."""
    h = sel.hash_ids(ids, 99).astype(np.float64) / 2**64
    m = np.exp(-4 + 4 * h).astype(np.float32)
    m[h < 0.4] = 0.0
    m[(h > 0.5) & (h < 0.65)] = 0.125
    return m


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from puma_ray.ingest import run_ingest

    run_dir = str(tmp_path_factory.mktemp("prune_base"))
    run_ingest(_cfg(), run_dir, parallel=False, log=_quiet)
    _write_scores(run_dir, _tie_margins)
    _write_embeddings(run_dir)
    return run_dir


@pytest.fixture
def run_dir(base_run, tmp_path):
    """A private copy of the base run (tests that change inputs or write into run_dir/kept)."""
    d = str(tmp_path / "run")
    shutil.copytree(base_run, d)
    return d


def _all_rows(run_dir, margin_of=_tie_margins):
    t = pads.dataset(_samples(run_dir).files, format="parquet").to_table(
        columns=["id", "label", "source"]
    )
    ids = t.column("id").to_numpy()
    synth = np.asarray(t.column("source").to_pylist()) == "synthetic"
    return ids, t.column("label").to_numpy(), synth, margin_of(ids)


def _kept(out_dir):
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet"))
    t = pa.concat_tables([pq.read_table(os.path.join(out_dir, f)) for f in files])
    assert t.schema.names == ["id", "image", "label", "source", "eps"]
    assert t.schema.field("eps").type == pa.float32()
    return dict(zip(t.column("id").to_pylist(), t.column("eps").to_numpy().tolist(), strict=True))


def _check_against_reference(cfg, run_dir, out_dir, margin_of=_tie_margins, flags_of=None):
    """The kept set equals `select_reference` on all rows; `flags_of(ids)` -> (misclassified,
    converged), by default what `_write_scores` wrote."""
    ids, labels, synth, margins = _all_rows(run_dir, margin_of)
    params = SelectionParams.from_config(cfg.pruning, cfg.training.attack.epsilon)
    mis, conv = (flags_of or (lambda q: (margin_of(q) <= 0, _converged_of(q))))(ids)
    ref = sel.select_reference(
        ids, labels, synth, margins, params, misclassified=mis, converged=conv
    )
    got = _kept(out_dir)
    assert set(got) == set(ids[ref.kept].tolist())
    want = dict(zip(ids[ref.kept].tolist(), ref.eps[ref.kept].tolist(), strict=True))
    assert got == want  # exact float32 equality per id
    digest = sel.selection_digest(ids[ref.kept], ref.eps[ref.kept])
    assert _manifest(out_dir)["selection_digest"] == f"{digest:016x}"
    return ref


def _manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json")) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------------------
# Kept set == reference.

STRATEGY_SETS = [
    ["pruning.strategy=puma", "pruning.eps_rule=scale_lowest", "pruning.eps_quantile=0.5"],
    ["pruning.strategy=puma", "pruning.eps_rule=margin_cap", "scoring.norm=linf"],
    ["pruning.strategy=high_margin"],
    ["pruning.strategy=low_margin"],
    ["pruning.strategy=random", "pruning.seed=5"],
    ["pruning.strategy=none"],
]


@pytest.mark.parametrize("sets", STRATEGY_SETS, ids=lambda s: "-".join(x.split("=")[1] for x in s))
@pytest.mark.parametrize("scope,per_class", [("synthetic", True), ("all", False)])
def test_every_strategy_equals_reference_in_process(base_run, tmp_path, sets, scope, per_class):
    cfg = _cfg(*sets, f"pruning.scope={scope}", f"pruning.per_class={per_class}")
    run = base_run
    if cfg.scoring.norm == "linf":  # margin_cap: scores must be measured in the attack's norm
        run = str(tmp_path / "run")
        shutil.copytree(base_run, run)
        _write_scores(run, _tie_margins, norm="linf")
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, run, parallel=False, out_dir=out, collect_limit=8, log=_quiet)
    ref = _check_against_reference(cfg, run, out)
    assert summary.kept == int(ref.kept.sum()) and summary.mode == "in-process"
    assert summary.kept + summary.pruned == summary.rows == 1000


def test_ratio_zero_keeps_everything(base_run, tmp_path):
    cfg = _cfg("pruning.ratio=0", "pruning.eps_quantile=0")
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, base_run, parallel=False, out_dir=out, log=_quiet)
    assert summary.kept == 1000 and summary.eps_adjusted == 0
    assert set(_kept(out).values()) == {np.float32(cfg.training.attack.epsilon).item()}


def test_kept_rows_are_the_sample_rows(base_run, tmp_path):
    cfg = _cfg()
    out = str(tmp_path / "kept")
    run_prune(cfg, base_run, parallel=False, out_dir=out, log=_quiet)
    for f in _samples(base_run).files:
        src = pq.read_table(f)
        dst = pq.read_table(os.path.join(out, os.path.basename(f)))
        assert dst.schema.metadata == src.schema.metadata  # image shape travels along
        rows = {r["id"]: r for r in src.to_pylist()}
        for r in dst.to_pylist():
            assert {k: r[k] for k in ("image", "label", "source")} == {
                k: rows[r["id"]][k] for k in ("image", "label", "source")
            }


def test_manifest_counts_add_up_and_name_the_cuts(base_run, tmp_path):
    cfg = _cfg("pruning.eps_quantile=0.2")
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, base_run, parallel=False, out_dir=out, log=_quiet)
    m = _manifest(out)
    c = m["counts"]
    assert c["kept"] + c["pruned"] == c["rows"] == 1000
    assert sum(s["kept"] + s["pruned"] for s in c["per_source"].values()) == 1000
    assert c["per_source"]["real"] == {"rows": 300, "kept": 300, "pruned": 0, "eps_adjusted": 0}
    assert sum(p["kept"] + p["pruned"] for p in c["per_class"]) == 1000
    assert sum(p["eps_adjusted"] for p in c["per_class"]) == c["eps_adjusted"] > 0
    assert sum(s["rows"] for s in m["shards"]) == c["kept"]
    assert len(m["shards"]) == len(_samples(base_run).files)
    assert len(m["groups"]) == 10  # per class
    for g in m["groups"]:
        assert g["kept"] + g["pruned"] == g["rows"]
        assert set(g["cuts"]) == {"keep_until", "eps_0.2"}
        assert {"margin", "id"} <= set(g["cuts"]["keep_until"])
    assert m["inputs"]["dataset"] == _samples(base_run).info.fingerprint
    assert m["inputs"]["scores"] == "s-l2"
    assert m["parameters"]["pruning"]["ratio"] == 0.3
    assert os.path.getsize(os.path.join(out, "margin_hist.png")) > 1000
    text = summary.format()
    assert "synthetic" in text and "pruned" in text and "cut margin" in text


def test_rerun_skips_and_changes_rewrite(run_dir):
    cfg = _cfg()
    first = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    out = os.path.join(run_dir, "kept")
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    again = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    assert again.skipped_stage and again.kept == first.kept
    assert "up to date" in again.format()
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
    forced = run_prune(cfg, run_dir, parallel=False, force=True, log=_quiet)
    assert not forced.skipped_stage
    changed = run_prune(_cfg("pruning.ratio=0.6"), run_dir, parallel=False, log=_quiet)
    assert not changed.skipped_stage and changed.kept < first.kept
    assert _manifest(out)["parameters"]["pruning"]["ratio"] == 0.6
    _check_against_reference(_cfg("pruning.ratio=0.6"), run_dir, out)


def test_random_and_none_need_no_scores(run_dir):
    shutil.rmtree(os.path.join(run_dir, "scores"))
    cfg = _cfg("pruning.strategy=random", "pruning.scope=all", "pruning.per_class=false")
    summary = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    out = os.path.join(run_dir, "kept")
    _check_against_reference(cfg, run_dir, out)
    assert summary.kept == 700
    assert not os.path.exists(os.path.join(out, "margin_hist.png"))  # nothing to plot
    assert (
        run_prune(_cfg("pruning.strategy=none"), run_dir, parallel=False, log=_quiet).kept == 1000
    )


# ----------------------------------------------------------------------------------------------
# Row policies: misclassified (margin 0 here) and non-converged rows.


def _treatment(mis_policy, nc_policy, mis, nc):
    """How each row is treated, the rules of docs/pruning.md written out row by row."""
    out = np.full(len(mis), "ranked", object)
    out[nc & (nc_policy == "exclude")] = "kept_base_eps"
    if nc_policy == "rank_last":
        out[nc & ~mis] = "above_converged"
        out[nc & mis] = "below_converged"
    if nc_policy == "rank_first":
        out[nc] = "below_converged"
    if mis_policy != "eps_rule":  # the misclassified policy comes first
        out[mis] = "dropped" if mis_policy == "drop" else "kept_base_eps"
    return out


POLICY_SETS = [("drop", "rank_last"), ("base_eps", "exclude"), ("eps_rule", "rank_first")]


@pytest.mark.parametrize("mis_policy,nc_policy", POLICY_SETS)
def test_policies_equal_reference_and_are_counted(base_run, tmp_path, mis_policy, nc_policy):
    cfg = _cfg(f"pruning.misclassified={mis_policy}", f"pruning.nonconverged={nc_policy}")
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, base_run, parallel=False, out_dir=out, collect_limit=4, log=_quiet)
    ref = _check_against_reference(cfg, base_run, out)
    ids, _, synth, margins = _all_rows(base_run)
    mis, nc = margins <= 0, ~_converged_of(ids)
    eps = np.float32(cfg.training.attack.epsilon)
    status = np.where(ref.kept, np.where(ref.eps != eps, "eps_adjusted", "kept_base_eps"),
                      "pruned")  # fmt: skip
    treated = _treatment(mis_policy, nc_policy, mis, nc)
    p = _manifest(out)["policies"]
    for flag, rows in (("misclassified", mis), ("nonconverged", nc)):
        got = p[flag]
        assert got["policy"] == (mis_policy if flag == "misclassified" else nc_policy)
        assert got["rows"] == int(rows.sum()) and got["in_scope"] == int((rows & synth).sum())
        for name, n in got["treated"].items():
            assert n == int((rows & synth & (treated == name)).sum()), (flag, name)
        for name, n in got["outcome"].items():
            assert n == int((rows & synth & (status == name)).sum()), (flag, name)
    assert p["misclassified"]["in_scope"] > 50 and p["nonconverged"]["in_scope"] > 30
    text = summary.format()
    assert f"misclassified: {int(mis.sum()):,} rows" in text and "non-converged:" in text
    assert f"misclassified {mis_policy}, non-converged {nc_policy}" in summary.description


def test_policies_need_flagged_scores(run_dir):
    _write_scores(run_dir, _tie_margins, flags=False)  # an older score layout
    with pytest.raises(DataError, match=r"no pred/converged column.*nonconverged=as_is"):
        run_prune(_cfg(), run_dir, parallel=False, log=_quiet)  # rank_last needs them
    assert _nothing_written(run_dir)
    cfg = _cfg("pruning.nonconverged=as_is")  # no policy: no flags needed
    run_prune(cfg, run_dir, parallel=False, log=_quiet)
    kept = os.path.join(run_dir, "kept")
    ids = _all_rows(run_dir)[0]
    _check_against_reference(cfg, run_dir, kept, flags_of=lambda q: (None, None))
    assert _manifest(kept)["policies"] is None and len(ids) == 1000


# ----------------------------------------------------------------------------------------------
# Extrapolation.


def _extrapolated_table(run_dir):
    ex_dir = os.path.join(run_dir, "extrapolated")
    files = [os.path.join(ex_dir, f) for f in os.listdir(ex_dir) if f.endswith(".parquet")]
    t = pads.dataset(files, format="parquet").to_table()
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.schema.names}


def _readers(ex):
    """(margin_of, flags_of) reading an extrapolated table by id, for _check_against_reference."""
    pos = {int(i): j for j, i in enumerate(ex["id"])}

    def at(col):
        return lambda q: ex[col][[pos[int(i)] for i in q]]

    return (
        lambda q: at("margin")(q).astype(np.float32),
        lambda q: (at("misclassified")(q).astype(bool), at("converged")(q).astype(bool)),
    )


def _extrapolation_sets(fraction, seed, *more):
    return [
        "pruning.strategy=extrapolated",
        f"pruning.extrapolation.scored_fraction={fraction}",
        f"pruning.seed={seed}",
        *more,
    ]


def test_extrapolated_exact_recovers_smooth_margins_and_saves_scoring(run_dir):
    """`rank_scored: exact`, any class: scored rows keep their margin, the others get the
    k-NN mean (the behaviour before `same_class` and leave-one-out estimates)."""
    fraction, seed = 0.3, 4
    in_subset = lambda ids: sel.extrapolation_subset(ids, fraction, seed)  # noqa: E731
    _write_scores(run_dir, _smooth_margin, only=in_subset)
    sets = _extrapolation_sets(
        fraction, seed, "pruning.extrapolation.rank_scored=exact",
        "pruning.extrapolation.same_class=false",
    )  # fmt: skip
    cfg = _cfg(*sets)
    summary = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    ex = _extrapolated_table(run_dir)
    ids, margin, scored = ex["id"], ex["margin"], ex["scored"]
    truth = _smooth_margin(ids)
    assert np.array_equal(scored, in_subset(ids))
    assert np.array_equal(margin[scored], truth[scored])  # scored rows: exact
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(ranks(margin[~scored]), ranks(truth[~scored]))[0, 1]
    assert rho > 0.9
    # flags: known for the scored rows (all correct here), the estimated ones count as fine
    assert not ex["misclassified"].any()
    assert np.array_equal(ex["converged"], ~scored | _converged_of(ids))
    e = _manifest(os.path.join(run_dir, "kept"))["extrapolation"]
    assert e["scored_rows"] == int(scored.sum())
    assert e["scoring_compute_saved"] == pytest.approx(1 - scored.mean())
    assert "scoring compute saved" in summary.format()
    # the selection itself runs on the extrapolated margins, exactly
    margin_of, flags_of = _readers(ex)
    kept = os.path.join(run_dir, "kept")
    _check_against_reference(cfg, run_dir, kept, margin_of=margin_of, flags_of=flags_of)
    # a new ratio reuses the extrapolated margins (same inputs) and only reselects
    said = []
    cfg = _cfg(*sets, "pruning.ratio=0.5")
    run_prune(cfg, run_dir, parallel=False, log=said.append)
    assert any("extrapolated margins" in m and "up to date" in m for m in said)
    _check_against_reference(cfg, run_dir, kept, margin_of=margin_of, flags_of=flags_of)


def _loo_same_class(ids, labels, emb, margins, scored, k):
    """Brute force: each row's mean margin over its k nearest scored rows of its class, never
    itself."""
    out = np.empty(len(ids))
    e = emb.astype(np.float64)
    for i in range(len(ids)):
        use = scored & (labels == labels[i])
        use[i] = False
        d = ((e[use] - e[i]) ** 2).sum(axis=1)
        out[i] = margins[use][np.argsort(d, kind="stable")[:k]].mean()
    return out


def test_extrapolated_defaults_rank_every_row_by_its_same_class_estimate(run_dir):
    fraction, seed = 0.4, 2
    in_subset = lambda ids: sel.extrapolation_subset(ids, fraction, seed)  # noqa: E731
    _write_scores(run_dir, _smooth_margin, only=in_subset)
    cfg = _cfg(*_extrapolation_sets(fraction, seed, "pruning.extrapolation.k=5"))
    assert (cfg.pruning.extrapolation.same_class, cfg.pruning.extrapolation.rank_scored) == (
        True, "estimate"
    )  # fmt: skip
    summary = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    ex = _extrapolated_table(run_dir)
    ids, labels, scored = ex["id"], ex["label"].astype(np.int64), ex["scored"]
    truth = _smooth_margin(ids)
    want = _loo_same_class(ids, labels, _embeddings_rowwise(ids), truth, scored, 5)
    np.testing.assert_allclose(ex["margin"], want, rtol=1e-5)  # scored rows too: leave-one-out
    # the held-out check: a hash-chosen ~20% of the scored rows, estimate against truth
    held = scored & sel.holdout_subset(ids, 0.2, seed)
    h = _manifest(os.path.join(run_dir, "kept"))["extrapolation"]["holdout"]
    assert h["rows"] == int(held.sum()) > 30 and h["fraction"] == 0.2
    from puma_ray.selection.knn import rank_correlation

    assert h["spearman"] == pytest.approx(rank_correlation(want[held], truth[held]), abs=1e-6)
    assert h["mae"] == pytest.approx(np.abs(want[held] - truth[held]).mean(), rel=1e-4)
    assert h["spearman"] > 0.7  # measured: 0.87 on 76 held-out rows
    assert "Spearman" in summary.format() and "same class" in summary.format()
    margin_of, flags_of = _readers(ex)
    kept = os.path.join(run_dir, "kept")
    _check_against_reference(cfg, run_dir, kept, margin_of=margin_of, flags_of=flags_of)
    # the policies only know the scored rows' flags
    p = _manifest(kept)["policies"]
    assert p["nonconverged"]["rows"] == int((scored & ~_converged_of(ids)).sum())
    assert "scored rows only" in p["flags_known_for"]


def test_extrapolated_same_class_needs_scored_rows_in_every_class(run_dir):
    in_subset = lambda ids: sel.extrapolation_subset(ids, 0.003, 0)  # noqa: E731
    margin_of = lambda ids: _smooth_margin(ids) if len(ids) else np.zeros(0)  # noqa: E731
    _write_scores(run_dir, margin_of, only=in_subset)
    cfg = _cfg(*_extrapolation_sets(0.003, 0))  # ~3 scored rows for 10 classes
    with pytest.raises(DataError, match="has no scored row.*same_class=false"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    assert not os.path.exists(os.path.join(run_dir, "kept"))


def test_extrapolated_refuses_missing_embeddings_and_subset_scores(run_dir):
    cfg = _cfg("pruning.strategy=extrapolated", "pruning.extrapolation.scored_fraction=0.3")
    shutil.rmtree(os.path.join(run_dir, "embeddings"))
    with pytest.raises(DataError, match="score --embeddings"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    _write_embeddings(run_dir)
    _write_scores(run_dir, _smooth_margin, only=lambda ids: ids % 2 == 0)  # the wrong subset
    with pytest.raises(DataError, match="extrapolation subset"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    assert not os.path.exists(os.path.join(run_dir, "kept"))


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing written.


def _nothing_written(run_dir):
    return not os.path.exists(os.path.join(run_dir, "kept", "manifest.json"))


def test_missing_scores_manifest(run_dir):
    os.remove(os.path.join(run_dir, "scores", "manifest.json"))
    with pytest.raises(DataError, match=r"run `puma-ray score` first"):
        run_prune(_cfg(), run_dir, parallel=False, log=_quiet)
    assert _nothing_written(run_dir)


def test_scores_of_another_dataset(run_dir):
    _write_scores(run_dir, _tie_margins, manifest={"state": {"dataset_fingerprint": "other"}})
    with pytest.raises(DataError, match="different dataset"):
        run_prune(_cfg(), run_dir, parallel=False, log=_quiet)


def test_scores_missing_ids_keep_the_old_kept_set(run_dir):
    cfg = _cfg()
    run_prune(cfg, run_dir, parallel=False, log=_quiet)
    before = _manifest(os.path.join(run_dir, "kept"))
    _write_scores(run_dir, _tie_margins, only=lambda ids: ids != ids.max())
    with pytest.raises(DataError, match=r"does not cover sample shard .*1 of its 250"):
        run_prune(_cfg("pruning.ratio=0.5"), run_dir, parallel=False, log=_quiet)
    assert _manifest(os.path.join(run_dir, "kept")) == before  # untouched


def test_nan_margin_names_the_shard(run_dir):
    def with_nan(ids):
        m = _tie_margins(ids)
        m[ids == ids.min()] = np.nan
        return m

    _write_scores(run_dir, with_nan)
    with pytest.raises(DataError, match=r"shard=part-0000\d: 1 NaN margins"):
        run_prune(_cfg(), run_dir, parallel=False, log=_quiet)
    assert not os.path.exists(os.path.join(run_dir, "kept"))


def test_margin_cap_needs_matching_norms(run_dir):
    cfg = _cfg("pruning.eps_rule=margin_cap")  # default scoring.norm l2, attack linf
    with pytest.raises(ConfigError, match=r"scoring\.norm \(l2\).*training\.attack\.norm \(linf\)"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    cfg = _cfg("pruning.eps_rule=margin_cap", "scoring.norm=linf")  # but scores were l2
    with pytest.raises(ConfigError, match="rescore with scoring.norm=linf"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    cfg = _cfg("pruning.eps_rule=margin_cap", "scoring.norm=linf", "pruning.eps_floor=0.5")
    with pytest.raises(ConfigError, match="eps_floor"):
        run_prune(cfg, run_dir, parallel=False, log=_quiet)
    assert _nothing_written(run_dir)


# ----------------------------------------------------------------------------------------------
# The same stage on a real local Ray: tasks per shard, identical result.


@pytest.mark.parametrize(
    "sets",
    [
        ["pruning.eps_quantile=0.3"],
        ["pruning.strategy=low_margin", "pruning.per_class=false", "pruning.scope=all"],
        ["pruning.strategy=random", "pruning.seed=2"],
    ],
)
@pytest.mark.ray
def test_ray_tasks_equal_reference(ray_local, base_run, tmp_path, sets):
    cfg = _cfg(*sets)
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, base_run, out_dir=out, collect_limit=4, log=_quiet)
    assert summary.mode == "ray tasks"
    _check_against_reference(cfg, base_run, out)


@pytest.mark.ray
def test_ray_errors_surface_as_one_line(ray_local, run_dir):
    _write_scores(run_dir, _tie_margins, only=lambda ids: ids % 50 != 0)
    with pytest.raises(DataError, match="does not cover") as err:
        run_prune(_cfg(), run_dir, log=_quiet)
    assert "\n" not in str(err.value)
    assert _nothing_written(run_dir)


@pytest.mark.ray
@pytest.mark.parametrize("mis_policy,nc_policy", POLICY_SETS[:2])
def test_ray_policies_equal_reference(ray_local, base_run, tmp_path, mis_policy, nc_policy):
    cfg = _cfg(f"pruning.misclassified={mis_policy}", f"pruning.nonconverged={nc_policy}")
    out = str(tmp_path / "kept")
    summary = run_prune(cfg, base_run, out_dir=out, collect_limit=4, log=_quiet)
    assert summary.mode == "ray tasks"
    _check_against_reference(cfg, base_run, out)
    here = str(tmp_path / "kept_in_process")
    run_prune(cfg, base_run, parallel=False, out_dir=here, collect_limit=4, log=_quiet)
    assert _manifest(out)["policies"] == _manifest(here)["policies"]


@pytest.mark.ray
def test_ray_extrapolation(ray_local, run_dir, tmp_path):
    """Under Ray (the reference set in the object store, one k-NN task per shard) the
    extrapolated margins, the held-out check and the kept set equal the in-process run's."""
    in_subset = lambda ids: sel.extrapolation_subset(ids, 0.4, 0)  # noqa: E731
    _write_scores(run_dir, _smooth_margin, only=in_subset)
    here = str(tmp_path / "here")
    shutil.copytree(run_dir, here)
    cfg = _cfg("pruning.strategy=extrapolated", "pruning.extrapolation.scored_fraction=0.4")
    summary = run_prune(cfg, run_dir, log=_quiet)
    assert summary.mode == "ray tasks"
    assert summary.extrapolation["scoring_compute_saved"] > 0.5
    local = run_prune(cfg, here, parallel=False, log=_quiet)
    a, b = _extrapolated_table(run_dir), _extrapolated_table(here)
    order_a, order_b = np.argsort(a["id"]), np.argsort(b["id"])
    for col in a:
        assert np.array_equal(a[col][order_a], b[col][order_b]), col
    assert summary.extrapolation["holdout"] == local.extrapolation["holdout"]
    assert summary.extrapolation["holdout"]["rows"] > 30
    kept_a = _manifest(os.path.join(run_dir, "kept"))
    assert kept_a["selection_digest"] == _manifest(os.path.join(here, "kept"))["selection_digest"]
