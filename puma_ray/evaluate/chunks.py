"""Evaluation in chunks, on Ray workers: the rows of one evaluation split into chunks of
`evaluation.chunk_rows`, each a Ray task (one GPU each with `ray.use_gpu`) that loads the model,
attacks its rows and writes one file per chunk, atomically; the driver only schedules, reports
progress and adds up. So an AutoAttack of CIFAR-10's test split runs on the cluster's GPUs, not
in the driver, and an interrupted one resumes where it stopped.

Layout of `<run_dir>/<name>/chunks/`:
  state.json              what the chunks belong to (model fingerprint, the split's content
                          fingerprint, the settings, the rows); written before any chunk
  chunk-00000.parquet     per row of the chunk: `row` (index in the evaluation), `id`,
                          `correct`, `pgd_robust` and, with AutoAttack, `broken_at`
  .puma-ray-output        the marker that lets a changed evaluation clear the folder
A rerun keeps every chunk whose file exists (a chunk is published only whole) and runs the
rest; changed settings, another model or other data discard them all. The rows are counted
exactly once: the chunk files together must hold rows 0..n-1 once each, with the split's ids.

Without Ray initialised (a `puma-ray evaluate` on this machine, a library call) the chunks run
one after another in this process, through the same code and files.

PGD counts do not depend on the chunking (per-row random starts); AutoAttack's do, slightly:
the reference draws its random starts per batch of the rows still robust, so a chunk's result
is exactly reproducible for its rows, and `chunk_rows` is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray import outputs, storage
from puma_ray.errors import PumaRayError

FORMAT = "puma_ray.eval_chunks/1"
KIND = "evaluate-chunks"


class EvaluationError(PumaRayError):
    """The chunks of an evaluation do not add up (a row missing or counted twice)."""


@dataclass(frozen=True)
class ChunkJob:
    """Everything one chunk task needs, as plain data (pickled to the worker)."""

    index: int
    start: int  # first row of the chunk, in the evaluation's row order
    stop: int
    checkpoint: str
    split_uri: str
    out: str  # the chunk file
    fingerprint: str
    eps: float
    norm: str
    pgd_steps: int
    pgd_restarts: int
    batch_size: int
    seed: int
    autoattack: bool
    autoattack_version: str
    autoattack_attacks: tuple[str, ...] | None
    threads: int
    use_gpu: bool


def evaluate_chunk(job: ChunkJob, progress=None) -> dict:
    """Attack rows [start, stop) and publish the chunk file; returns {index, rows, seconds}.
    Runs in a Ray task or in this process (`progress(n)` after every PGD batch of n rows)."""
    import torch

    from puma_ray.attacks.autoattack import autoattack
    from puma_ray.evaluate.robustness import pgd_robust_rows
    from puma_ray.evaluate.rows import split_rows
    from puma_ray.models import load_checkpoint

    start = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = "cuda" if job.use_gpu and torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(job.checkpoint, map_location=device)
    x, y, ids = split_rows(job.split_uri, job.start, job.stop)
    correct, robust = pgd_robust_rows(
        model,
        x,
        y,
        job.eps,
        norm=job.norm,
        steps=job.pgd_steps,
        restarts=job.pgd_restarts,
        batch_size=job.batch_size,
        device=device,
        seed=job.seed,
        row_offset=job.start,
        progress=progress,
    )
    columns = {
        "row": pa.array(np.arange(job.start, job.start + len(ids), dtype=np.int64)),
        "id": pa.array(ids.astype(np.int64)),
        "correct": pa.array(correct.numpy()),
        "pgd_robust": pa.array(robust.numpy()),
    }
    if job.autoattack:
        aa = autoattack(
            model,
            x,
            y,
            job.eps,
            norm=job.norm,
            version=job.autoattack_version,
            attacks=job.autoattack_attacks,
            batch_size=job.batch_size,
            seed=job.seed,
            device=device,
        )
        columns["broken_at"] = pa.array(aa.broken_at.numpy().astype(np.int8))
    table = pa.table(columns).replace_schema_metadata(
        {"fingerprint": job.fingerprint, "attacks": json.dumps(_attacks(job))}
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.atomic_write_bytes(job.out, sink.getvalue())
    return {"index": job.index, "rows": len(ids), "seconds": time.perf_counter() - start}


def _attacks(job: ChunkJob) -> list[str]:
    if not job.autoattack:
        return []
    from puma_ray.attacks.autoattack import attacks_of

    return list(attacks_of(job.autoattack_version, job.autoattack_attacks))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def chunk_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(a, min(rows, a + chunk_rows)) for a in range(0, rows, chunk_rows)]


def _chunk_done(path: str, fp: str) -> bool:
    """A chunk file exists (published whole, by rename) and belongs to this evaluation."""
    if not storage.exists(path):
        return False
    try:
        meta = pq.read_schema(io.BytesIO(storage.read_bytes(path))).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return meta.get(b"fingerprint", b"").decode() == fp


def prepare(out_dir: str, settings: dict, log) -> str:
    """The chunk folder for `settings`: kept when its state.json matches, else cleared (only
    if it is ours) and state.json written anew. Returns the fingerprint."""
    fp = fingerprint(settings)
    state_path = storage.join(out_dir, "state.json")
    if storage.exists(state_path):
        old = json.loads(storage.read_bytes(state_path))
        if old.get("fingerprint") == fp:
            return fp
        log(f"evaluate: {out_dir} holds chunks of another evaluation; discarding them")
    outputs.clear(out_dir, KIND, hint="choose another --name", first=("state.json",))
    storage.atomic_write_bytes(state_path, json.dumps({**settings, "fingerprint": fp}).encode())
    return fp


def run_chunks(
    jobs: list[ChunkJob], *, cpus: float, gpus: float, log, use_ray: bool | None = None
) -> dict:
    """Run the jobs whose chunk is not done yet: as Ray tasks (`use_ray`; None: when Ray is
    initialised), as many at once as the cluster fits, else one after another in this process.
    Returns {"run": chunks run now, "kept": chunks kept from before}."""
    from puma_ray.logs import Progress

    todo = [j for j in jobs if not _chunk_done(j.out, j.fingerprint)]
    kept = len(jobs) - len(todo)
    rows = sum(j.stop - j.start for j in todo)
    if kept:
        log(f"evaluate: {kept} of {len(jobs)} chunks already done; {len(todo)} to run")
    progress = Progress(rows, f"evaluate: {len(todo)} chunks", log, unit="rows")
    import ray

    if use_ray is None:
        use_ray = ray.is_initialized()
    if todo and use_ray:
        task = ray.remote(evaluate_chunk).options(num_cpus=cpus, num_gpus=gpus, max_retries=2)
        pending = [task.remote(j) for j in todo]
        try:
            while pending:
                # a line at least every progress interval, also while no chunk finishes
                wait = max(progress.every_s, 1.0)
                ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
                if ready:
                    progress.update(ray.get(ready[0])["rows"])
                else:
                    log(f"{progress.line()} ({len(pending)} chunks to finish)")
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
    else:  # in this process: progress from inside each chunk's PGD batches
        for job in todo:
            evaluate_chunk(job, progress=progress.update)
    return {"run": len(todo), "kept": kept}


def collect(jobs: list[ChunkJob], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The chunks' columns in row order, after checking that rows 0..n-1 each occur exactly
    once with the split's own ids."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(j.out))) for j in jobs]
    table = pa.concat_tables(tables)
    rows = table.column("row").to_numpy()
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], np.arange(len(ids))):
        raise EvaluationError(
            f"{storage.join(jobs[0].out, '..')}: the chunks hold {len(rows)} rows, "
            f"{len(np.unique(rows))} distinct, for {len(ids)} evaluated rows"
        )
    if not np.array_equal(table.column("id").to_numpy()[order], ids):
        raise EvaluationError("the chunks' ids are not the split's: the data changed meanwhile")
    return {name: table.column(name).to_numpy()[order] for name in table.column_names}


def job_dict(job: ChunkJob) -> dict:
    return asdict(job)
