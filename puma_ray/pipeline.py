"""`puma-ray run`: ingest → margin model → score → prune → train → evaluate, from one config.
The stages and their fingerprints are in `puma_ray.stages`, the end summary in
`puma_ray.pipeline_report`; this module runs them.

Each stage has an input fingerprint: a hash of the config sections it reads, of the content of
the files it reads from outside the run dir (npz / torchvision sources, a given margin-model
checkpoint) and of the fingerprints of the stages it consumes. `<run_dir>/pipeline.json` records
the fingerprint of each finished stage (written after the stage's own manifest), so a rerun skips
every stage whose fingerprint still matches and recomputes from the first changed one; downstream
stages follow automatically because their fingerprints include it. `--force STAGE` redoes that
stage and every stage that consumes its output, discarding their finished results.

The whole run holds the run-dir lock (`puma_ray.locking`): a second writer on the same run dir
is refused, and temp files a killed run left in the run dir's folders are swept at the start.

`compare: [random, full]` (or `--compare`) adds baseline stages after `evaluate`: the same
recipe trained on a random subset of the same size, and on all the data; the end summary puts
them beside PUMA in one table.

MLflow: one parent run per run directory (reopened by reruns) carrying the summary metrics, the
resolved config and the final report; every training and evaluation (margin model, the pruned
run, the baselines) is a child run with its own per-epoch metrics. Sweeps use the same shape:
parent per sweep, child per trial.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig, dump_yaml
from puma_ray.pipeline_report import (  # noqa: F401 (re-exported)
    MethodResult,
    PipelineReport,
    PipelineResult,
    SeedResult,
    pipeline_report,
)
from puma_ray.stages import (  # noqa: F401 (re-exported: the stage graph lives there)
    BASELINES,
    SEEDED,
    STAGES,
    _downstream,
    _hash,
    _reads,
    check_force,
    forced_stages,
    input_stamps,
    margin_model_config,
    random_baseline_config,
    seed_suffix,
    seeded_config,
    split_seed,
    stage_dirs,
    stage_fingerprints,
    stages_of,
)


class PipelineState:
    """`<run_dir>/pipeline.json`: the fingerprint each finished stage was computed with, and the
    MLflow parent run of this run directory."""

    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, "pipeline.json")
        self.done: dict[str, str] = {}
        self.mlflow: dict[str, str] = {}
        # per finished stage, the config keys and file hashes it ran with (`--dry-run` says
        # which changed)
        self.inputs: dict[str, dict[str, Any]] = {}
        if storage.exists(self.path):
            saved = json.loads(storage.read_bytes(self.path))
            self.done = saved.get("stages", {})
            self.mlflow = saved.get("mlflow", {})
            self.inputs = saved.get("inputs", {})

    def is_current(self, stage: str, fingerprint: str) -> bool:
        return self.done.get(stage) == fingerprint

    def invalidate(self, stages: tuple[str, ...]) -> None:
        """Forget `stages` (one being redone and all after it) before the redo starts, so an
        interrupted redo is never taken as done and nothing downstream outlives its input."""
        if any([self.done.pop(s, None) is not None for s in stages]):
            self._write()

    def mark(self, stage: str, fingerprint: str, inputs: dict[str, Any] | None = None) -> None:
        self.done[stage] = fingerprint
        if inputs is not None:
            self.inputs[stage] = inputs
        self._write()

    def set_mlflow(self, tracking_uri: str, run_id: str, fingerprint: str) -> None:
        from puma_ray.tracking import redact

        self.mlflow = {
            "tracking_uri": redact(tracking_uri),
            "run_id": run_id,
            "fingerprint": fingerprint,
        }
        self._write()

    def _write(self) -> None:
        body = {"stages": self.done, "mlflow": self.mlflow, "inputs": self.inputs}
        storage.atomic_write_bytes(self.path, json.dumps(body, indent=2).encode())


# ----------------------------------------------------------------------------------------------
# The run.


def _parent_run(cfg: PipelineConfig, run_dir: str, state: PipelineState, fingerprint: str, log):
    """The pipeline's parent run: reopened by a rerun of the same config (an interrupted run
    continues in it), a new one when the config changed (its params would be stale)."""
    from puma_ray import tracking

    uri = tracking.tracking_uri(cfg.tracking, run_dir)
    if uri is None:
        return None
    saved = state.mlflow
    same = (
        saved.get("tracking_uri") == tracking.redact(uri)
        and saved.get("fingerprint") == fingerprint
    )
    resume = saved.get("run_id") if same else None
    run = tracking.start_run(
        cfg.tracking,
        run_dir,
        run_name=f"pipeline-{cfg.name}",
        params={
            "name": cfg.name,
            "seed": cfg.seed,
            "run_dir": run_dir,
            "pruning": cfg.pruning.model_dump(mode="json"),
            "training.objective": cfg.training.objective,
            "training.epochs": cfg.training.epochs,
            "compare": ",".join(cfg.compare) or "none",
        },
        tags={"puma_ray.stage": "pipeline", "puma_ray.fingerprint": fingerprint},
        resume_run_id=resume,
        log=log,
    )
    if run is not None and run.run_id != resume:
        state.set_mlflow(uri, run.run_id, fingerprint)
    return run


def _next_step(run) -> int:
    """A rerun reopens the same parent run: it logs its summary at the next step, so no step
    of a metric holds two values (every finished run logs `device_seconds`)."""
    try:
        history = run.client().get_metric_history(run.run_id, "device_seconds")
    except Exception:  # tracking must never fail the pipeline
        return 0
    return max((m.step for m in history), default=-1) + 1


def _log_parent(run, cfg: PipelineConfig, run_dir: str, result: PipelineResult, log) -> None:
    """Summary metrics, stage times, the resolved config and the report on the parent run."""
    import tempfile

    from puma_ray import tracking

    report = result.report
    metrics = dict(report.metrics()) if report is not None else {}
    metrics.update({f"stage_seconds.{k}": v for k, v in result.stage_seconds.items()})
    tracking.safe(run.log_metrics, metrics, _next_step(run), log=log)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "config.yaml": dump_yaml(cfg),
            "pipeline.json": storage.read_bytes(storage.join(run_dir, "pipeline.json")).decode(),
        }
        if report is not None:
            files["report.md"] = report.table() + "\n\n" + report.interval_note() + "\n"
            files["report.json"] = json.dumps(report.to_dict(), indent=1)
        kept = storage.join(run_dir, "kept", "manifest.json")
        if storage.exists(kept):
            files["kept_manifest.json"] = storage.read_bytes(kept).decode()
        for name, text in files.items():
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            tracking.safe(run.log_artifact, path, "pipeline", log=log)


def _sweep_stale_tmp(run_dir: str, seeds: int, log) -> None:
    """Remove the temp files a killed run left in this run dir's own folders (the caller holds
    the run-dir lock, so no live writer owns them)."""
    from puma_ray import outputs

    own = ("pipeline.json", "report.json", storage.HASH_CACHE)
    removed = outputs.remove_stale_tmp(run_dir, only=own)
    for rel in stage_dirs(seeds):
        uri = storage.join(run_dir, *rel.split("/"))
        if outputs.owned(uri):
            removed += outputs.remove_stale_tmp(uri)
    if removed:
        log(f"run: removed {len(removed)} temp file(s) an interrupted run left in {run_dir}")


def _check_resources(cfg: PipelineConfig, to_run: list[str]) -> None:
    """Before any stage runs: every Ray stage that will run asks for what the cluster can ever
    hold (else one line naming the request and what exists), so a run does not do an hour of
    scoring and then wait forever for training workers. An evaluation chunk holds one
    training worker's share (`ray.cpus_per_worker`, one GPU with use_gpu)."""
    from puma_ray import runtime

    requests = runtime.stage_requests(cfg)
    hint = "lower ray.num_workers / ray.cpus_per_worker / scoring.* or set ray.use_gpu false"
    for stage in to_run:
        base = split_seed(stage)[0]
        key = "train" if base.startswith("baseline_") else base
        if key == "margin_model" and cfg.margin_model.given:
            continue
        if key in requests:
            bundle, count = requests[key]
            runtime.check_feasible(bundle, f"[{stage}]", count, hint=hint)
        if key == "evaluate" or base.startswith("baseline_"):
            gpus = 1.0 if cfg.ray.use_gpu else 0.0
            bundle = {"CPU": cfg.ray.cpus_per_worker, "GPU": gpus}
            runtime.check_feasible(bundle, f"[{stage}] evaluation chunk", 1, hint=hint)


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run every stage not up to date (or forced) under the run-dir lock; see the module doc."""
    stages = stages_of(cfg)
    check_force(stages, force)
    from puma_ray.locking import run_dir_lock

    # before Ray starts: a second `run` on the same run dir is refused at once
    with run_dir_lock(run_dir, "run", log=log):
        return _run_locked(cfg, run_dir, stages, forced_stages(stages, force), log)


def _run_locked(cfg, run_dir, stages, forced: set[str], log) -> PipelineResult:
    from puma_ray import outputs, tracking
    from puma_ray.dry_run import stage_inputs
    from puma_ray.evaluate import run_evaluate
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune
    from puma_ray.runtime import ensure_ray
    from puma_ray.score import run_score
    from puma_ray.train import run_train

    begin = time.perf_counter()
    storage.makedirs(run_dir)
    _sweep_stale_tmp(run_dir, cfg.seeds, log)
    stamps = input_stamps(cfg, run_dir)
    fps = stage_fingerprints(cfg, stamps)
    ensure_ray(cfg.ray)
    state = PipelineState(run_dir)
    _check_resources(cfg, [s for s in stages if s in forced or not state.is_current(s, fps[s])])
    result = PipelineResult(run_dir=run_dir)
    parent = _parent_run(cfg, run_dir, state, _hash([fps[s] for s in stages]), log)
    pid = parent.run_id if parent is not None else None
    if parent is not None:
        result.mlflow_run_id, result.tracking_uri = parent.run_id, parent.tracking_uri

    def own(name: str) -> str:
        """Mark a train / evaluate folder as this run's (its stale temp files are then swept);
        a folder holding someone else's files is left unmarked."""
        uri = storage.join(run_dir, name)
        if not storage.exists(uri) or outputs.owned(uri):
            outputs.claim(uri, "evaluate" if name.startswith("evaluate") else "train")
        return name

    def train(c: PipelineConfig, f: bool, **kwargs):
        name = own(kwargs.pop("name"))
        return run_train(
            c, run_dir, name=name, force=f, mlflow_parent_run_id=pid, log=log, **kwargs
        )

    def evaluate(c: PipelineConfig, suffix: str):
        # evaluate has no skip of its own: it always measures the model it is given
        model = storage.join(run_dir, f"train{suffix}", "model.pt")
        name = own(f"evaluate{suffix}")
        return run_evaluate(c, run_dir, model, name=name, mlflow_parent_run_id=pid, log=log)

    def baseline_random(f: bool, k: int):
        c, sfx = random_baseline_config(seeded_config(cfg, k)), seed_suffix(k)
        kept = storage.join(run_dir, f"kept_random{sfx}")
        log(run_prune(c, run_dir, force=f, out_dir=kept, log=log).format())
        train(c, f, dataset="kept", name=f"train_random{sfx}", kept_dir=kept)
        return evaluate(c, f"_random{sfx}")

    def baseline_full(f: bool, k: int):
        c, sfx = seeded_config(cfg, k), seed_suffix(k)
        train(c, f, dataset="full", name=f"train_full{sfx}")
        return evaluate(c, f"_full{sfx}")

    def stage_fn(name: str) -> Callable[[bool], Any]:
        base, k = split_seed(name)
        c, sfx = seeded_config(cfg, k), seed_suffix(k)
        return {
            "ingest": lambda f: run_ingest(cfg, run_dir, parallel=True, force=f, log=log),
            # a given checkpoint or zoo model is an input, not work: its content is in the
            # fingerprints
            "margin_model": lambda f: (
                None
                if cfg.margin_model.given
                else train(margin_model_config(cfg), f, dataset="full", name="margin_model")
            ),
            "score": lambda f: run_score(cfg, run_dir, force=f, log=log),
            "prune": lambda f: run_prune(cfg, run_dir, force=f, log=log),
            "train": lambda f: train(c, f, dataset="kept", name=f"train{sfx}"),
            "evaluate": lambda f: evaluate(c, sfx),
            "baseline_random": lambda f: baseline_random(f, k),
            "baseline_full": lambda f: baseline_full(f, k),
        }[base]

    status = "FAILED"
    try:
        for name in stages:
            if state.is_current(name, fps[name]) and name not in forced:
                result.skipped.append(name)
                log(f"[{name}] up to date, skipped")
                continue
            state.invalidate(_downstream(stages, name))
            log(f"[{name}] running")
            start = time.perf_counter()
            # Only --force wipes a stage's output (and that of every stage after it); otherwise
            # the stage's own manifest logic resumes what an interrupted run finished.
            summary = stage_fn(name)(name in forced)
            result.stage_seconds[name] = time.perf_counter() - start
            result.summaries[name] = summary
            # train and evaluate print their own tables; the others return theirs
            if name in ("ingest", "score", "prune") and summary is not None:
                log(summary.format())
            log(f"[{name}] done in {result.stage_seconds[name]:.1f}s")
            state.mark(name, fps[name], stage_inputs(cfg, name, stamps))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result.wall_s = time.perf_counter() - begin
        if status == "FINISHED":
            result.report = pipeline_report(cfg, run_dir)
            storage.atomic_write_bytes(
                storage.join(run_dir, "report.json"),
                json.dumps(
                    {
                        **result.report.to_dict(),
                        "stage_seconds": result.stage_seconds,
                        "skipped": result.skipped,
                        "wall_s": result.wall_s,
                        "mlflow_run_id": result.mlflow_run_id,
                        "tracking_uri": tracking.redact(result.tracking_uri),
                    },
                    indent=1,
                ).encode(),
            )
        if parent is not None:
            if status == "FINISHED":
                _log_parent(parent, cfg, run_dir, result, log)
            tracking.safe(parent.finish, status, log=log)
    log(result.format(stages))
    return result
