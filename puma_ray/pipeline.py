"""`puma-ray run`: ingest → margin model → score → prune → train → evaluate, from one config.

Each stage has an input fingerprint: a hash of the config sections it reads and of the
fingerprints of the stages it consumes. `<run_dir>/pipeline.json` records the fingerprint of each
finished stage (written after the stage's own manifest), so a rerun skips every stage whose
fingerprint still matches and recomputes from the first changed one; downstream stages follow
automatically because their fingerprints include it. `--force STAGE` redoes one stage (and
therefore everything after it).

MLflow: one parent run per pipeline with each stage's summary metrics (prefixed by stage) and
artifacts; each training run (margin model, the pruned run, comparison runs) is a child run
with its per-epoch metrics. Sweeps use the same shape: parent per sweep, child per trial.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig
from puma_ray.errors import ConfigError

STAGES = ("ingest", "margin_model", "score", "prune", "train", "evaluate")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """What each stage's result depends on. Resources (Ray address, workers) are left out:
    they change how fast a stage runs, not what it produces."""
    d = cfg.model_dump(mode="json")
    fp: dict[str, str] = {}
    fp["ingest"] = _hash(d["data"])
    margin_inputs = (
        {"checkpoint": d["margin_model"]["checkpoint"]}
        if cfg.margin_model.checkpoint
        else {"model": d["margin_model"]["model"], "train": d["margin_model"]["train"]}
    )
    fp["margin_model"] = _hash([fp["ingest"], margin_inputs, d["seed"]])
    fp["score"] = _hash([fp["margin_model"], d["scoring"]])
    fp["prune"] = _hash([fp["score"], d["pruning"], d["training"]["attack"]])
    fp["train"] = _hash([fp["prune"], d["model"], d["training"], d["seed"]])
    fp["evaluate"] = _hash([fp["train"], d["evaluation"]])
    return fp


@dataclass
class PipelineResult:
    run_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    summaries: dict[str, Any] = field(default_factory=dict)


class PipelineState:
    """`<run_dir>/pipeline.json`: the fingerprint each finished stage was computed with."""

    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, "pipeline.json")
        self.done: dict[str, str] = {}
        if storage.exists(self.path):
            self.done = json.loads(storage.read_bytes(self.path)).get("stages", {})

    def is_current(self, stage: str, fingerprint: str) -> bool:
        return self.done.get(stage) == fingerprint

    def invalidate(self, stage: str) -> None:
        """Forget `stage` before redoing it, so an interrupted redo is never taken as done."""
        if self.done.pop(stage, None) is not None:
            self._write()

    def mark(self, stage: str, fingerprint: str) -> None:
        self.done[stage] = fingerprint
        self._write()

    def _write(self) -> None:
        storage.atomic_write_bytes(self.path, json.dumps({"stages": self.done}, indent=2).encode())


def margin_model_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the margin model is trained with: the same pipeline, its own model/recipe."""
    out = cfg.model_copy(deep=True)
    out.model = cfg.margin_model.model.model_copy(deep=True)
    out.training = cfg.margin_model.train.model_copy(deep=True)
    return out


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> PipelineResult:
    for stage in force:
        if stage not in STAGES:
            raise ConfigError(f"--force {stage}: unknown stage (stages: {', '.join(STAGES)})")
    from puma_ray.evaluate import run_evaluate
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune
    from puma_ray.runtime import ensure_ray
    from puma_ray.score import run_score
    from puma_ray.train import run_train

    ensure_ray(cfg.ray)
    storage.makedirs(run_dir)
    fps = stage_fingerprints(cfg)
    state = PipelineState(run_dir)
    result = PipelineResult(run_dir=run_dir)
    redo_from = min((STAGES.index(s) for s in force), default=len(STAGES))

    def stage_fn(name: str) -> Callable[[bool], Any]:
        return {
            "ingest": lambda f: run_ingest(cfg, run_dir, parallel=True, force=f),
            "margin_model": lambda f: (
                None
                if cfg.margin_model.checkpoint
                else run_train(
                    margin_model_config(cfg), run_dir, dataset="full", name="margin_model"
                )
            ),
            "score": lambda f: run_score(cfg, run_dir, force=f, log=log),
            "prune": lambda f: run_prune(cfg, run_dir, force=f),
            "train": lambda f: run_train(cfg, run_dir, dataset="kept", name="train"),
            "evaluate": lambda f: run_evaluate(
                cfg, run_dir, checkpoint=storage.join(run_dir, "train", "model.pt")
            ),
        }[name]

    for i, name in enumerate(STAGES):
        current = state.is_current(name, fps[name]) and i < redo_from
        if current:
            result.skipped.append(name)
            log(f"[{name}] up to date, skipped")
            continue
        state.invalidate(name)
        log(f"[{name}] running")
        start = time.perf_counter()
        # Only an explicit --force wipes a stage's output; otherwise the stage's own manifest and
        # fingerprint logic resumes what an interrupted run finished (e.g. scored shards).
        summary = stage_fn(name)(name in force)
        result.stage_seconds[name] = time.perf_counter() - start
        result.summaries[name] = summary
        # train and evaluate print their own tables; the others return theirs
        if name in ("ingest", "score", "prune") and summary is not None:
            log(summary.format())
        log(f"[{name}] done in {result.stage_seconds[name]:.1f}s")
        state.mark(name, fps[name])
    return result
