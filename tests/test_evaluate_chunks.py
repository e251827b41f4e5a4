"""Evaluation in chunks: Ray tasks, chunks in this process and one plain pass give the same
per-row results; an interrupted evaluation resumes without recounting its finished chunks;
changed settings discard them; rows counted twice or not at all are refused."""

import os
import shutil

import pytest
import torch

from puma_ray.config import load_config
from puma_ray.evaluate import chunks, load_split_rows, pgd_robust_rows, run_evaluate
from puma_ray.ingest import run_ingest
from puma_ray.models import create_model, save_checkpoint

SETS = [
    "data.sources=[{type: builtin, real_train: 32, real_test: 40, synthetic: 0}]",
    "data.validation=8",
    "data.rows_per_shard=16",
    "evaluation.subset=36",
    "evaluation.chunk_rows=10",
    "evaluation.batch_size=8",
    "evaluation.pgd_steps=2",
    "tracking.tracking_uri=none",
    "ray.cpus_per_worker=1",
]


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Ingested tiny data and an untrained small CNN (its accuracies are what they are: the
    test compares paths, not models)."""
    root = tmp_path_factory.mktemp("eval_chunks")
    run_dir = str(root / "run")
    cfg = load_config(None, SETS)
    run_ingest(cfg, run_dir, parallel=False, log=_quiet)
    torch.manual_seed(0)
    model = create_model("small_cnn", 10)
    checkpoint = str(root / "model.pt")
    save_checkpoint(checkpoint, model, image_shape=(32, 32, 3))
    return run_dir, checkpoint, cfg


def _reference(run_dir, checkpoint, cfg):
    """One plain pass over all the rows, in this process."""
    from puma_ray.models import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    x, y = load_split_rows(os.path.join(run_dir, "data", "test"), cfg.evaluation.subset)
    a = cfg.training.attack
    return pgd_robust_rows(
        model, x, y, a.epsilon, norm=a.norm, steps=cfg.evaluation.pgd_steps, batch_size=36,
        seed=cfg.seed,
    )  # fmt: skip


def _copy(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return str(dest)


def test_chunks_in_process_equal_one_pass(tiny, tmp_path):
    run_dir, checkpoint, cfg = tiny
    run_dir = _copy(run_dir, tmp_path / "run")
    correct, robust = _reference(run_dir, checkpoint, cfg)
    s = run_evaluate(cfg, run_dir, checkpoint, log=_quiet, use_ray=False)
    assert s.rows == 36 and s.chunks == {"run": 4, "kept": 0}  # 10 + 10 + 10 + 6 rows
    assert s.clean_acc == int(correct.sum()) / 36 and s.pgd_acc == int(robust.sum()) / 36
    files = sorted(f for f in os.listdir(os.path.join(run_dir, "evaluate", "chunks")))
    assert [f for f in files if f.endswith(".parquet")] == [
        f"chunk-{k:05d}.parquet" for k in range(4)
    ]


@pytest.mark.ray
def test_ray_tasks_equal_one_pass(tiny, tmp_path, ray_local):
    run_dir, checkpoint, cfg = tiny
    run_dir = _copy(run_dir, tmp_path / "run")
    correct, robust = _reference(run_dir, checkpoint, cfg)
    logs = []
    s = run_evaluate(cfg, run_dir, checkpoint, split="test", log=logs.append, use_ray=True)
    assert s.chunks == {"run": 4, "kept": 0}
    assert s.clean_acc == int(correct.sum()) / 36 and s.pgd_acc == int(robust.sum()) / 36
    # the validation split goes the same way
    v = run_evaluate(
        cfg, run_dir, checkpoint, split="val", name="evaluate_val", log=_quiet, use_ray=True
    )
    assert v.rows == 8 and v.split == "val"


def test_interrupted_evaluation_resumes_without_recounting(tiny, tmp_path, monkeypatch):
    run_dir, checkpoint, cfg = tiny
    run_dir = _copy(run_dir, tmp_path / "run")
    want = run_evaluate(
        cfg, _copy(run_dir, tmp_path / "whole"), checkpoint, log=_quiet, use_ray=False
    )
    real = chunks.evaluate_chunk

    def dies_at_chunk_2(job, progress=None):
        if job.index == 2:
            raise KeyboardInterrupt  # as a Ctrl-C (or a lost worker) in the middle
        return real(job, progress)

    monkeypatch.setattr(chunks, "evaluate_chunk", dies_at_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(cfg, run_dir, checkpoint, log=_quiet, use_ray=False)
    out = os.path.join(run_dir, "evaluate", "chunks")
    done = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    assert {f for f in done if f.endswith(".parquet")} == {
        "chunk-00000.parquet",
        "chunk-00001.parquet",
    }
    assert not os.path.exists(os.path.join(run_dir, "evaluate", "summary.json"))

    monkeypatch.setattr(chunks, "evaluate_chunk", real)
    logs = []
    s = run_evaluate(cfg, run_dir, checkpoint, log=logs.append, use_ray=False)
    assert s.chunks == {"run": 2, "kept": 2}
    assert any("2 of 4 chunks already done" in m for m in logs)
    for name in ("chunk-00000.parquet", "chunk-00001.parquet"):  # not computed again
        assert os.stat(os.path.join(out, name)).st_mtime_ns == done[name]
    assert (s.rows, s.clean_acc, s.pgd_acc) == (want.rows, want.clean_acc, want.pgd_acc)

    # other settings: every chunk again
    other = cfg.model_copy(deep=True)
    other.evaluation.pgd_steps = 3
    assert run_evaluate(other, run_dir, checkpoint, log=_quiet, use_ray=False).chunks == {
        "run": 4,
        "kept": 0,
    }


def test_rows_counted_twice_are_refused(tiny, tmp_path):
    run_dir, checkpoint, cfg = tiny
    run_dir = _copy(run_dir, tmp_path / "run")
    run_evaluate(cfg, run_dir, checkpoint, log=_quiet, use_ray=False)
    out = os.path.join(run_dir, "evaluate", "chunks")
    shutil.copyfile(
        os.path.join(out, "chunk-00000.parquet"), os.path.join(out, "chunk-00001.parquet")
    )
    with pytest.raises(chunks.EvaluationError, match="36 rows, 26 distinct, for 36"):
        run_evaluate(cfg, run_dir, checkpoint, log=_quiet, use_ray=False)
