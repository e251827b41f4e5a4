"""`puma-ray score`: every sample's DeepFool margin, streamed through a Ray Data actor pool.

Layout of `<run_dir>/scores/` (and `embeddings/`, same scheme):
  state.json               the settings these scores belong to (margin-model fingerprint, DeepFool
                           settings, dataset fingerprint); written before any score
  shard=part-00000/*.parquet   score rows of input shard part-00000 (Ray Data hive partitioning)
  manifest.json            written last, only after the exactly-once check passed
  .puma-ray-output         the marker that lets score clear the folder (`puma_ray.outputs`)

Resuming: a rerun keeps each shard directory whose rows match its input shard's ids exactly and
scores only the rest, in one streaming pass. Changed settings discard all old scores. A scorer
actor that dies is restarted by Ray and its batch retried; nothing is committed by a failed
attempt, and the exactly-once check at the end would catch it if it were.

Length: one module on purpose: the stage's state file, actor, resume rule and exactly-once
check are one contract and are read together.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from puma_ray import locking, outputs, storage
from puma_ray.config import PipelineConfig
from puma_ray.errors import CheckpointError, DataError, PumaRayError

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("label", pa.int16()),
        ("source", pa.string()),
        ("margin", pa.float32()),
        ("pred", pa.int16()),
        ("adv_class", pa.int16()),
        ("iters", pa.int16()),
        ("converged", pa.bool_()),
        ("seconds", pa.float32()),  # this row's share of its batch's compute time
        ("shard", pa.string()),
    ]
)
# ~2.3% wide bins from 1e-5 to 1e2, mirrored below 0 for signed margins (scoring.signed:
# misclassified rows are negative); [-1e-5, 0) and [0, 1e-5) are the bins at zero, and margins
# beyond +-1e2 count in the outermost bins.
_POSITIVE_EDGES = np.geomspace(1e-5, 1e2, 701)
MARGIN_HIST_EDGES = np.concatenate([-_POSITIVE_EDGES[::-1], [0.0], _POSITIVE_EDGES])


class ScoringError(PumaRayError):
    """Scores cannot be produced or verified (exactly-once failed, inputs unusable)."""


def scores_dir(run_dir: str) -> str:
    return storage.join(run_dir, "scores")


def embeddings_dir(run_dir: str) -> str:
    return storage.join(run_dir, "embeddings")


def margin_model_path(cfg: PipelineConfig, run_dir: str) -> str:
    """The margin model (`puma_ray.models.margin_model_source`): a RobustBench zoo reference
    (weights checked), the given checkpoint, else the one `puma-ray train --dataset full` wrote
    for this run. Actors load any of them with `load_checkpoint`."""
    from puma_ray.models.zoo import margin_model_source

    return margin_model_source(cfg, run_dir)


# ----------------------------------------------------------------------------------------------
# The Ray Data actor: one model per actor, loaded once.


class _ModelActor:
    """What both scorers share: the model loaded once per actor, and batch images -> NCHW."""

    def __init__(
        self, checkpoint: str, image_shape, threads: int, device: str, counter: str | None = None
    ):
        import torch

        from puma_ray.models import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model, _ = load_checkpoint(checkpoint, map_location=self.device)
        self.model.eval()
        self.image_shape = tuple(image_shape)
        self.counter = counter

    def _images(self, batch: pa.Table):
        """The batch's images as float NCHW in [0, 1] on the actor's device."""
        import torch

        from puma_ray.data import decode_images

        images = decode_images(batch.column("image"), self.image_shape)
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255)


class MarginScorer(_ModelActor):
    """`map_batches` callable: decode images, run batched DeepFool, return score rows."""

    def __init__(
        self,
        checkpoint: str,
        image_shape,
        settings: dict,
        threads: int,
        device: str,
        subset: dict | None = None,
        counter: str | None = None,
    ):
        super().__init__(checkpoint, image_shape, threads, device, counter)
        self.settings = settings
        self.subset = subset  # score only this hash-chosen subset (pruning.strategy=extrapolated)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from puma_ray.attacks import deepfool

        start = time.perf_counter()
        if self.subset is not None:
            batch = batch.filter(pa.array(_in_subset(batch.column("id"), self.subset)))
            if batch.num_rows == 0:
                return SCORE_SCHEMA.empty_table()
        x = self._images(batch)
        labels_np = batch.column("label").to_numpy().astype(np.int64)
        y = torch.from_numpy(labels_np).to(self.device)
        res = deepfool(self.model, x, y, **self.settings)
        seconds = (time.perf_counter() - start) / max(1, len(labels_np))
        paths = batch.column("path").to_pylist()
        _report_rows(self.counter, len(labels_np))
        return pa.table(
            {
                "id": batch.column("id"),
                "label": batch.column("label").cast(pa.int16()),
                "source": batch.column("source"),
                "margin": res.margin.float().cpu().numpy(),
                "pred": res.pred.cpu().numpy().astype(np.int16),
                "adv_class": res.adv_class.cpu().numpy().astype(np.int16),
                "iters": res.iters.cpu().numpy().astype(np.int16),
                "converged": res.converged.cpu().numpy(),
                "seconds": np.full(len(labels_np), seconds, np.float32),
                "shard": [_shard_name(p) for p in paths],
            },
            schema=SCORE_SCHEMA,
        )


class EmbeddingScorer(_ModelActor):
    """Callable class for `map_batches`: penultimate features (float16) for k-NN extrapolation."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        x = self._images(batch)
        with torch.inference_mode():
            emb = self.model.forward_features(x).float().cpu().numpy().astype(np.float16)
        flat = pa.array(emb.reshape(-1))
        _report_rows(self.counter, len(emb))
        return pa.table(
            {
                "id": batch.column("id"),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
                "shard": [_shard_name(p) for p in batch.column("path").to_pylist()],
            }
        )


def _shard_name(path: str) -> str:
    return os.path.basename(path).rsplit(".", 1)[0]


# ----------------------------------------------------------------------------------------------
# Stage.


@dataclass
class ScoreSummary:
    out_dir: str
    rows: int
    rows_scored_now: int
    shards_total: int
    shards_skipped: int
    wall_s: float
    device_s: float
    misclassified: int
    not_converged: int
    quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped_stage: bool = False

    def format(self) -> str:
        if self.skipped_stage:
            return f"score: up to date ({self.rows} rows in {self.out_dir}); nothing to do"
        rate = self.rows_scored_now / self.wall_s if self.wall_s > 0 else float("nan")
        lines = [
            f"score: {self.rows} rows in {self.shards_total} shards -> {self.out_dir}",
            f"  scored now {self.rows_scored_now} rows ({self.shards_skipped} shards reused) "
            f"in {self.wall_s:.1f}s: {rate:.0f} rows/s, {self.device_s:.1f} device-s",
            f"  misclassified by the margin model (margin 0, or negative if signed): "
            f"{self.misclassified}; not converged (|margin| is a lower bound): "
            f"{self.not_converged}",
            "  margin quantiles  " + "  ".join(f"{q:>7}" for q in ("p10", "p50", "p90", "max")),
        ]
        for source, qs in self.quantiles.items():
            lines.append(f"  {source:<16}" + "  ".join(f"{qs[q]:7.4f}" for q in qs))
        return "\n".join(lines)


def _settings(cfg: PipelineConfig) -> dict:
    s = cfg.scoring
    return {
        "norm": s.norm,
        "overshoot": s.overshoot,
        "max_iter": s.max_iter,
        "candidates": s.candidates,
        "clip": s.clip,
        "target": s.target,
        # Always recorded: a state written before the key existed (unsigned scores) has
        # another fingerprint, so its scores are discarded, never mixed with signed ones.
        "signed": s.signed,
    }


def _check_inputs(cfg: PipelineConfig, run_dir: str):
    """Open the dataset and the margin model, and refuse mismatches before any work starts."""
    from puma_ray.data import dataset_dirs, open_dataset
    from puma_ray.models import (
        check_compatible,
        is_zoo_ref,
        model_fingerprint,
        packaged,
        read_checkpoint_meta,
    )

    dataset = open_dataset(dataset_dirs(run_dir)[0])
    ckpt = margin_model_path(cfg, run_dir)
    # a zoo model's file is checked where it is resolved, a packaged one's when it is read
    if not is_zoo_ref(ckpt) and not storage.exists(packaged.resolve(ckpt)):
        raise CheckpointError(
            f"{ckpt}: margin model checkpoint not found (set margin_model.checkpoint, or run "
            "`puma-ray train --dataset full` first)"
        )
    meta = read_checkpoint_meta(ckpt)
    check_compatible(meta, dataset.info.num_classes, tuple(dataset.info.image_shape))
    return dataset, ckpt, model_fingerprint(ckpt)


def _pool(cfg: PipelineConfig, log):
    """Actor pool bounds. The pool must leave one CPU free: Ray Data's read, list and write
    tasks need a whole CPU slot, and a pool holding every CPU stalls the stream forever
    (measured on Ray 2.60). On a 2-CPU machine use e.g. 2 actors x `cpus_per_actor: 0.5`."""
    import ray

    s = cfg.scoring
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 1)
    if s.pool_max is not None:
        max_size = s.pool_max
    elif s.gpus_per_actor > 0:
        max_size = int(resources.get("GPU", 0) // s.gpus_per_actor)
    else:
        max_size = int((cpus - 1) // s.cpus_per_actor)
    max_size = max(s.pool_min, max_size, 1)
    if cpus - max_size * s.cpus_per_actor < 1:
        log(
            f"score: warning: {max_size} actors x scoring.cpus_per_actor={s.cpus_per_actor} "
            f"leave less than 1 of the cluster's {cpus:g} CPUs for reading and writing; the "
            "stream can stall unless the cluster scales up (lower pool_max or cpus_per_actor)"
        )
    return ray.data.ActorPoolStrategy(min_size=s.pool_min, max_size=max_size), max_size


def _committed_shards(out_dir: str, expected: dict[str, np.ndarray]) -> dict[str, bool]:
    """For each input shard, whether its score rows already match its ids exactly."""
    done = {}
    for name, ids in expected.items():
        part = storage.join(out_dir, f"shard={name}")
        if not storage.exists(part):
            done[name] = len(ids) == 0  # a shard with nothing to score (subset) is done
            continue
        try:
            got = _read_column(part, "id")
        except (OSError, pa.ArrowInvalid):  # a file cut short by an interrupt
            got = None
        done[name] = got is not None and len(got) == len(ids) and np.array_equal(np.sort(got), ids)
    return done


def _read_column(part_dir: str, column: str) -> np.ndarray:
    fs, path = storage.resolve(part_dir)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[column])
    return table.column(column).to_numpy()


def _in_subset(ids, subset: dict | None) -> np.ndarray:
    from puma_ray.selection import extrapolation_subset

    ids = np.asarray(ids)
    if subset is None:
        return np.ones(len(ids), bool)
    return extrapolation_subset(ids, subset["fraction"], subset["seed"])


def _scored_subset(cfg: PipelineConfig) -> dict | None:
    """Under `extrapolated` pruning only a random subset is DeepFool-scored (Nieth et al.);
    the rest get margins from their nearest scored neighbours at prune time."""
    p = cfg.pruning
    if p.strategy != "extrapolated":
        return None
    return {"fraction": p.extrapolation.scored_fraction, "seed": p.seed}


def _input_ids(dataset, subset: dict | None = None) -> dict[str, np.ndarray]:
    """Sorted ids per input shard: the reference for exactly-once (one shard in memory at a time
    during the check; the dict itself holds 8 bytes per row, read once)."""
    import pyarrow.parquet as pq

    out = {}
    for path in dataset.files:
        fs, p = storage.resolve(path)
        try:
            with fs.open_input_file(p) as f:
                ids = pq.read_table(f, columns=["id"]).column("id").to_numpy()
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{path}: unreadable sample shard ({e}); re-run `puma-ray ingest`"
            ) from None
        out[_shard_name(path)] = np.sort(ids[_in_subset(ids, subset)])
    return out


class RowCounter:
    """A tiny Ray actor the scorers tell how many rows they finished: Ray Data publishes the
    output files only at the end of the write, so the driver cannot count them as it goes.
    Retried batches count twice; the line it feeds is progress, not the exactly-once check."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


class _RateLine:
    """Logs `rows done/total, rows/s, ETA` every `every` seconds while a pass runs (Ray Data's
    own bars are off unless on a TTY, and `ray job submit` logs are not a TTY)."""

    def __init__(self, total: int, kind: str, log, every: float = 30.0):
        import ray

        self.total, self.kind, self.log, self.every = total, kind, log, every
        self.name = f"puma_ray_rows_{os.getpid()}_{time.time_ns()}"
        self.counter = ray.remote(num_cpus=0)(RowCounter).options(name=self.name).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        ray.kill(self.counter)

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.every):
            try:
                done = min(self.total, ray.get(self.counter.get.remote(), timeout=10))
            except Exception:  # progress must never break the stage
                continue
            elapsed = time.perf_counter() - self._start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
            self.log(
                f"{self.kind}: {done:,}/{self.total:,} rows "
                f"({100 * done / max(1, self.total):.0f}%), {rate:,.0f} rows/s, ETA {eta}"
            )


def _report_rows(name: str | None, n: int) -> None:
    """Fire-and-forget: tell the driver's RowCounter that `n` rows are done."""
    if not name:
        return
    import ray

    try:
        ray.get_actor(name).add.remote(n)
    except ValueError:  # the counter is gone (the pass ended); nothing to report to
        pass


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_score(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: bool = False,
    embeddings: bool | None = None,
    log=print,
    progress_every: float = 30.0,
) -> ScoreSummary:
    """Score every training sample; resume shard-wise; verify exactly-once; write manifest last.

    Ray must already be initialised (`puma_ray.runtime.ensure_ray`).
    """
    if cfg.ray.use_gpu and cfg.scoring.gpus_per_actor == 0:
        # `ray.use_gpu` (--use-gpu) means GPUs for scoring too: one per actor unless set
        cfg = cfg.model_copy(deep=True)
        cfg.scoring.gpus_per_actor = 1.0
    dataset, ckpt, model_fp = _check_inputs(cfg, run_dir)
    from puma_ray.runtime import check_feasible, score_request

    # a pool the cluster can never start would wait forever
    bundle, actors = score_request(cfg)
    check_feasible(
        bundle,
        "score (scoring.pool_min actors)",
        actors,
        hint="lower scoring.cpus_per_actor, scoring.gpus_per_actor or scoring.pool_min",
    )
    settings = _settings(cfg)
    state = {
        "margin_model": ckpt,
        "margin_model_fingerprint": model_fp,
        "dataset_fingerprint": dataset.info.fingerprint,
        "deepfool": settings,
        "subset": _scored_subset(cfg),
    }
    out_dir = scores_dir(run_dir)
    summary = _score_pass(
        cfg,
        dataset,
        ckpt,
        out_dir,
        state,
        force=force,
        log=log,
        kind="margins",
        every=progress_every,
    )
    if embeddings is None:
        embeddings = cfg.scoring.embeddings or cfg.pruning.strategy == "extrapolated"
    if embeddings:
        emb_state = {k: v for k, v in state.items() if k not in ("deepfool", "subset")}
        _score_pass(
            cfg,
            dataset,
            ckpt,
            embeddings_dir(run_dir),
            emb_state,
            force=force,
            log=log,
            kind="embeddings",
            every=progress_every,
        )
    return summary


def _score_pass(cfg, dataset, ckpt, out_dir, state, *, force, log, kind, every) -> ScoreSummary:
    from puma_ray.runtime import read_parquet

    state_fp = _fingerprint(state)
    manifest_path = storage.join(out_dir, "manifest.json")
    state_path = storage.join(out_dir, "state.json")
    info = dataset.info
    if storage.exists(manifest_path) and not force:
        manifest = json.loads(storage.read_bytes(manifest_path))
        if manifest.get("state_fingerprint") == state_fp:
            return ScoreSummary(**{**manifest["summary"], "skipped_stage": True})
    # Only a directory holding our marker (or, from before markers, our manifest or state) is
    # cleared or written into: a run dir pointed at someone's folder must not lose their files.
    mark = "scores" if kind == "margins" else kind
    owner = {"legacy": _legacy(kind), "hint": "choose another --run-dir"}
    if storage.exists(state_path) and not force:
        old = json.loads(storage.read_bytes(state_path))
        if old.get("fingerprint") != state_fp:
            log(f"{kind}: margin model, dataset or DeepFool settings changed: discarding {out_dir}")
            force = True
    if force:
        outputs.clear(out_dir, mark, **owner)
    else:
        outputs.check_clearable(out_dir, mark, **owner)
        outputs.claim(out_dir, mark)
        if locking.covers(out_dir):  # the lock holder: temp files here are a killed run's
            outputs.remove_stale_tmp(out_dir)
    storage.delete(manifest_path)  # from here on the directory is "in progress"
    storage.atomic_write_bytes(state_path, json.dumps({**state, "fingerprint": state_fp}).encode())

    expected = _input_ids(dataset, state.get("subset"))
    done = _committed_shards(out_dir, expected)
    todo = [f for f in dataset.files if not done[_shard_name(f)]]
    for name in (n for n, ok in done.items() if not ok):
        storage.delete(storage.join(out_dir, f"shard={name}"))  # partial leftovers
    rows_todo = sum(len(expected[_shard_name(f)]) for f in todo)
    log(
        f"{kind}: {info.num_rows} rows in {len(dataset.files)} shards; "
        f"{len(dataset.files) - len(todo)} already done, scoring {rows_todo} rows"
    )

    start = time.perf_counter()
    pool_size = 0
    if todo:
        s = cfg.scoring
        compute, pool_size = _pool(cfg, log)
        device = "cuda" if s.gpus_per_actor > 0 else "cpu"
        threads = max(1, int(s.cpus_per_actor))
        if kind == "margins":
            fn, kwargs = MarginScorer, {"settings": state["deepfool"], "subset": state["subset"]}
        else:
            fn, kwargs = EmbeddingScorer, {}
        fs, out_path = storage.resolve(out_dir)
        # Reads and writes are I/O: they take no CPU slot, so an actor pool that fills every CPU
        # cannot starve them (which would deadlock the stream on a small cluster). The read
        # verifies page checksums, as every other reader of the shards does.
        ds = read_parquet(todo, include_paths=True, num_cpus=0).select_columns(
            ["id", "image", "label", "source", "path"]
        )
        with _RateLine(rows_todo, kind, log, every) as rate, warnings.catch_warnings():
            # Ray 2.60 has no named parameter for actor retries; extra `**ray_remote_args` are
            # the only way to set them explicitly, and they warn that they are deprecated.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = ds.map_batches(
                fn,
                fn_constructor_kwargs={
                    "checkpoint": ckpt,
                    "image_shape": tuple(info.image_shape),
                    "threads": threads,
                    "device": device,
                    "counter": rate.name,
                    **kwargs,
                },
                compute=compute,
                batch_size=s.batch_size,
                batch_format="pyarrow",
                num_cpus=s.cpus_per_actor,
                num_gpus=s.gpus_per_actor,
                max_restarts=s.max_retries,
                max_task_retries=s.max_retries,
            )
            ds.write_parquet(
                out_path,
                filesystem=fs,
                partition_cols=["shard"],
                compression="zstd",
                ray_remote_args={"num_cpus": 0},
            )
    wall = time.perf_counter() - start

    stats = _verify_and_summarise(out_dir, expected, kind)
    rows_now = rows_todo
    cpus = cfg.scoring.gpus_per_actor or cfg.scoring.cpus_per_actor
    summary = ScoreSummary(
        out_dir=out_dir,
        rows=info.num_rows,
        rows_scored_now=rows_now,
        shards_total=len(dataset.files),
        shards_skipped=len(dataset.files) - len(todo),
        wall_s=wall,
        device_s=stats.pop("seconds") * cpus if kind == "margins" else wall * pool_size * cpus,
        misclassified=stats.pop("misclassified", 0),
        not_converged=stats.pop("not_converged", 0),
        quantiles=stats.pop("quantiles", {}),
    )
    manifest = {
        "kind": kind,
        "state": state,
        "state_fingerprint": _fingerprint(state),
        "rows_per_shard": {k: len(v) for k, v in expected.items()},
        "retries": {
            "max_restarts": cfg.scoring.max_retries,
            "max_task_retries": cfg.scoring.max_retries,
        },
        "pool_max": pool_size,
        "summary": asdict(summary),
        **stats,
    }
    storage.atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return summary


def _legacy(kind: str):
    """Recognises a scores / embeddings directory written before markers existed."""

    def test(uri: str, names: set[str]) -> bool:
        for name in ("manifest.json", "state.json"):
            if name in names:
                try:
                    body = json.loads(storage.read_bytes(storage.join(uri, name)))
                except (OSError, ValueError):
                    continue
                body = body.get("state", body) if name == "manifest.json" else body
                if "dataset_fingerprint" in body and ("deepfool" in body) == (kind == "margins"):
                    return True
        return False

    return test


def _verify_and_summarise(out_dir: str, expected: dict[str, np.ndarray], kind: str) -> dict:
    """Exactly-once: every shard's score ids equal its input ids. Stats stream shard by shard."""
    hist: dict[str, np.ndarray] = {}
    seconds = 0.0
    misclassified = not_converged = 0
    for name, ids in expected.items():
        part = storage.join(out_dir, f"shard={name}")
        if not storage.exists(part):
            if len(ids) == 0:
                continue
            raise ScoringError(f"{part}: no scores were written for input shard {name}")
        fs, path = storage.resolve(part)
        cols = (
            ["id"]
            if kind != "margins"
            else ["id", "source", "margin", "pred", "label", "converged", "seconds"]
        )
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=cols)
        got = table.column("id").to_numpy()
        if len(got) != len(ids) or not np.array_equal(np.sort(got), ids):
            dup = len(got) - len(np.unique(got))
            raise ScoringError(
                f"{part}: exactly-once check failed: {len(got)} score rows for {len(ids)} input "
                f"rows ({dup} duplicated ids); rerun `puma-ray score` to redo this shard"
            )
        if kind != "margins":
            continue
        margin = table.column("margin").to_numpy()
        if np.isnan(margin).any():
            raise ScoringError(f"{part}: NaN margins (the margin model produces NaN logits?)")
        seconds += float(table.column("seconds").to_numpy().sum())
        misclassified += int(
            (table.column("pred").to_numpy() != table.column("label").to_numpy()).sum()
        )
        not_converged += int((~table.column("converged").to_numpy(zero_copy_only=False)).sum())
        sources = table.column("source").to_numpy(zero_copy_only=False)
        for src in np.unique(sources):
            inside = np.clip(margin[sources == src], MARGIN_HIST_EDGES[0], MARGIN_HIST_EDGES[-1])
            counts, _ = np.histogram(inside, MARGIN_HIST_EDGES)
            hist[src] = hist.get(src, 0) + counts
    if kind != "margins":
        return {"seconds": 0.0}
    return {
        "seconds": seconds,
        "misclassified": misclassified,
        "not_converged": not_converged,
        "quantiles": {src: _hist_quantiles(h) for src, h in sorted(hist.items())},
        "margin_histogram": {
            "edges": MARGIN_HIST_EDGES.tolist(),
            "counts": {s: h.tolist() for s, h in sorted(hist.items())},
        },
    }


def _hist_quantiles(counts: np.ndarray) -> dict[str, float]:
    """p10/p50/p90/max of a MARGIN_HIST_EDGES histogram: the upper edge of the bin holding
    each quantile (negative margins included; a bin below 0 reports its edge nearer 0)."""
    cdf = np.cumsum(counts) / max(1, counts.sum())
    out = {}
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1.0)):
        i = int(np.searchsorted(cdf, q - 1e-12))
        out[name] = float(MARGIN_HIST_EDGES[min(i + 1, len(MARGIN_HIST_EDGES) - 1)])
    return out
