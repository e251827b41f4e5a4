"""The prune stage on real shards: kept set == in-memory reference (ids and eps per id) for every
strategy, in-process and on a real local Ray; manifest counts; rerun/skip; extrapolation; bad
input refused with nothing written. Score and embedding shards are written here directly in the
layout `puma-ray score` produces, with margins we control (many exact ties)."""

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
]
EMB_DIM = 6


def _cfg(*sets):
    return load_config(None, BASE + list(sets))


def _quiet(_msg):
    pass


def _samples(run_dir):
    from puma_ray.data import dataset_dirs, open_dataset

    return open_dataset(dataset_dirs(run_dir)[0])


def _write_scores(run_dir, margin_of, *, only=None, manifest=None, norm="l2"):
    """Score shards as `puma-ray score` lays them out: scores/shard=part-XXXXX/*.parquet."""
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
        table = pa.table(
            {
                "id": t.column("id"),
                "label": t.column("label"),
                "source": t.column("source"),
                "margin": pa.array(margin_of(ids), pa.float32()),
                "pred": zeros16,
                "adv_class": zeros16,
                "iters": zeros16,
                "converged": pa.array(np.ones(n, bool)),
                "seconds": pa.array(np.zeros(n, np.float32)),
            }
        )
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


def _check_against_reference(cfg, run_dir, out_dir, margin_of=_tie_margins):
    ids, labels, synth, margins = _all_rows(run_dir, margin_of)
    params = SelectionParams.from_config(cfg.pruning, cfg.training.attack.epsilon)
    ref = sel.select_reference(ids, labels, synth, margins, params)
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
# Extrapolation.


def test_extrapolated_recovers_smooth_margins_and_saves_scoring(run_dir):
    fraction, seed = 0.3, 4
    in_subset = lambda ids: sel.extrapolation_subset(ids, fraction, seed)  # noqa: E731
    _write_scores(run_dir, _smooth_margin, only=in_subset)
    cfg = _cfg(
        "pruning.strategy=extrapolated",
        f"pruning.extrapolation.scored_fraction={fraction}",
        f"pruning.seed={seed}",
    )
    summary = run_prune(cfg, run_dir, parallel=False, log=_quiet)
    ex_dir = os.path.join(run_dir, "extrapolated")
    files = [os.path.join(ex_dir, f) for f in os.listdir(ex_dir) if f.endswith(".parquet")]
    ex = pads.dataset(files, format="parquet").to_table()
    ids = ex.column("id").to_numpy()
    margin = ex.column("margin").to_numpy()
    scored = ex.column("scored").to_numpy(zero_copy_only=False)
    truth = _smooth_margin(ids)
    assert np.array_equal(scored, in_subset(ids))
    assert np.array_equal(margin[scored], truth[scored])  # scored rows: exact
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(ranks(margin[~scored]), ranks(truth[~scored]))[0, 1]
    assert rho > 0.9
    e = _manifest(os.path.join(run_dir, "kept"))["extrapolation"]
    assert e["scored_rows"] == int(scored.sum())
    assert e["scoring_compute_saved"] == pytest.approx(1 - scored.mean())
    assert "scoring compute saved" in summary.format()
    # the selection itself runs on the extrapolated margins, exactly
    by_id = dict(zip(ids.tolist(), margin.tolist(), strict=True))
    lookup = lambda q: np.array([by_id[i] for i in q], np.float32)  # noqa: E731
    _check_against_reference(cfg, run_dir, os.path.join(run_dir, "kept"), margin_of=lookup)
    # a new ratio reuses the extrapolated margins (same inputs) and only reselects
    said = []
    cfg = _cfg(*cfg_sets(cfg), "pruning.ratio=0.5")
    run_prune(cfg, run_dir, parallel=False, log=said.append)
    assert any("extrapolated margins" in m and "up to date" in m for m in said)
    _check_against_reference(cfg, run_dir, os.path.join(run_dir, "kept"), margin_of=lookup)


def cfg_sets(cfg):
    p = cfg.pruning
    return [
        f"pruning.strategy={p.strategy}",
        f"pruning.extrapolation.scored_fraction={p.extrapolation.scored_fraction}",
        f"pruning.seed={p.seed}",
    ]


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
def test_ray_extrapolation(ray_local, run_dir):
    in_subset = lambda ids: sel.extrapolation_subset(ids, 0.2, 0)  # noqa: E731
    _write_scores(run_dir, _smooth_margin, only=in_subset)
    cfg = _cfg("pruning.strategy=extrapolated", "pruning.extrapolation.scored_fraction=0.2")
    summary = run_prune(cfg, run_dir, log=_quiet)
    assert summary.mode == "ray tasks"
    assert summary.extrapolation["scoring_compute_saved"] > 0.7
