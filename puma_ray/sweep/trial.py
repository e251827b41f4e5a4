"""One sweep trial, as it runs inside a Tune trial actor: prune the trial's kept set from the
shared scores, train it with its own `TorchTrainer` (per-epoch reports relayed to Tune), evaluate
it, log it to its MLflow child run and write `result.json`. Everything a trial needs comes in
`ctx` (plain data), so the functions handed to Tune and Ray stay module-level (pickled by
reference). The trial's file helpers live here too; the driver reads the same files."""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig, dump_yaml
from puma_ray.sweep.plan import (
    _describe,
    apply_values,
    config_values,
    is_unpruned,
    trial_values,
)

TRIAL_FILE = "trial.json"
RESULT_FILE = "result.json"
ATTEMPTS_FILE = "attempts.log"


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_json(uri: str, obj: Any) -> None:
    storage.atomic_write_bytes(uri, json.dumps(obj, indent=1, default=str).encode())


def _append_line(uri: str, line: str) -> None:
    old = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
    storage.atomic_write_bytes(uri, (old + line + "\n").encode())


def _trial_name(trial) -> str:
    """Stable across restores: Tune keeps trial ids (`<experiment>_<index>`)."""
    return "trial_" + str(trial.trial_id).rsplit("_", 1)[-1]


def _outside_trial(fn, num_cpus: float):
    """`fn` as a Ray task scheduled outside the calling trial's placement group. Tune makes a
    trial's child tasks inherit its bundle (`sweep.trial_cpus`, default 0), where a task that
    needs CPUs waits forever. Ray Data escapes the same way (ray/data/_internal/remote_fn)."""
    import ray

    return ray.remote(fn).options(num_cpus=num_cpus, scheduling_strategy="DEFAULT", max_retries=1)


def _prune_task(cfg_json: dict, run_dir: str, out_dir: str) -> dict:
    from puma_ray.prune import run_prune

    cfg = PipelineConfig.model_validate(cfg_json)
    s = run_prune(cfg, run_dir, out_dir=out_dir, parallel=True, log=print)
    print(s.format(), flush=True)
    return {
        "rows": s.rows,
        "kept": s.kept,
        "pruned": s.pruned,
        "eps_adjusted": s.eps_adjusted,
        "description": s.description,
        "skipped": s.skipped_stage,
    }


def _evaluate_task(cfg_json: dict, run_dir: str, checkpoint: str, name: str) -> dict:
    """The trial's model on the validation split (what `sweep.metric` chooses on) and on the
    test split (reported beside it): {"val": summary, "test": summary}."""
    from puma_ray.evaluate import run_evaluate

    cfg = PipelineConfig.model_validate(cfg_json)
    # the trial's MLflow run gets these numbers; evaluate must not open a second run
    cfg.tracking.tracking_uri = "none"
    return {
        split: run_evaluate(
            cfg, run_dir, checkpoint, split=split, name=f"{name}_{split}", log=print
        ).to_dict()
        for split in ("val", "test")
    }


def _maybe_fail(debug: dict | None, values: dict, baseline: bool) -> None:
    """Test hook: fail the trial whose values contain `debug["values"]` once (marker file),
    after its training finished, as a crash between training and evaluation would."""
    if not debug or baseline:
        return
    if any(config_values(values).get(k) != v for k, v in debug["values"].items()):
        return
    if storage.exists(debug["marker"]):
        return
    storage.atomic_write_bytes(debug["marker"], b"failed once\n")
    raise RuntimeError(f"debug_fail: trial {_describe(values)} fails once on purpose")


@dataclass
class _Trial:
    """One trial as its own process sees it: its values, its config and where its files go."""

    name: str
    cfg: PipelineConfig
    values: dict[str, Any]
    baseline: bool
    unpruned: bool
    label: str
    dir: str  # <sweep_dir>/<trial>
    rel: str  # sweep/<sweep_id>/<trial>: run_train and run_evaluate name their dirs by it
    info: dict[str, Any]  # trial.json (less "unpruned"), result.json and the MLflow run share it


def _open_trial(config: dict, ctx: dict) -> _Trial:
    """The trial's config from the sweep's and its Tune config; its directory created, the
    attempt appended to attempts.log and trial.json written."""
    import ray.tune

    name = ray.tune.get_context().get_trial_name()
    values, baseline = trial_values(config, ctx["swept"])
    cfg = apply_values(PipelineConfig.model_validate(ctx["config"]), values)
    unpruned = is_unpruned(cfg)
    label = _describe({"baseline": True} if baseline else values)
    t = _Trial(
        name=name,
        cfg=cfg,
        values=values,
        baseline=baseline,
        unpruned=unpruned,
        label=label,
        dir=storage.join(ctx["sweep_dir"], name),
        rel=posixpath.join("sweep", ctx["sweep_id"], name),
        info={"trial": name, "label": label, "values": values, "baseline": baseline},
    )
    storage.makedirs(t.dir)
    _append_line(storage.join(t.dir, ATTEMPTS_FILE), time.strftime("%Y-%m-%dT%H:%M:%S start"))
    _write_json(storage.join(t.dir, TRIAL_FILE), {**t.info, "unpruned": unpruned})
    return t


def _prune_kept(t: _Trial, run_dir: str) -> tuple[dict | None, str | None]:
    """(prune summary, kept dir) of the trial; (None, None) for the added baseline, which
    trains on the sample shards themselves (no copy)."""
    import ray

    if t.baseline:
        return None, None
    kept = storage.join(t.dir, "kept")
    prune_fn = _outside_trial(_prune_task, num_cpus=0)  # its per-shard tasks take the CPUs
    return ray.get(prune_fn.remote(t.cfg.model_dump(mode="json"), run_dir, kept)), kept


def _train_trial(t: _Trial, ctx: dict, kept: str | None):
    """The trial's Ray Train run, named after the trial so a restart resumes its checkpoints."""
    from puma_ray.train import run_train

    callbacks = None
    if t.cfg.ray.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]  # rank 0's per-epoch metrics -> Tune (and ASHA)
    return run_train(
        t.cfg,
        ctx["run_dir"],
        dataset="full" if t.baseline else "kept",
        name=f"{t.rel}/train",
        kept_dir=kept,
        mlflow_parent_run_id=ctx["parent_run_id"],
        log=print,
        ray_run_name=t.name,
        ray_storage_path=storage.join(ctx["sweep_dir"], "ray_train"),
        callbacks=callbacks,
        mlflow_run_name=f"{t.name} {t.label}",
    )


def _evaluate_trial(t: _Trial, run_dir: str, model_path: str) -> dict:
    import ray

    # it only schedules: the evaluation's chunks are Ray tasks of their own
    eval_fn = _outside_trial(_evaluate_task, num_cpus=0)
    return ray.get(
        eval_fn.remote(t.cfg.model_dump(mode="json"), run_dir, model_path, f"{t.rel}/evaluate")
    )


def _final_metrics(
    ev: dict, summary, prune: dict | None, *, prune_s: float, eval_s: float, trial_s: float
) -> dict[str, Any]:
    """The trial's final numbers: its evaluation, kept-set size and stage times."""
    rows = prune["rows"] if prune else summary.rows
    final = {
        **ev["val"]["metrics"],
        **ev["test"]["metrics"],
        "kept_rows": summary.rows,
        "kept_fraction": summary.rows / max(1, rows),
        "eps_adjusted": prune["eps_adjusted"] if prune else 0,
        "prune_s": prune_s,
        "eval_s": eval_s,
        "trial_s": trial_s,
    }
    return final


def _tune_metrics(final: dict, summary, ev: dict, cfg: PipelineConfig) -> dict[str, Any]:
    """The trial's last result for Tune: the final numbers plus the per-epoch keys ASHA reads."""
    last = summary.history[-1] if summary.history else {}
    # device_seconds: the training compute (summed over workers), as the loop reports it
    return {
        **final,
        "device_seconds": float(last.get("device_seconds", float("nan"))),
        "epoch": int(last.get("epoch", cfg.training.epochs)),  # ASHA's time attribute
        # the ASHA metric must be in every result Tune sees, this last one included
        "val/epoch_robust_acc": float(
            last.get("val/epoch_robust_acc", ev["val"]["metrics"]["val/robust_acc"])
        ),
        "train_skipped": bool(summary.skipped),
    }


def _trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial: prune -> TorchTrainer (reports relayed to Tune) -> evaluate -> MLflow."""
    import ray.tune

    from puma_ray import tracking

    start = time.perf_counter()
    t = _open_trial(config, ctx)
    done = _read_json(storage.join(t.dir, RESULT_FILE))
    if done is not None:  # finished, but the sweep stopped before Tune recorded it
        ray.tune.report(done["metrics"])
        return
    print(f"sweep {t.name}: {t.label}", flush=True)

    t0 = time.perf_counter()
    prune, kept = _prune_kept(t, ctx["run_dir"])
    prune_s = time.perf_counter() - t0

    summary = _train_trial(t, ctx, kept)
    _maybe_fail(ctx.get("debug_fail"), t.values, t.baseline)

    t0 = time.perf_counter()
    ev = _evaluate_trial(t, ctx["run_dir"], summary.model_path)
    eval_s = time.perf_counter() - t0

    trial_s = time.perf_counter() - start
    final = _final_metrics(ev, summary, prune, prune_s=prune_s, eval_s=eval_s, trial_s=trial_s)
    uri = ctx["tracking_uri"]
    if uri and summary.mlflow_run_id:
        run = tracking.RunHandle(uri, summary.mlflow_run_id)
        _log_trial(run, t.cfg, t.info, t.unpruned, final, summary, t.dir, kept, ev)
    metrics = _tune_metrics(final, summary, ev, t.cfg)
    result = {**t.info, "metrics": metrics, "mlflow_run_id": summary.mlflow_run_id, "prune": prune}
    _write_json(storage.join(t.dir, RESULT_FILE), result)
    # last: with ASHA this report may end the trial, so everything durable is written before
    ray.tune.report(metrics)


# ----------------------------------------------------------------------------------------------
# The trial's MLflow child run (run_train opened it; the driver closes those that did not finish).


def _trial_params(cfg: PipelineConfig, info: dict, unpruned: bool) -> dict[str, Any]:
    """Params of a trial's MLflow run: its effective pruning settings (the sampled values among
    them, a setting's too) and what identifies it; run_train already logged the model and
    training recipe."""
    params = {"pruning": cfg.pruning.model_dump(mode="json", exclude={"extrapolation"})}
    params["trial"] = info["trial"]
    params["sweep.baseline"] = info["baseline"]
    params["sweep.unpruned"] = unpruned
    # the setting of each settings dimension by name (`setting.method`): the report's label
    for dim, value in info["values"].items():
        if isinstance(value, dict):
            params[f"setting.{dim}"] = value["name"]
    # the sampled values are among these (pruning.*) or among run_train's (training.seed)
    return params


def _trial_tags(info: dict, unpruned: bool, status: str, sweep_id: str) -> dict[str, str]:
    return {
        "puma_ray.stage": "sweep_trial",
        "puma_ray.sweep": sweep_id,
        "puma_ray.trial": info["trial"],
        "puma_ray.label": info["label"],
        "puma_ray.baseline": str(bool(info["baseline"])).lower(),
        "puma_ray.unpruned": str(bool(unpruned)).lower(),
        "puma_ray.trial_status": status,
    }


def _log_trial(run, cfg, info, unpruned, final, summary, tdir, kept, ev) -> None:
    from puma_ray import tracking

    sweep_id = posixpath.basename(posixpath.dirname(tdir.rstrip("/")))
    tracking.safe(tracking.log_params, run, _trial_params(cfg, info, unpruned))
    tracking.safe(run.log_metrics, final, cfg.training.epochs)
    files = {
        "trial/trial.json": json.dumps({**info, "unpruned": unpruned}, indent=1),
        "trial/config.yaml": dump_yaml(cfg),
        "trial/evaluate.json": json.dumps(ev, indent=1),
    }
    if kept is not None:
        for fname in ("manifest.json", "margin_hist.png"):
            path = storage.join(kept, fname)
            if storage.exists(path):
                files[f"kept/{fname}"] = storage.read_bytes(path)
    for rel, data in files.items():
        folder, fname = rel.split("/")
        tracking.safe(tracking.log_bytes, run, fname, data, folder)
    tags = _trial_tags(info, unpruned, "finished", sweep_id)
    tracking.safe(tracking.set_tags, run, tags)
    tracking.safe(run.finish, "FINISHED")
