"""The Python API: one function per command, for notebooks and scripts.

    from puma_ray import api

    result = api.run("tune_configs/demo.yaml", "runs/demo", overrides=["training.epochs=2"])

Every function takes a config (a YAML path, a `PipelineConfig`, or None for the embedded demo)
plus `overrides` (`--set` values) and `smoke_test`, and a run dir (default `runs/<name>`;
`X-smoke` for a smoke test, as on the command line); it takes the run dir's lock, starts Ray
the way the commands do (`runtime.ensure_ray` with the config's `ray` section, so the tuned Ray
Data settings apply; not for `evaluate`, nor `ingest` / `prune` with `parallel=False`, which
need no Ray) and returns the stage's summary object. Ray's and MLflow's own messages go to the
run's log file unless `verbose` (`puma_ray.logs`). Each function is what the command of the
same name does; the CLI calls them.

The names are not the stage modules' (`puma_ray.train` is a package, `puma_ray.api.train` a
function), hence `from puma_ray import api` rather than top-level functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from puma_ray import logs
from puma_ray.config import PipelineConfig, load_config
from puma_ray.smoke import smoke_run_dir

DEFAULT_RUNS = "runs"
Config = str | os.PathLike | PipelineConfig | None
Log = Callable[[str], None]


def load(
    config: Config = None, overrides: Iterable[str] = (), *, smoke_test: bool = False
) -> PipelineConfig:
    """The validated config: a YAML path, a PipelineConfig (returned as is without overrides)
    or None (the embedded demo), with `overrides` ("training.epochs=3") and `--smoke-test`."""
    overrides = list(overrides)
    if isinstance(config, PipelineConfig) and not overrides and not smoke_test:
        return config
    return load_config(config, overrides, smoke_test=smoke_test)


def absolute(path: str | os.PathLike | None) -> str | None:
    """Local paths (and `file://` URIs) made absolute paths, since Ray workers run elsewhere;
    remote URIs (s3://, gs://) as given."""
    if path is None:
        return None
    path = os.fspath(path)
    if not path or ("://" in path and not path.startswith("file://")):
        return path
    from puma_ray.storage import local_path

    return local_path(path)


def run_dir_for(
    cfg: PipelineConfig, run_dir: str | os.PathLike | None = None, *, smoke_test: bool = False
) -> str:
    """`run_dir` (with `-smoke` appended for a smoke test), else runs/<config name> (a smoke
    test's config is already named `<name>-smoke`); absolute."""
    if run_dir is None:
        run_dir = os.path.join(DEFAULT_RUNS, cfg.name)
    elif smoke_test:
        run_dir = smoke_run_dir(os.fspath(run_dir))
    return absolute(run_dir)


@contextmanager
def _stage(
    command: str,
    cfg_in: Config,
    run_dir: Any,
    overrides: Iterable[str],
    smoke_test: bool,
    verbose: bool,
    log: Log | None,
    *,
    lock: bool = True,
) -> Iterator[tuple[PipelineConfig, str]]:
    """(config, run dir) inside the command's log session and run-dir lock."""
    cfg = load(cfg_in, overrides, smoke_test=smoke_test)
    run_dir = run_dir_for(cfg, run_dir, smoke_test=smoke_test)
    with logs.session(command, verbose=verbose, run_dir=run_dir, say=log or print):
        if not lock:
            yield cfg, run_dir
            return
        from puma_ray.locking import run_dir_lock

        with run_dir_lock(run_dir, command, log=log or print):
            yield cfg, run_dir


def _ray(cfg: PipelineConfig) -> None:
    from puma_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)


def ingest(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    force: bool = False,
    parallel: bool = True,
    verbose: bool = False,
    log: Log | None = None,
):
    """`puma-ray ingest`: the sources -> `<run_dir>/data` (an IngestSummary); `log` gets a line
    per shard (default stderr)."""
    from puma_ray.ingest import run_ingest

    with _stage("ingest", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        if parallel:
            _ray(cfg)
        return run_ingest(cfg, rd, parallel=parallel, force=force, log=log)


def score(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    force: bool = False,
    embeddings: bool | None = None,
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray score`: DeepFool margins -> `<run_dir>/scores` (a ScoreSummary)."""
    from puma_ray.score import run_score

    with _stage("score", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        _ray(cfg)
        return run_score(cfg, rd, force=force, embeddings=embeddings, log=log)


def prune(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    force: bool = False,
    parallel: bool = True,
    out_dir: str | None = None,
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray prune`: the kept set -> `<run_dir>/kept` or `out_dir` (a PruneSummary)."""
    from puma_ray.prune import run_prune

    with _stage("prune", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        if parallel:
            _ray(cfg)
        return run_prune(
            cfg, rd, force=force, parallel=parallel, out_dir=absolute(out_dir), log=log
        )


def train(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    dataset: str = "kept",
    name: str | None = None,
    kept_dir: str | None = None,
    force: bool = False,
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray train`: Ray Train on the kept set, or with `dataset="full"` the margin model
    (its recipe, `margin_model.*`) on all rows; -> `<run_dir>/<name>` (a TrainSummary)."""
    from puma_ray.pipeline import margin_model_config
    from puma_ray.train import run_train

    with _stage("train", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        default = "margin_model" if dataset == "full" else "train"
        name = default if name is None else _plain(name)
        _ray(cfg)
        return run_train(
            margin_model_config(cfg) if dataset == "full" else cfg,
            rd,
            dataset=dataset,
            name=name,
            kept_dir=absolute(kept_dir),
            force=force,
            log=log,
        )


def evaluate(
    checkpoint: str,
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    split: str = "test",
    name: str | None = None,
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray evaluate`: clean and robust accuracy of `checkpoint` (a model.pt, or a zoo
    model `robustbench:NAME`) on the test (or val) split -> `<run_dir>/<name>` (an
    EvalSummary). Runs in this process, without Ray."""
    from puma_ray.evaluate import run_evaluate

    with _stage("evaluate", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        default = "evaluate" if split == "test" else "evaluate_val"
        name = default if name is None else _plain(name)
        if checkpoint.startswith("robustbench:"):  # a zoo model, as `puma-ray evaluate` takes
            from puma_ray.models.zoo import resolve_model_arg

            checkpoint = resolve_model_arg(checkpoint, cfg.margin_model.robustbench)
        else:
            checkpoint = absolute(checkpoint)
        return run_evaluate(cfg, rd, checkpoint, split=split, name=name, log=log)


def run(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    force: Iterable[str] = (),
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray run`: every stage not up to date (`force`: stage names to redo, with what
    reads them); a PipelineResult (`.report.table()`, `.summaries`, `.stage_seconds`)."""
    from puma_ray.pipeline import run_pipeline

    # run_pipeline takes the lock itself (before Ray starts) and starts Ray
    stage = _stage("run", config, run_dir, overrides, smoke_test, verbose, log, lock=False)
    with stage as (cfg, rd):
        return run_pipeline(cfg, rd, force=tuple(force), log=log)


def sweep(
    config: Config = None,
    run_dir: str | None = None,
    *,
    overrides: Iterable[str] = (),
    smoke_test: bool = False,
    fresh: bool = False,
    tracking_uri: str | None = None,
    verbose: bool = False,
    log: Log = print,
):
    """`puma-ray sweep`: the Ray Tune sweep of `sweep.space` (a SweepResult); restores an
    interrupted one unless `fresh`."""
    from puma_ray.sweep import run_sweep

    # run_sweep checks the search space before it starts Ray; its trials write into the run dir
    # under this lock, held by the driver
    with _stage("sweep", config, run_dir, overrides, smoke_test, verbose, log) as (cfg, rd):
        return run_sweep(cfg, rd, tracking_uri=tracking_uri, resume=not fresh, log=log)


def _plain(name: str) -> str:
    """An output name: one folder under the run dir, never a path that leads out of it."""
    from puma_ray.config import check_plain_name

    return check_plain_name(name, "name")
