"""Scoring stage on a real local Ray: equals the single-process engine, exactly once, resumable,
survives a killed actor, and refuses bad inputs before any work."""

import json
import os
import signal
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from puma_ray import storage
from puma_ray.config import load_config
from puma_ray.errors import CheckpointError, DataError

ROWS_PER_SHARD = 100
SCORE_COLUMNS = ("id", "label", "source", "margin", "pred", "adv_class", "iters", "converged")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _cfg(**over):
    sets = [
        "data.sources=[{type: builtin, real_train: 200, real_test: 50, synthetic: 400}]",
        f"data.rows_per_shard={ROWS_PER_SHARD}",
        "data.validation=0",  # these tests count every training row
        "margin_model.checkpoint=null",  # they score with the model they train
        "scoring.max_iter=20",
        "scoring.batch_size=32",
        "scoring.pool_min=2",
        "scoring.pool_max=2",
    ]
    return load_config(None, sets + [f"{k}={v}" for k, v in over.items()])


def _train_margin_model(run_dir, cfg, num_classes=10):
    """A briefly trained small CNN, so margins vary (a random net misclassifies almost all)."""
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = open_dataset(dataset_dirs(run_dir)[0])
    model.train()
    for _ in range(8):
        for batch in data.iter_batches(batch_size=64):
            x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
            loss = torch.nn.functional.cross_entropy(
                model(x), torch.from_numpy(batch.labels) % num_classes
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = os.path.join(run_dir, "margin_model", "model.pt")
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, ray_local):
    from puma_ray.ingest import run_ingest
    from puma_ray.score import run_score

    run_dir = str(tmp_path_factory.mktemp("score_run"))
    cfg = _cfg()
    run_ingest(cfg, run_dir, parallel=False)
    _train_margin_model(run_dir, cfg)
    summary = run_score(cfg, run_dir, log=lambda _m: None)
    return run_dir, cfg, summary


def _scores(run_dir, sub="scores"):
    fs, path = storage.resolve(os.path.join(run_dir, sub))
    ds = pads.dataset(
        path, filesystem=fs, format="parquet", partitioning="hive", exclude_invalid_files=True
    )  # skip manifest.json and state.json beside the partitions
    table = ds.to_table()
    return table.sort_by("id").to_pydict()


def test_scores_equal_single_process_engine(scored_run):
    from puma_ray.attacks import deepfool
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.models import load_checkpoint

    run_dir, cfg, summary = scored_run
    model, _ = load_checkpoint(os.path.join(run_dir, "margin_model", "model.pt"))
    model.eval()
    data = open_dataset(dataset_dirs(run_dir)[0])
    ids, margins, iters, adv = [], [], [], []
    for batch in data.iter_batches(batch_size=600):
        x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
        res = deepfool(
            model,
            x,
            torch.from_numpy(batch.labels),
            norm="l2",
            max_iter=20,
            overshoot=0.02,
            signed=True,  # scoring.signed defaults to true
        )
        ids.append(batch.ids)
        margins.append(res.margin.numpy())
        iters.append(res.iters.numpy())
        adv.append(res.adv_class.numpy())
    order = np.argsort(np.concatenate(ids))
    ref_margin = np.concatenate(margins)[order]
    got = _scores(run_dir)
    assert np.array_equal(np.sort(np.concatenate(ids)), np.array(got["id"]))
    margin, ref_iters = np.array(got["margin"]), np.concatenate(iters)[order]
    # A conv's rounding depends on the batch it runs in (the actors' 32 rows, here 600), and a
    # DeepFool walk divides by gradient differences, so a few rows drift further than rounding:
    # nearly every row the model gets right (1-3 steps) agrees to 1e-4 with the same step count,
    # and every row, the long walks back of misclassified ones included, agrees to 2e-3 and
    # within one step.
    right = ref_margin > 0
    got_iters = np.array(got["iters"])
    tight = np.isclose(margin, ref_margin, rtol=1e-4, atol=1e-6)
    assert tight[right].mean() >= 0.97, f"{(~tight[right]).sum()} of {right.sum()} rows drift"
    np.testing.assert_allclose(margin, ref_margin, rtol=2e-3, atol=1e-5)
    assert (got_iters[right] == ref_iters[right]).mean() >= 0.97
    assert np.abs(got_iters - ref_iters).max() <= 1
    assert (np.array(got["adv_class"]) == np.concatenate(adv)[order]).mean() >= 0.99
    # the margin model is imperfect: some margins are negative (misclassified, signed), most
    # are positive
    assert 0 < summary.misclassified < summary.rows
    wrong = np.array(got["pred"]) != np.array(got["label"])
    assert np.array_equal(np.array(got["margin"]) < 0, wrong)
    assert (np.array(got["margin"]) > 0).sum() > summary.rows // 4


def test_exactly_once_and_manifest(scored_run):
    run_dir, cfg, summary = scored_run
    got = _scores(run_dir)
    assert summary.rows == 600 and summary.shards_total == 6
    assert len(got["id"]) == 600 and len(set(got["id"])) == 600
    manifest = json.loads(open(os.path.join(run_dir, "scores", "manifest.json")).read())
    assert manifest["rows_per_shard"] == {f"part-{i:05d}": ROWS_PER_SHARD for i in range(6)}
    assert manifest["state"]["deepfool"]["max_iter"] == 20
    assert manifest["pool_max"] == 2
    assert sum(sum(c) for c in manifest["margin_histogram"]["counts"].values()) == 600
    assert set(summary.quantiles) == {"real", "synthetic"}


def _copy_of(run_dir, tmp_path, cfg, **kw):
    """A private copy of the scored run, and a config whose margin model is the original's
    checkpoint (the path is part of the scores' state: the copy's scores stay valid)."""
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy, **kw)
    cfg_copy = cfg.model_copy(deep=True)
    cfg_copy.margin_model.checkpoint = os.path.join(run_dir, "margin_model", "model.pt")
    return copy, cfg_copy


def test_rerun_is_a_no_op(scored_run, tmp_path):
    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy, cfg_copy = _copy_of(run_dir, tmp_path, cfg)
    manifest = os.path.join(copy, "scores", "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    again = run_score(cfg_copy, copy, log=lambda _m: None)
    assert again.skipped_stage
    assert "up to date" in again.format()
    assert os.stat(manifest).st_mtime_ns == stamp


def test_resume_rescores_only_missing_shards(scored_run, tmp_path):
    import shutil

    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    before = _scores(copy)
    scores = os.path.join(copy, "scores")
    # an interrupted run: no manifest, one shard never written, one cut short mid-file
    os.remove(os.path.join(scores, "manifest.json"))
    shutil.rmtree(os.path.join(scores, "shard=part-00001"))
    victim_dir = os.path.join(scores, "shard=part-00004")
    victim = os.path.join(victim_dir, sorted(os.listdir(victim_dir))[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    cfg_copy = cfg.model_copy(deep=True)
    cfg_copy.margin_model.checkpoint = os.path.join(run_dir, "margin_model", "model.pt")
    summary = run_score(cfg_copy, copy, log=lambda _m: None)
    assert summary.shards_skipped == 4
    assert summary.rows_scored_now == 2 * ROWS_PER_SHARD
    after = _scores(copy)
    assert after["id"] == before["id"]
    np.testing.assert_allclose(after["margin"], before["margin"], rtol=1e-5, atol=1e-7)


def test_changed_settings_discard_old_scores(scored_run, tmp_path, monkeypatch):
    import re
    import shutil

    from puma_ray import score
    from puma_ray.score import run_score

    class AtLeastOneLine(score._RateLine):
        """The stage's rate line, whose pass does not end before it has logged once: a
        progress line is expected however fast the machine scores (not within a time)."""

        def __init__(self, total, kind, log, every=30.0):
            self.lines = 0

            def counted(msg):
                self.lines += 1
                log(msg)

            super().__init__(total, kind, counted, every)

        def __exit__(self, *exc):
            deadline = time.monotonic() + 120
            while self.lines == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().__exit__(*exc)

    monkeypatch.setattr(score, "_RateLine", AtLeastOneLine)
    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    messages = []
    cfg2 = cfg.model_copy(deep=True)
    cfg2.scoring.max_iter = 5
    summary = run_score(cfg2, copy, log=messages.append, progress_every=0.05)
    assert summary.shards_skipped == 0 and summary.rows_scored_now == 600
    assert any("discarding" in m for m in messages)
    rate_lines = [m for m in messages if "rows/s, ETA" in m]
    assert rate_lines, "no progress line while scoring"
    line = re.compile(r"^margins: [\d,]+/600 rows \(\d+%\), [\d,]+ rows/s, ETA (\d+s|\?)$")
    assert all(line.match(m) for m in rate_lines), rate_lines
    manifest = json.loads(open(os.path.join(copy, "scores", "manifest.json")).read())
    assert manifest["state"]["deepfool"]["max_iter"] == 5
    assert max(_scores(copy)["iters"]) <= 5


def test_scores_from_before_signed_margins_are_rescored(scored_run, tmp_path):
    """A score set written before scoring.signed existed has no `signed` in its state (its
    misclassified rows are 0, not negative): it is a different state, discarded and rescored,
    never reused or mixed with signed scores."""
    from puma_ray import score
    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy, cfg_copy = _copy_of(run_dir, tmp_path, cfg)
    scores = os.path.join(copy, "scores")
    paths = {name: os.path.join(scores, name) for name in ("state.json", "manifest.json")}
    state = json.loads(open(paths["state.json"]).read())
    manifest = json.loads(open(paths["manifest.json"]).read())
    assert state["deepfool"]["signed"] is True
    # Rewrite both files as the code before the key wrote them.
    old_state = dict(manifest["state"])
    old_state["deepfool"] = {k: v for k, v in old_state["deepfool"].items() if k != "signed"}
    old_fp = score._fingerprint(old_state)
    assert old_fp != manifest["state_fingerprint"]
    with open(paths["state.json"], "w") as f:
        json.dump({**old_state, "fingerprint": old_fp}, f)
    with open(paths["manifest.json"], "w") as f:
        json.dump({**manifest, "state": old_state, "state_fingerprint": old_fp}, f)
    messages = []
    summary = run_score(cfg_copy, copy, log=messages.append)
    assert not summary.skipped_stage and any("discarding" in m for m in messages)
    assert summary.shards_skipped == 0 and summary.rows_scored_now == 600
    rescored = json.loads(open(paths["manifest.json"]).read())
    assert rescored["state"]["deepfool"]["signed"] is True
    assert rescored["state_fingerprint"] == manifest["state_fingerprint"]


def _kill_once_scorer(marker: str, log_dir: str):
    """A MarginScorer that SIGKILLs its own process as its second batch starts, once in the
    whole run: the first actor to get there claims `marker` (created exclusively) and writes the
    batch's ids into it. Every actor start and every finished batch (pid, ids) is logged in
    `log_dir`. Defined in a function, so Ray pickles the class by value into the actors."""
    from puma_ray.score import MarginScorer

    class KillOnce(MarginScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = 0
            with open(os.path.join(log_dir, "starts"), "a") as f:
                f.write(f"{os.getpid()}\n")

        def __call__(self, batch):
            self.calls += 1
            ids = batch.column("id").to_pylist()
            if self.calls == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, json.dumps({"pid": os.getpid(), "ids": ids}).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            out = super().__call__(batch)
            with open(os.path.join(log_dir, f"done-{os.getpid()}"), "a") as f:
                f.write(json.dumps(ids) + "\n")
            return out

    return KillOnce


def test_killed_actor_is_restarted_and_its_batch_retried(scored_run, tmp_path, monkeypatch):
    """A scorer actor dies (SIGKILL) as a batch starts: Ray restarts it, the batch is scored
    again by the new process, every row is scored exactly once, and every score equals the
    uninterrupted run's (same settings and batches) exactly."""
    from puma_ray import score
    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy, cfg2 = _copy_of(run_dir, tmp_path, cfg)
    assert cfg2.scoring.max_retries >= 1 and cfg2.scoring.batch_size == 32  # as scored_run
    marker, log_dir = str(tmp_path / "killed.json"), tmp_path / "log"
    log_dir.mkdir()
    monkeypatch.setattr(score, "MarginScorer", _kill_once_scorer(marker, str(log_dir)))
    summary = run_score(cfg2, copy, force=True, log=lambda _m: None)

    assert os.path.exists(marker), "no scorer was killed"
    killed = json.loads(open(marker).read())
    starts = (log_dir / "starts").read_text().split()
    assert len(starts) >= 3, f"2 actors and at least one restart expected, got {starts}"
    done = {}  # pid -> batches (id lists) it finished
    for f in log_dir.glob("done-*"):
        done[int(f.name.split("-")[1])] = [json.loads(x) for x in f.read_text().splitlines()]
    assert killed["ids"] not in done.get(killed["pid"], [])  # it died with the batch
    retried_by = [pid for pid, batches in done.items() if killed["ids"] in batches]
    assert retried_by and killed["pid"] not in retried_by, "the killed batch was not retried"

    got, want = _scores(copy), _scores(run_dir)
    assert summary.rows_scored_now == 600
    assert len(got["id"]) == 600 and len(set(got["id"])) == 600
    # The same rows, predictions, flags and classes exactly; margins to float rounding (a conv's
    # rounding depends on the batch it runs in, and the retried batch ran in another actor),
    # the long walks back of misclassified rows to 1e-3 and one step (test_scores_equal_...).
    right = np.array(want["margin"]) > 0
    for column in SCORE_COLUMNS:
        if column in ("margin", "iters"):
            a, b = np.array(got[column]), np.array(want[column])
            if column == "margin":
                np.testing.assert_allclose(a[right], b[right], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(a[~right], b[~right], rtol=1e-3, atol=1e-5)
            else:
                assert np.array_equal(a[right], b[right])
                assert np.abs(a[~right] - b[~right]).max(initial=0) <= 1
        else:
            assert got[column] == want[column], column
    manifests = [
        json.loads(open(os.path.join(d, "scores", "manifest.json")).read()) for d in (copy, run_dir)
    ]
    assert manifests[0]["state_fingerprint"] == manifests[1]["state_fingerprint"]


def test_embeddings_pass(scored_run, tmp_path):
    import shutil

    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run_score(cfg, copy, embeddings=True, log=lambda _m: None)
    emb = _scores(copy, "embeddings")
    assert len(emb["id"]) == 600 and len(set(emb["id"])) == 600
    dims = {len(e) for e in emb["embedding"]}
    assert len(dims) == 1 and dims.pop() > 1
    assert os.path.exists(os.path.join(copy, "embeddings", "manifest.json"))


def test_mismatched_checkpoint_refused_before_work(scored_run, tmp_path):
    import shutil

    from puma_ray.models import create_model, save_checkpoint
    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("scores"))
    bad = str(tmp_path / "five_classes.pt")
    save_checkpoint(bad, create_model("small_cnn", num_classes=5))
    cfg2 = cfg.model_copy(deep=True)
    cfg2.margin_model.checkpoint = bad
    with pytest.raises(CheckpointError, match="five_classes.pt"):
        run_score(cfg2, copy, log=lambda _m: None)
    assert not os.path.exists(os.path.join(copy, "scores"))
    cfg2.margin_model.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing.pt: margin model checkpoint not found"):
        run_score(cfg2, copy, log=lambda _m: None)


def test_corrupt_input_shard_names_the_file(scored_run, tmp_path):
    import shutil

    from puma_ray.score import run_score

    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("scores"))
    shard = os.path.join(copy, "data", "train", "part-00002.parquet")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    cfg2 = cfg.model_copy(deep=True)
    cfg2.margin_model.checkpoint = os.path.join(run_dir, "margin_model", "model.pt")
    with pytest.raises(DataError, match="part-00002.parquet"):
        run_score(cfg2, copy, log=lambda _m: None)


def test_extrapolated_scores_only_the_subset_and_embeds_all(scored_run, tmp_path):
    import shutil

    from puma_ray.score import run_score
    from puma_ray.selection import extrapolation_subset

    run_dir, cfg, _ = scored_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("scores", "embeddings"))
    cfg2 = cfg.model_copy(deep=True)
    cfg2.pruning.strategy = "extrapolated"
    cfg2.pruning.extrapolation.scored_fraction = 0.25
    summary = run_score(cfg2, copy, log=lambda _m: None)
    all_ids = np.array(_scores(copy, "embeddings")["id"])
    assert len(all_ids) == 600  # every row embedded
    want = np.sort(all_ids[extrapolation_subset(all_ids, 0.25, cfg2.pruning.seed)])
    got = np.array(_scores(copy)["id"])
    assert np.array_equal(got, want) and 90 < len(got) < 210
    assert summary.rows_scored_now == len(want)
