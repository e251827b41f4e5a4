"""`run_train`, the training stage: the inputs and their fingerprint, the Ray Train run (or the
loop in this process), its MLflow run, the final model and `summary.json`.

The Ray run is named `<name>-<fingerprint of every input>`, so rerunning the same inputs resumes
from the last checkpoint (or is a no-op once `summary.json` exists), changed inputs never resume
a stale one, and `force=True` deletes the run's checkpoints and starts over. A checkpoint whose
batch plan differs from this run's is refused before anything starts (`plan.check_resume`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from puma_ray import storage, tracking
from puma_ray.config import PipelineConfig, TrainingConfig
from puma_ray.data import dataset_dirs, open_dataset, validation_dir
from puma_ray.errors import ConfigError
from puma_ray.stages import recipe_dump
from puma_ray.train.checkpoints import (
    STATE_FILE,
    _checkpoint_metas,
    _last_reported_epoch,
    _load_state,
    _read_json,
    save_final_model,
)
from puma_ray.train.init import init_model, init_stamp
from puma_ray.train.loop import train_loop
from puma_ray.train.plan import TrainingError, batch_plan, check_resume, epoch_plan
from puma_ray.train.session import _LocalSession
from puma_ray.train.streams import stream_files


@dataclass
class TrainSummary:
    name: str
    dataset: str
    model_path: str
    epochs: int
    rows: int
    workers: int
    objective: str
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    skipped: bool = False
    fingerprint: str = ""
    ray_run_path: str | None = None
    mlflow_run_id: str | None = None
    wall_s: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        f = self.final
        head = "up to date, nothing to do" if self.skipped else f"{self.wall_s:.1f} s"
        lines = [
            f"train {self.name}: {self.objective} on the {self.dataset} set "
            f"({self.rows} rows, {self.workers or 'in-process'} workers), {head}",
        ]
        if self.resumed_from_epoch:
            lines.append(f"  resumed after epoch {self.resumed_from_epoch}")
        lines.append(
            f"  {'epoch':>5} {'loss':>8} {'clean':>7} {'adv':>7} {'val':>7} {'robust':>7} "
            f"{'lr':>9} {'samples/s':>10}"
        )
        for m in self.history[-10:]:
            lines.append(
                f"  {m['epoch']:>5} {m['train_loss']:>8.4f} {m['train_clean_acc']:>7.4f} "
                f"{m['train_adv_acc']:>7.4f} {m.get('val/epoch_clean_acc', float('nan')):>7.4f} "
                f"{m.get('val/epoch_robust_acc', float('nan')):>7.4f} {m['lr']:>9.2e} "
                f"{m['samples_per_s']:>10.1f}"
            )
        if f:
            lines.append(f"  device-seconds {f['device_seconds']:.1f}")
        lines.append(f"  model: {self.model_path}")
        return "\n".join(lines)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs(cfg: PipelineConfig, run_dir: str, dataset: str, kept_dir: str | None) -> dict:
    """Shard files, row count and fingerprint of the training data."""
    train_uri, _ = dataset_dirs(run_dir)
    val_uri = validation_dir(run_dir)  # the per-epoch check's rows; never the test split
    full = open_dataset(train_uri)
    info = full.info
    if dataset == "full":
        return dict(
            files=full.files,
            file_sources=[dict(sh.rows_per_source) for sh in info.shards],
            source_rows=dict(info.rows_per_source),
            rows=full.num_rows,
            has_eps=False,
            fingerprint=info.fingerprint,
            image_shape=list(info.image_shape),
            num_classes=info.num_classes,
            val_uri=val_uri,
        )
    if dataset != "kept":
        raise ConfigError(f"--dataset {dataset}: expected 'kept' or 'full'")
    from puma_ray.prune import kept_dir as default_kept_dir
    from puma_ray.prune import kept_files

    files, manifest = kept_files(kept_dir or default_kept_dir(run_dir))
    rows = int(manifest["counts"]["kept"])
    if rows == 0:
        raise TrainingError(f"{kept_dir or default_kept_dir(run_dir)}: the kept set is empty")
    per_source = manifest["counts"].get("per_source", {})
    return dict(
        files=files,
        # None: a kept set written before per-file counts (its files are filtered by source)
        file_sources=[sh.get("rows_per_source") for sh in manifest["shards"]],
        source_rows={s: int(c["kept"]) for s, c in per_source.items()},
        rows=rows,
        has_eps=True,
        fingerprint=manifest["fingerprint"],
        image_shape=list(info.image_shape),
        num_classes=info.num_classes,
        val_uri=val_uri,
    )


def run_train(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    dataset: Literal["kept", "full"] = "kept",
    name: str = "train",
    kept_dir: str | None = None,
    mlflow_parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
    debug_dir: str | None = None,
    debug_fail: dict | None = None,
    ray_run_name: str | None = None,
    ray_storage_path: str | None = None,
    callbacks: list | None = None,
    mlflow_run_name: str | None = None,
    force: bool = False,
) -> TrainSummary:
    """Train on the kept set (per-sample eps) or the full sample set (uniform eps); write
    `<run_dir>/<name>/model.pt` and then `summary.json`. Rerunning with the same inputs is a
    no-op once finished and resumes from the last epoch checkpoint otherwise. `force` trains
    from epoch 0 in a new MLflow run: it first deletes this run's summary, model and
    checkpoints (the Ray Train run directory and the in-process checkpoint), nothing else.

    `debug_dir` makes every rank save the sample ids it trained on per epoch; `debug_fail`
    ({"rank", "epoch", "marker"}, optional "at": "step" | "report") kills one worker once
    (tests of failure recovery).

    For sweeps (each Tune trial drives its own TorchTrainer): `ray_run_name` and
    `ray_storage_path` replace the Ray Train run's `<name>-<fingerprint>` and
    `<run_dir>/ray_train` (a stable name is what resumes a restarted trial), `callbacks` are
    extra `ray.train.UserCallback`s such as Tune's `TuneReportCallback`, and
    `mlflow_run_name` names the MLflow run (default `name`)."""
    start = time.perf_counter()
    # the recipe is cfg.model / cfg.training: the margin model is trained with
    # `pipeline.margin_model_config(cfg)`, and the unpruned baseline of `--compare` with cfg itself
    tcfg = cfg.training
    inp = _inputs(cfg, run_dir, dataset, kept_dir)
    num_classes = cfg.data.num_classes or inp["num_classes"]
    net = init_model(cfg, num_classes, inp["image_shape"])  # the arch, and initial weights
    fp = _run_fingerprint(cfg, dataset, inp, num_classes, init_stamp(cfg))
    out_dir = storage.join(run_dir, name)
    model_path = storage.join(out_dir, "model.pt")
    summary_path = storage.join(out_dir, "summary.json")
    done = _finished(summary_path, model_path, fp, force)
    if done is not None:
        log(done.format())
        return done

    world = max(1, cfg.ray.num_workers)
    current_plan = _checked_batch_plan(inp, tcfg, world, name)
    if cfg.ray.num_workers > 0:  # Ray Train would wait forever for workers that cannot exist
        from puma_ray.runtime import check_feasible, ensure_ray, train_request

        ensure_ray(cfg.ray)
        bundle, workers = train_request(cfg.ray)
        check_feasible(
            bundle,
            f"train {name} (ray.num_workers workers)",
            workers,
            hint="lower ray.num_workers or ray.cpus_per_worker, or set ray.use_gpu false",
        )
    ray_storage_path, ray_name, ray_run, local_ckpt = _checkpoint_dirs(
        run_dir, out_dir, name, fp, ray_storage_path=ray_storage_path, ray_run_name=ray_run_name
    )
    if force:
        log(f"train {name}: forced: deleting its summary, model and checkpoints, from epoch 0")
        # the summary first: an interrupted forced run must not look finished
        for path in (summary_path, model_path, ray_run, local_ckpt):
            if path is not None:
                storage.delete(path)
    # a resume on another worker count must not silently change the batch or the lr schedule
    for where, meta in _checkpoint_metas(local_ckpt if cfg.ray.num_workers == 0 else ray_run):
        check_resume(meta.get("batch_plan"), current_plan, where)

    run = _start_mlflow_run(
        cfg,
        run_dir,
        out_dir,
        fp,
        inp,
        dataset=dataset,
        run_name=mlflow_run_name or name,
        parent_run_id=mlflow_parent_run_id,
        force=force,
        log=log,
    )
    loop_config = _loop_config(cfg, name, net, num_classes, inp, run, debug_dir, debug_fail)
    log(
        f"train {name}: {tcfg.objective} on {inp['rows']} {dataset} rows, {tcfg.epochs} epochs, "
        f"{cfg.ray.num_workers or 'in-process'} workers (run {ray_name})"
    )
    datasets = _datasets(cfg, inp, world)
    status = "FAILED"
    try:
        state, history, resumed, ray_path = _run_loop(
            cfg,
            loop_config,
            datasets,
            name,
            inp["files"],
            local_ckpt=local_ckpt,
            storage_path=ray_storage_path,
            run_name=ray_name,
            callbacks=callbacks,
            log=log,
        )
        if state is None:
            raise TrainingError(f"train {name}: finished without a checkpoint")
        save_final_model(
            model_path, cfg, net, num_classes, state, history, inp, dataset=dataset, fp=fp
        )
        status = "FINISHED"
    finally:
        if run is not None:
            tracking.safe(run.finish, status, log=log)
    summary = TrainSummary(
        name=name,
        dataset=dataset,
        model_path=model_path,
        epochs=tcfg.epochs,
        rows=inp["rows"],
        workers=cfg.ray.num_workers,
        objective=tcfg.objective,
        history=history,
        resumed_from_epoch=resumed,
        fingerprint=fp,
        ray_run_path=ray_path,
        mlflow_run_id=run.run_id if run else None,
        wall_s=time.perf_counter() - start,
    )
    storage.atomic_write_bytes(summary_path, json.dumps(summary.to_dict(), indent=1).encode())
    log(summary.format())
    return summary


# ----------------------------------------------------------------------------------------------
# The steps of run_train, in its order.


def _run_fingerprint(
    cfg: PipelineConfig, dataset: str, inp: dict, num_classes: int, init: str | None = None
) -> str:
    """The fingerprint of every input of the run: it names the Ray Train run (so only the same
    inputs resume its checkpoints) and marks a finished `summary.json`. `init` is the content
    fingerprint of `training.init_from`'s weights (`init.init_stamp`)."""
    inputs = {
        "data": inp["fingerprint"],
        "dataset": dataset,
        "model": cfg.model.model_dump(),
        "training": recipe_dump(cfg.training.model_dump()),
        "num_classes": num_classes,
        # not the worker count or evaluation settings: they change neither the recipe nor
        # the global batch, so a finished model stays valid; a checkpoint is resumed on
        # other workers only if its batch plan is the same (`check_resume`)
    }
    if init is not None:
        inputs["init_from"] = init
    return _fingerprint(inputs)


def _finished(summary_path: str, model_path: str, fp: str, force: bool) -> TrainSummary | None:
    """The summary of a finished run of the same inputs (marked skipped), unless `force`."""
    old = _read_json(summary_path)
    if (
        not force
        and old is not None
        and old.get("fingerprint") == fp
        and storage.exists(model_path)
    ):
        return TrainSummary(**{**old, "skipped": True})
    return None


def _checked_batch_plan(inp: dict, tcfg: TrainingConfig, world: int, name: str) -> dict:
    """This run's batch plan; a global batch that does not split over the workers is a
    ConfigError naming the setting (under `margin_model.train.` for the margin model)."""
    try:
        return batch_plan(inp["source_rows"], inp["rows"], tcfg, world)
    except ConfigError as e:
        msg = str(e)
        if name == "margin_model":  # its recipe is margin_model.train in the config file
            msg = msg.replace("training.", "margin_model.train.")
        raise ConfigError(f"train {name}: {msg}") from None


def _checkpoint_dirs(
    run_dir: str,
    out_dir: str,
    name: str,
    fp: str,
    *,
    ray_storage_path: str | None,
    ray_run_name: str | None,
) -> tuple[str, str, str, str | None]:
    """(Ray Train storage path, Ray run name, Ray run directory, in-process checkpoint directory
    or None on remote storage) of this run; the defaults are `<run_dir>/ray_train` and
    `<name>-<fingerprint>`."""
    if ray_storage_path is None:
        ray_storage_path = (
            os.path.join(storage.local_path(run_dir), "ray_train")
            if storage.is_local(run_dir)
            else storage.join(run_dir, "ray_train")
        )
    ray_name = ray_run_name or f"{name}-{fp}"
    ray_run = storage.join(ray_storage_path, ray_name)
    local_ckpt = (
        os.path.join(storage.local_path(out_dir), f"local-{fp}")
        if storage.is_local(out_dir)
        else None
    )
    return ray_storage_path, ray_name, ray_run, local_ckpt


def _start_mlflow_run(
    cfg: PipelineConfig,
    run_dir: str,
    out_dir: str,
    fp: str,
    inp: dict,
    *,
    dataset: str,
    run_name: str,
    parent_run_id: str | None,
    force: bool,
    log: Callable[[str], None],
):
    """The MLflow run of this training (None when tracking is off). The run recorded in
    `<out_dir>/mlflow_run.json` is resumed if it has the same fingerprint (never after
    `force`); the one started is recorded there."""
    storage.makedirs(out_dir)
    run_file = storage.join(out_dir, "mlflow_run.json")
    prev = {} if force else _read_json(run_file) or {}
    run = tracking.start_run(
        cfg.tracking,
        run_dir,
        run_name=run_name,
        params={
            "dataset": dataset,
            "rows": inp["rows"],
            "model": cfg.model.model_dump(),
            "training": cfg.training.model_dump(mode="json"),
            "workers": cfg.ray.num_workers,
        },
        tags={"puma_ray.stage": "train", "puma_ray.fingerprint": fp},
        parent_run_id=parent_run_id,
        resume_run_id=prev.get("run_id") if prev.get("fingerprint") == fp else None,
        log=log,
    )
    if run is not None:
        storage.atomic_write_bytes(
            run_file, json.dumps({"run_id": run.run_id, "fingerprint": fp}).encode()
        )
    return run


def _loop_config(
    cfg: PipelineConfig,
    name: str,
    net: dict,
    num_classes: int,
    inp: dict,
    run,
    debug_dir: str | None,
    debug_fail: dict | None,
) -> dict:
    """The plain-data config of `train_loop` (what every worker receives); `net` is the arch,
    its options and the initial weights' reference (`init.init_model`)."""
    tcfg, ev = cfg.training, cfg.evaluation
    return {
        "name": name,
        "training": tcfg.model_dump(mode="json"),
        "arch": net["arch"],
        "model_kwargs": dict(net["model_kwargs"]),
        "init_from": net["init_from"],
        "num_classes": num_classes,
        "image_shape": inp["image_shape"],
        "num_rows": inp["rows"],
        "source_rows": inp["source_rows"],
        "has_eps": inp["has_eps"],
        "uniform_eps": tcfg.attack.epsilon,
        "val_uri": inp["val_uri"],
        "evaluation": {
            "pgd_steps": ev.epoch_pgd_steps,
            "batch_size": ev.batch_size,
            "train_subset": min(ev.subset or ev.epoch_subset, ev.epoch_subset),
        },
        "mlflow": run,
        "use_gpu": cfg.ray.use_gpu,
        "debug_dir": debug_dir,
        "debug_fail": debug_fail,
    }


def _datasets(cfg: PipelineConfig, inp: dict, world: int) -> dict:
    """One Ray Data dataset per stream of the epoch plan (Ray started first if it is not up):
    the stream's shard files, filtered by `source` where a file holds both sources, read in
    file order."""
    columns = ["id", "image", "label", "source"] + (["eps"] if inp["has_eps"] else [])
    from puma_ray.runtime import ensure_ray, read_parquet

    ensure_ray(cfg.ray)
    from ray.data.expressions import col

    plan = epoch_plan(inp["source_rows"], cfg.training, world)
    datasets = {}
    for stream, (files, filter_rows) in stream_files(
        inp["files"], inp["file_sources"], plan.batch
    ).items():
        ds = read_parquet(files).select_columns(columns)  # page checksums verified
        ds = ds.filter(expr=col("source") == stream) if filter_rows else ds
        # the batch order (and so the model) must not depend on which read task ends first
        ds.context.execution_options.preserve_order = True
        datasets[stream] = ds
    return datasets


def _run_loop(
    cfg: PipelineConfig,
    loop_config: dict,
    datasets: dict,
    name: str,
    files: list[str],
    *,
    local_ckpt: str | None,
    storage_path: str,
    run_name: str,
    callbacks: list | None,
    log: Callable[[str], None],
):
    """The training loop in this process (`ray.num_workers: 0`) or under TorchTrainer; returns
    (final state or None, history, resumed epoch, Ray run path or None)."""
    if cfg.ray.num_workers == 0:
        state, history, resumed = _train_in_process(
            loop_config, datasets, local_ckpt, name, files, log
        )
        return state, history, resumed, None
    return _fit(
        cfg,
        cfg.training,
        loop_config,
        datasets,
        name,
        storage_path=storage_path,
        run_name=run_name,
        callbacks=callbacks,
        files=files,
    )


def _train_in_process(
    loop_config: dict,
    datasets: dict,
    local_ckpt: str | None,
    name: str,
    files: list[str],
    log: Callable[[str], None],
):
    """`ray.num_workers: 0`: the loop in this process, checkpoints in `local_ckpt` (a temporary
    directory for a remote run directory); returns (final state, history, resumed epoch)."""
    session = _LocalSession(datasets, local_ckpt or tempfile.mkdtemp(), log)
    prior = session.checkpoint_state()
    resumed = int(prior["epoch"]) + 1 if prior else 0
    try:
        history = train_loop(loop_config, session)
    except Exception as e:
        _raise_if_corrupt(e, name, files)
        raise
    return session.checkpoint_state(), history, resumed


def _ordered_ingest():
    """Ray Train's ingest options with `preserve_order`: each worker's batches then arrive in
    the files' order, whatever the read tasks' finishing order, so a run (and a resumed run)
    sees the same batches."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def _fit(
    cfg: PipelineConfig,
    tcfg: TrainingConfig,
    loop_config: dict,
    datasets: dict,
    name,
    *,
    storage_path: str,
    run_name: str,
    callbacks=None,
    files: list[str] | None = None,
):
    """Run the loop under TorchTrainer; returns (final state, history, resumed epoch, path)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resumed = _last_reported_epoch(storage.join(storage_path, run_name))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={
                "CPU": cfg.ray.cpus_per_worker,
                **({"GPU": 1} if cfg.ray.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.checkpoints_to_keep),
            # the loop prints one line per epoch; Ray Train's INFO lines repeat every report
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=_ordered_ingest(),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # WorkerGroupError / ControllerError after retries ran out
        _raise_if_corrupt(e, name, files)
        raise TrainingError(f"train {name}: failed after {tcfg.max_failures} retries: {e}") from e
    if result.checkpoint is None:
        return None, [], resumed, result.path
    with result.checkpoint.as_directory() as d:
        state = _load_state(os.path.join(d, STATE_FILE))
    return state, list(state["history"]), resumed, result.path


def _raise_if_corrupt(e: BaseException, name: str, files: list[str] | None) -> None:
    """A Parquet page that failed its checksum: one line naming the shards' directory (Ray's
    error does not say which file), instead of a worker traceback."""
    from puma_ray.errors import DataError
    from puma_ray.runtime import is_checksum_error

    if is_checksum_error(e):
        where = os.path.dirname(files[0]) if files else "the training shards"
        raise DataError(
            f"{where}: a Parquet page of a shard failed its checksum (train {name}): the data "
            "is corrupt; rebuild it (`puma-ray ingest --force`, then prune)"
        ) from None
