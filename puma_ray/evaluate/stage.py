"""`run_evaluate`, the evaluate stage: one model on one split, in chunks on Ray workers
(`puma_ray.evaluate.chunks`), then the summary, its MLflow run and `<run_dir>/<name>/summary.json`.
The same function serves `puma-ray evaluate`, the pipeline's evaluate stages and sweep trials."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from puma_ray import storage
from puma_ray.config import PipelineConfig
from puma_ray.data import open_dataset, split_dir
from puma_ray.errors import DataError
from puma_ray.evaluate import chunks
from puma_ray.evaluate.rows import SPLITS, rows_evaluated
from puma_ray.evaluate.summary import EvalSummary, autoattack_stages


def _split_uri(run_dir: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    uri = split_dir(run_dir, split)
    if uri is None:
        raise DataError(
            f"{storage.join(run_dir, 'data', 'val')}: no validation split (data.validation is 0); "
            "set data.validation and ingest again"
        )
    return uri


def _jobs(cfg: PipelineConfig, checkpoint: str, uri: str, rows: int, out_dir: str, fp: str):
    ev, attack, r = cfg.evaluation, cfg.training.attack, cfg.ray
    return [
        chunks.ChunkJob(
            index=k,
            start=a,
            stop=b,
            checkpoint=str(checkpoint),
            split_uri=uri,
            out=storage.join(out_dir, f"chunk-{k:05d}.parquet"),
            fingerprint=fp,
            eps=attack.epsilon,
            norm=attack.norm,
            pgd_steps=ev.pgd_steps,
            pgd_restarts=ev.pgd_restarts,
            batch_size=ev.batch_size,
            seed=cfg.seed,
            autoattack=ev.autoattack,
            autoattack_version=ev.autoattack_version,
            autoattack_attacks=tuple(ev.autoattack_attacks) if ev.autoattack_attacks else None,
            # a task's torch threads: the CPUs it holds (at least one); in this process, all
            threads=max(1, math.floor(r.cpus_per_worker)),
            use_gpu=r.use_gpu,
        )
        for k, (a, b) in enumerate(chunks.chunk_ranges(rows, ev.chunk_rows))
    ]


def _measure(cfg, checkpoint: str, uri: str, out_dir: str, log, use_ray) -> tuple[int, dict, dict]:
    """(rows, per-row columns, chunk counts) of the evaluation, through its chunks."""
    from puma_ray.models import model_fingerprint

    ev, attack = cfg.evaluation, cfg.training.attack
    info = open_dataset(uri).info
    rows = rows_evaluated(uri, ev.subset)
    settings = {
        "format": chunks.FORMAT,
        "model": model_fingerprint(checkpoint),
        "data": info.fingerprint,
        "rows": rows,
        "chunk_rows": ev.chunk_rows,
        "attack": attack.model_dump(mode="json"),
        "seed": cfg.seed,
        **{k: v for k, v in ev.model_dump(mode="json").items() if not k.startswith("epoch_")},
    }
    fp = chunks.prepare(out_dir, settings, log)
    jobs = _jobs(cfg, checkpoint, uri, rows, out_dir, fp)
    gpus = 1.0 if cfg.ray.use_gpu else 0.0
    counts = chunks.run_chunks(
        jobs, cpus=cfg.ray.cpus_per_worker, gpus=gpus, log=log, use_ray=use_ray
    )
    ids = np.concatenate(
        [b.ids for b in open_dataset(uri).iter_batches(batch_size=4096, columns=["id"])]
    )[:rows]
    return rows, chunks.collect(jobs, ids), counts


def run_evaluate(
    cfg: PipelineConfig,
    run_dir: str,
    checkpoint: str,
    *,
    split: str = "test",
    name: str = "evaluate",
    mlflow_parent_run_id: str | None = None,
    log=print,
    use_ray: bool | None = None,
) -> EvalSummary:
    """Evaluate `checkpoint` on `<run_dir>/data/<split>` (test, or val: the validation split a
    sweep selects on) in chunks (`<run_dir>/<name>/chunks/`); writes
    `<run_dir>/<name>/summary.json` and logs the accuracies to MLflow (child of
    `mlflow_parent_run_id` when given). `use_ray`: chunks as Ray tasks (None: when Ray is
    initialised, as in a pipeline or a sweep trial) or in this process (False)."""
    from puma_ray import tracking
    from puma_ray.attacks.autoattack import AutoAttackResult, attacks_of
    from puma_ray.models import check_compatible, read_checkpoint_meta

    start = time.perf_counter()
    ev, attack = cfg.evaluation, cfg.training.attack
    uri = _split_uri(run_dir, split)
    # as score does: a model for other classes or image sizes would print meaningless accuracies
    info = open_dataset(uri).info
    check_compatible(read_checkpoint_meta(checkpoint), info.num_classes, tuple(info.image_shape))
    if ev.autoattack:
        _check_autoattack()
    out_dir = storage.join(run_dir, name, "chunks")
    rows, per_row, counts = _measure(cfg, checkpoint, uri, out_dir, log, use_ray)
    summary = EvalSummary(
        checkpoint=str(checkpoint),
        split=split,
        rows=rows,
        norm=attack.norm,
        epsilon=attack.epsilon,
        pgd_steps=ev.pgd_steps,
        pgd_restarts=ev.pgd_restarts,
        clean_acc=float(per_row["correct"].sum()) / max(1, rows),
        pgd_acc=float(per_row["pgd_robust"].sum()) / max(1, rows),
        attacks_run=["clean", f"pgd-{ev.pgd_steps}"],
        chunks=counts,
    )
    if ev.autoattack:
        stages = attacks_of(ev.autoattack_version, ev.autoattack_attacks)
        aa = AutoAttackResult(
            stages, torch.from_numpy(per_row["broken_at"].astype(np.int64)), ev.autoattack_version
        )
        summary.autoattack_acc = aa.robust_acc
        summary.autoattack_version = ev.autoattack_version
        summary.autoattack_stages = autoattack_stages(aa)
        summary.attacks_run.append(f"autoattack-{ev.autoattack_version} (pyautoattack)")
    summary.wall_s = time.perf_counter() - start
    run = tracking.start_run(
        cfg.tracking,
        run_dir,
        run_name=name,
        parent_run_id=mlflow_parent_run_id,
        params={
            "checkpoint": str(checkpoint),
            "evaluation": ev.model_dump(mode="json"),
            "attack": attack.model_dump(mode="json"),
        },
        log=log,
    )
    if run is not None:
        summary.mlflow_run_id = run.run_id
        tracking.safe(run.log_metrics, summary.metrics(), 0, log=log)
        tracking.safe(run.finish, log=log)
    out = storage.join(run_dir, name, "summary.json")
    storage.makedirs(storage.join(run_dir, name))
    storage.atomic_write_bytes(out, json.dumps(summary.to_dict(), indent=1).encode())
    log(summary.format())
    return summary


def _check_autoattack() -> None:
    """AutoAttack was asked for: the reference must import (here, before any chunk runs)."""
    from puma_ray.errors import ConfigError

    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        raise ConfigError(
            "evaluation.autoattack: the reference AutoAttack (pyautoattack) is not installed "
            '(pip install -e ".[eval]")'
        ) from None
