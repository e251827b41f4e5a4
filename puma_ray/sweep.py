"""`puma-ray sweep`: Ray Tune over prune ratio x epsilon scaling (x strategy, q, alpha, seeds),
one trial = prune -> Ray Train run -> evaluation, with an MLflow parent run per sweep, a child
run per trial, and a results table and plots at the end.

The shape (Ray 2.60, notes/ray-mlflow.md §3): every Tune trial is a plain function that prunes
its kept set from the scores computed once for the whole sweep (never rescored per trial),
builds and fits its own `TorchTrainer` through `train.run_train`, and relays the Train reports
to Tune with `TuneReportCallback`, so ASHA can stop weak trials on their per-epoch test robust
accuracy. The trial's Ray Train run is named after the trial, so a restarted trial resumes its
own checkpoints; its kept set, model and evaluation are skipped when already complete.

Layout under the run directory (ingest, margin model and scores are shared with `puma-ray run`):

  sweep/<name>-<fingerprint>/       one sweep; a changed config (not resources) gets a new one
    sweep.json                      fingerprint and MLflow parent run (reopened by a restore)
    tune/                           the Tune experiment: `Tuner.restore` finishes what is left
    ray_train/<trial>/              each trial's Ray Train run (checkpoints)
    <trial>/kept/                   the trial's kept set + manifest + margin histogram
    <trial>/train/, <trial>/evaluate/   run_train and run_evaluate outputs
    <trial>/result.json             the trial's final numbers, written last
    report/                         results.csv, results.md, plots/*.png (also on MLflow)

Resources per trial (all logical Ray resources, so the same config scales from a laptop to a
cluster): the trial process only orchestrates, like Ray Train's own controller, so it holds
`sweep.trial_cpus` (default 0: a token of memory, as Tune needs a bundle to place it); its Train
workers add `ray.num_workers x ray.cpus_per_worker` (+1 GPU each with `ray.use_gpu`) while
training; the evaluation task after training takes `ray.cpus_per_worker`. With in-process
training (`ray.num_workers: 0`) the trial itself trains and holds `ray.cpus_per_worker`.
Ray Data's read tasks inside training ask for one more CPU each, so one CPU stays free.
`sweep.max_concurrent_trials` is capped to what fits a local instance; on a cluster
(`--address` / RAY_ADDRESS) it is left as given, because an autoscaler adds nodes for trials
that wait.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig, SearchDim, dump_yaml
from puma_ray.errors import ConfigError, PumaRayError

TUNE_NAME = "tune"
STATE_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
RESULT_FILE = "result.json"
ATTEMPTS_FILE = "attempts.log"
# the auto-added reference: every sample kept, every sample at the full training epsilon
BASELINE_VALUES = {"pruning.strategy": "none", "pruning.ratio": 0.0, "pruning.eps_rule": "none"}
# keys that decide whether a trial drops samples or changes any epsilon
_PRUNING_SHAPE = {
    "pruning.ratio",
    "pruning.strategy",
    "pruning.eps_rule",
    "pruning.eps_scale",
    "pruning.eps_quantile",
    "pruning.eps_alpha",
}
_SEEDS = ("pruning.seed", "training.seed")
# Ray Data's read tasks ask for 1 CPU each; Train workers holding every CPU starve them forever
# (notes §7.1b), so this much stays free of trials and workers
DATA_CPUS = 1.0


class SweepError(PumaRayError):
    """A sweep cannot run as configured (e.g. one trial needs more than the machine has)."""


# ----------------------------------------------------------------------------------------------
# The plan: validated before Ray starts.


def apply_values(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """A copy of `cfg` with each dotted key ("pruning.ratio") set; assignment re-validates."""
    out = cfg.model_copy(deep=True)
    for key, value in values.items():
        section, name = key.split(".", 1)
        setattr(getattr(out, section), name, value)
    return out


def is_unpruned(cfg: PipelineConfig) -> bool:
    """True when `cfg.pruning` keeps every sample at the base epsilon (the compute reference)."""
    p = cfg.pruning
    keeps_all = p.strategy == "none" or p.ratio == 0
    same_eps = p.eps_rule == "none" or (
        p.eps_rule == "scale_lowest" and (p.eps_scale == 1 or p.eps_quantile == 0)
    )
    return keeps_all and same_eps


@dataclass
class SweepPlan:
    """Grid points (each a dict of dotted key -> value; `{"baseline": True}` for the added
    unpruned trial) crossed by Tune with the sampled dimensions, `num_samples` times."""

    points: list[dict[str, Any]]
    sampled: dict[str, SearchDim]
    swept: list[str]
    num_samples: int
    baseline_added: bool
    baseline_in_grid: bool

    @property
    def trials(self) -> int:
        return len(self.points) * self.num_samples


def _check_trial(cfg: PipelineConfig, values: dict[str, Any]) -> None:
    """Combinations the schema cannot see field by field (prune.run_prune checks them too,
    but only once a trial runs)."""
    from puma_ray import selection

    rule = selection.EPS_RULES[cfg.pruning.eps_rule]
    if rule.compares_margin_with_eps and cfg.scoring.norm != cfg.training.attack.norm:
        raise ConfigError(
            f"sweep.space: {_describe(values)}: pruning.eps_rule={cfg.pruning.eps_rule} compares "
            f"margins with the training epsilon, so scoring.norm ({cfg.scoring.norm}) must "
            f"equal training.attack.norm ({cfg.training.attack.norm})"
        )


def plan_sweep(cfg: PipelineConfig) -> SweepPlan:
    """Expand and check the search space; raise ConfigError (one line naming the key) for
    anything a trial would refuse. Needs no Ray, so a bad space fails before Ray starts."""
    s = cfg.sweep
    if not s.space:
        raise ConfigError("sweep.space: empty (give at least one key, e.g. pruning.ratio)")
    grid_keys = [k for k, d in s.space.items() if d.kind == "grid"]
    sampled = {k: d for k, d in s.space.items() if d.kind != "grid"}
    points = [
        dict(zip(grid_keys, combo, strict=True))
        for combo in itertools.product(*(s.space[k].grid for k in grid_keys))
    ]
    unpruned_points = 0
    for point in points:
        try:
            trial_cfg = apply_values(cfg, point)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            msg = str(e).splitlines()
            raise ConfigError(f"sweep.space: {_describe(point)}: {' '.join(msg[:3])}") from None
        _check_trial(trial_cfg, point)
        unpruned_points += is_unpruned(trial_cfg)
    if s.asha and cfg.ray.num_workers == 0:
        raise ConfigError(
            "sweep.asha: needs ray.num_workers >= 1 (per-epoch results reach Tune through "
            "Ray Train's reports; in-process training has none)"
        )
    # a grid point only counts as the reference when no sampled value can change its pruning
    in_grid = unpruned_points > 0 and not (sampled.keys() & _PRUNING_SHAPE)
    added = s.baseline and not in_grid
    if added:
        points.append({"baseline": True})
    return SweepPlan(
        points=points,
        sampled=sampled,
        swept=list(s.space),
        num_samples=s.num_samples,
        baseline_added=added,
        baseline_in_grid=in_grid,
    )


def sweep_fingerprint(cfg: PipelineConfig) -> str:
    """What the sweep's results depend on: the config without resources and tracking, so a
    restore may change ray.* or concurrency but a changed search space starts a new sweep."""
    d = cfg.model_dump(mode="json")
    for key in ("ray", "tracking"):
        d.pop(key)
    for key in ("max_concurrent_trials", "trial_cpus", "trial_max_failures"):
        d["sweep"].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _short(key: str) -> str:
    section, name = key.split(".", 1)
    return name if section == "pruning" else f"{section}_{name}"


def _describe(values: dict[str, Any]) -> str:
    if values.get("baseline"):
        return "unpruned baseline"
    return " ".join(
        f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}"
        for k, v in values.items()
    )


def trial_values(config: dict, plan_swept: list[str]) -> tuple[dict[str, Any], bool]:
    """(dotted key -> value, is the added baseline) of one trial's Tune config. The added
    baseline takes only sampled seeds from the space (replicates), nothing that prunes."""
    point = dict(config["point"])
    sampled = dict(config.get("sampled", {}))
    if point.pop("baseline", False):
        return {**BASELINE_VALUES, **{k: v for k, v in sampled.items() if k in _SEEDS}}, True
    values = {**point, **sampled}
    return {k: values[k] for k in plan_swept if k in values}, False


# ----------------------------------------------------------------------------------------------
# One trial. Runs inside a Tune trial actor; everything it needs comes in `ctx` (plain data).


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
    from puma_ray.evaluate import run_evaluate

    cfg = PipelineConfig.model_validate(cfg_json)
    # the trial's MLflow run gets these numbers; evaluate must not open a second run
    cfg.tracking.tracking_uri = "none"
    return run_evaluate(cfg, run_dir, checkpoint, name=name, log=print).to_dict()


def _maybe_fail(debug: dict | None, values: dict, baseline: bool) -> None:
    """Test hook: fail the trial whose values contain `debug["values"]` once (marker file),
    after its training finished, as a crash between training and evaluation would."""
    if not debug or baseline:
        return
    if any(values.get(k) != v for k, v in debug["values"].items()):
        return
    if storage.exists(debug["marker"]):
        return
    storage.atomic_write_bytes(debug["marker"], b"failed once\n")
    raise RuntimeError(f"debug_fail: trial {_describe(values)} fails once on purpose")


def _trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial: prune -> TorchTrainer (reports relayed to Tune) -> evaluate -> MLflow."""
    import ray
    import ray.tune

    from puma_ray import tracking
    from puma_ray.train import run_train

    start = time.perf_counter()
    name = ray.tune.get_context().get_trial_name()
    run_dir, sweep_dir = ctx["run_dir"], ctx["sweep_dir"]
    values, baseline = trial_values(config, ctx["swept"])
    cfg = apply_values(PipelineConfig.model_validate(ctx["config"]), values)
    unpruned = is_unpruned(cfg)
    label = _describe({"baseline": True} if baseline else values)
    tdir = storage.join(sweep_dir, name)
    rel = posixpath.join("sweep", ctx["sweep_id"], name)  # run_train/evaluate name dirs by it
    storage.makedirs(tdir)
    _append_line(storage.join(tdir, ATTEMPTS_FILE), time.strftime("%Y-%m-%dT%H:%M:%S start"))
    info = {"trial": name, "label": label, "values": values, "baseline": baseline}
    _write_json(storage.join(tdir, TRIAL_FILE), {**info, "unpruned": unpruned})
    done = _read_json(storage.join(tdir, RESULT_FILE))
    if done is not None:  # finished, but the sweep stopped before Tune recorded it
        ray.tune.report(done["metrics"])
        return
    print(f"sweep {name}: {label}", flush=True)

    t0 = time.perf_counter()
    prune = None
    kept = None
    if not baseline:  # the added baseline trains on the sample shards themselves (no copy)
        kept = storage.join(tdir, "kept")
        prune_fn = _outside_trial(_prune_task, num_cpus=0)  # its per-shard tasks take the CPUs
        prune = ray.get(prune_fn.remote(cfg.model_dump(mode="json"), run_dir, kept))
    prune_s = time.perf_counter() - t0

    callbacks = None
    if cfg.ray.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]  # rank 0's per-epoch metrics -> Tune (and ASHA)
    summary = run_train(
        cfg,
        run_dir,
        dataset="full" if baseline else "kept",
        name=f"{rel}/train",
        kept_dir=kept,
        mlflow_parent_run_id=ctx["parent_run_id"],
        log=print,
        ray_run_name=name,
        ray_storage_path=storage.join(sweep_dir, "ray_train"),
        callbacks=callbacks,
        mlflow_run_name=f"{name} {label}",
    )
    _maybe_fail(ctx.get("debug_fail"), values, baseline)

    t0 = time.perf_counter()
    eval_fn = _outside_trial(_evaluate_task, num_cpus=cfg.ray.cpus_per_worker)
    ev = ray.get(
        eval_fn.remote(cfg.model_dump(mode="json"), run_dir, summary.model_path, f"{rel}/evaluate")
    )
    eval_s = time.perf_counter() - t0

    last = summary.history[-1] if summary.history else {}
    rows = prune["rows"] if prune else summary.rows
    final = {
        "clean_acc": ev["clean_acc"],
        "robust_acc": ev["robust_acc"],
        "pgd_acc": ev["pgd_acc"],
        "kept_rows": summary.rows,
        "kept_fraction": summary.rows / max(1, rows),
        "eps_adjusted": prune["eps_adjusted"] if prune else 0,
        "prune_s": prune_s,
        "eval_s": eval_s,
        "trial_s": time.perf_counter() - start,
    }
    if ev.get("autoattack_acc") is not None:
        final["autoattack_acc"] = ev["autoattack_acc"]
    uri = ctx["tracking_uri"]
    if uri and summary.mlflow_run_id:
        run = tracking.RunHandle(uri, summary.mlflow_run_id)
        _log_trial(run, cfg, info, unpruned, final, summary, tdir, kept, ev)
    # device_seconds: the training compute (summed over workers), as the loop reports it
    metrics = {
        **final,
        "device_seconds": float(last.get("device_seconds", float("nan"))),
        "epoch": int(last.get("epoch", cfg.training.epochs)),  # ASHA's time attribute
        # the ASHA metric must be in every result Tune sees, this last one included
        "test_robust_acc": float(last.get("test_robust_acc", ev["robust_acc"])),
        "test_clean_acc": float(last.get("test_clean_acc", ev["clean_acc"])),
        "train_skipped": bool(summary.skipped),
    }
    result = {**info, "metrics": metrics, "mlflow_run_id": summary.mlflow_run_id, "prune": prune}
    _write_json(storage.join(tdir, RESULT_FILE), result)
    # last: with ASHA this report may end the trial, so everything durable is written before
    ray.tune.report(metrics)


def _trial_params(cfg: PipelineConfig, info: dict, unpruned: bool) -> dict[str, Any]:
    """Params of a trial's MLflow run: its effective pruning settings (the sampled values among
    them) and what identifies it; run_train already logged the model and training recipe."""
    params = {"pruning": cfg.pruning.model_dump(mode="json", exclude={"extrapolation"})}
    params["trial"] = info["trial"]
    params["sweep.baseline"] = info["baseline"]
    params["sweep.unpruned"] = unpruned
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


# ----------------------------------------------------------------------------------------------
# The driver.


@dataclass
class SweepResult:
    sweep_dir: str
    trials: dict[str, str] = field(default_factory=dict)  # trial -> finished|stopped|failed|...
    restored: bool = False
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment: str = ""
    report: Any = None  # puma_ray.report.SweepReport
    report_dir: str | None = None
    wall_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.trials.values() if s == status)

    @property
    def complete(self) -> bool:
        """Every trial finished or was stopped early by ASHA (nothing left to restore)."""
        return all(s in ("finished", "stopped early") for s in self.trials.values())

    def format(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("finished", "stopped early", "failed")]
        if self.count("interrupted"):
            parts.append(f"{self.count('interrupted')} interrupted")
        lines = [
            f"sweep: {len(self.trials)} trials ({', '.join(parts)}) in {self.wall_s:.0f}s"
            f"{' (restored)' if self.restored else ''} -> {self.sweep_dir}"
        ]
        if self.report is not None:
            lines += ["", self.report.format(), ""]
        if self.report_dir:
            lines.append(f"  report files  {self.report_dir}")
        if self.parent_run_id and self.tracking_uri:
            lines.append(
                f"  MLflow        experiment {self.experiment!r}, sweep run {self.parent_run_id}"
            )
            lines.append(f"  open it with  mlflow ui --backend-store-uri {self.tracking_uri}")
        if not self.complete:
            lines.append(
                "  rerun the same command to finish the failed or interrupted trials "
                "(finished trials are kept, not rerun)"
            )
        return "\n".join(lines)


def trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What Tune reserves for a trial's own process (Train workers and tasks come on top)."""
    s, r = cfg.sweep, cfg.ray
    cpus = s.trial_cpus if r.num_workers > 0 else max(s.trial_cpus, r.cpus_per_worker)
    # Tune refuses an empty bundle ("empty head"): a token of memory places an orchestrator
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, "memory": 2**20}


def _fit_concurrency(cfg: PipelineConfig, log) -> int:
    """How many trials run at once: `sweep.max_concurrent_trials`, capped on a local instance
    to what fits next to the CPU kept for Ray Data; refused when not even one trial fits."""
    import ray

    s, r = cfg.sweep, cfg.ray
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    hold = trial_resources(cfg)["CPU"]
    need = hold + max(1, r.num_workers) * r.cpus_per_worker
    fits = math.floor((cpus - DATA_CPUS) / need + 1e-9)
    if r.use_gpu:
        fits = min(fits, math.floor(gpus / max(1, r.num_workers) + 1e-9))
    joined = bool(r.address or os.environ.get("RAY_ADDRESS"))
    layout = (
        f"a trial needs {need:g} CPUs (its own process {hold:g} + "
        f"{max(1, r.num_workers)} x ray.cpus_per_worker {r.cpus_per_worker:g})"
        f"{f' and {max(1, r.num_workers)} GPUs' if r.use_gpu else ''}, plus "
        f"{DATA_CPUS:g} CPU kept free for Ray Data reads; Ray has {cpus:g} CPUs"
        f"{f' and {gpus:g} GPUs' if r.use_gpu else ''}"
    )
    if fits < 1:
        if joined:
            log(f"sweep: warning: {layout}; trials wait until the cluster grows")
            return s.max_concurrent_trials
        raise SweepError(
            f"{layout}: lower ray.cpus_per_worker or sweep.trial_cpus (logical CPUs: 0.5 runs "
            "as fast as 1 on one thread), or start Ray with more CPUs (ray.num_cpus)"
        )
    if s.max_concurrent_trials > fits and not joined:
        log(f"sweep: {layout}: running {fits} trial(s) at a time, not {s.max_concurrent_trials}")
        return fits
    return s.max_concurrent_trials


def prepare_inputs(cfg: PipelineConfig, plan: SweepPlan, run_dir: str, log) -> None:
    """Ingest, margin model and scores, each skipped when up to date: computed once, shared by
    every trial (and by `puma-ray run` on the same run directory)."""
    from puma_ray.ingest import run_ingest
    from puma_ray.pipeline import margin_model_config
    from puma_ray.score import run_score
    from puma_ray.train import run_train

    log(run_ingest(cfg, run_dir, parallel=True, log=log).format())
    strategies = {cfg.pruning.strategy}
    if "pruning.strategy" in cfg.sweep.space:
        strategies |= set(cfg.sweep.space["pruning.strategy"].values())
    if not strategies - {"random", "none"}:
        return  # nothing ranks by margin: no margin model, no scores
    if not cfg.margin_model.checkpoint:
        run_train(margin_model_config(cfg), run_dir, dataset="full", name="margin_model", log=log)
    summary = run_score(
        cfg, run_dir, embeddings=True if "extrapolated" in strategies else None, log=log
    )
    log(summary.format())


def _input_fingerprints(run_dir: str) -> dict[str, str]:
    from puma_ray.data import dataset_dirs, open_dataset

    out = {"data": open_dataset(dataset_dirs(run_dir)[0]).info.fingerprint}
    scores = _read_json(storage.join(run_dir, "scores", "manifest.json"))
    if scores and scores.get("state_fingerprint"):
        out["scores"] = scores["state_fingerprint"]
    return out


def _parent_run(cfg, plan, run_dir, sweep_dir, sweep_id, state, log):
    """The sweep's MLflow parent run: reopened on a restore, else created with the config,
    search space, git commit and input fingerprints."""
    from puma_ray import tracking

    uri = cfg.tracking.tracking_uri
    old = state.get("parent_run_id") if state.get("tracking_uri") == uri else None
    if old and _run_exists(uri, old):
        run = tracking.start_run(
            cfg.tracking, run_dir, run_name=f"sweep {sweep_id}", resume_run_id=old, log=log
        )
        if run is not None:
            return run
    space = {k: d.model_dump(exclude_none=True) for k, d in cfg.sweep.space.items()}
    a = cfg.training.attack
    params = {
        "sweep": {
            "id": sweep_id,
            "space": json.dumps(space),
            "swept": ",".join(plan.swept),
            "trials": plan.trials,
            "num_samples": cfg.sweep.num_samples,
            "metric": cfg.sweep.metric,
            "mode": cfg.sweep.mode,
            "asha": cfg.sweep.asha,
            "baseline": "added"
            if plan.baseline_added
            else ("in grid" if plan.baseline_in_grid else "none"),
            "max_concurrent_trials": cfg.sweep.max_concurrent_trials,
            "trial_cpus": cfg.sweep.trial_cpus,
        },
        "name": cfg.name,
        "run_dir": run_dir,
        "model.arch": cfg.model.arch,
        "training": {
            "objective": cfg.training.objective,
            "epochs": cfg.training.epochs,
            "batch_size": cfg.training.batch_size,
            "attack.norm": a.norm,
            "attack.epsilon": a.epsilon,
            "attack.steps": a.steps,
        },
        "pruning": {
            "strategy": cfg.pruning.strategy,
            "scope": cfg.pruning.scope,
            "eps_rule": cfg.pruning.eps_rule,
        },
        "scoring.norm": cfg.scoring.norm,
        "evaluation": {"pgd_steps": cfg.evaluation.pgd_steps, "subset": cfg.evaluation.subset},
        "ray": {
            "num_workers": cfg.ray.num_workers,
            "cpus_per_worker": cfg.ray.cpus_per_worker,
            "use_gpu": cfg.ray.use_gpu,
        },
    }
    fps = _input_fingerprints(run_dir)
    tags = {
        "puma_ray.stage": "sweep",
        "puma_ray.sweep": sweep_id,
        "puma_ray.fingerprint": sweep_id.rsplit("-", 1)[-1],
        "puma_ray.data_fingerprint": fps["data"],
        **({"puma_ray.scores_fingerprint": fps["scores"]} if "scores" in fps else {}),
    }
    commit = tracking.git_revision()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = tracking.start_run(
        cfg.tracking, run_dir, run_name=f"sweep {sweep_id}", params=params, tags=tags, log=log
    )
    if run is None:
        return None
    tracking.safe(tracking.log_bytes, run, "config.yaml", dump_yaml(cfg), "config", log=log)
    tracking.safe(
        tracking.log_bytes,
        run,
        "search_space.json",
        json.dumps(space, indent=1),
        "config",
        log=log,
    )
    state.update(tracking_uri=uri, parent_run_id=run.run_id)
    _write_json(storage.join(sweep_dir, STATE_FILE), state)
    return run


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def _param_space(plan: SweepPlan) -> dict:
    from ray import tune

    sampled = {}
    for key, dim in plan.sampled.items():
        if dim.kind == "choice":
            sampled[key] = tune.choice(dim.choice)
        elif dim.kind == "uniform":
            sampled[key] = tune.uniform(*dim.uniform)
        else:
            sampled[key] = tune.loguniform(*dim.loguniform)
    return {"point": tune.grid_search(plan.points), "sampled": sampled}


def _trial_statuses(grid, sweep_dir: str) -> dict[str, str]:
    """finished (result.json written) | stopped early (ASHA) | failed | interrupted."""
    states = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        states[_trial_name(trial)] = trial.status
    out = {}
    for i in range(len(grid)):
        r = grid[i]
        name = posixpath.basename(str(r.path).rstrip("/"))
        if storage.exists(storage.join(sweep_dir, name, RESULT_FILE)):
            out[name] = "finished"
        elif r.error is not None or states.get(name) == "ERROR":
            out[name] = "failed"
        elif states.get(name, "TERMINATED") == "TERMINATED":
            out[name] = "stopped early"
        else:
            out[name] = "interrupted"
    return dict(sorted(out.items()))


def _close_unfinished(cfg, trials: dict[str, str], sweep_dir: str, sweep_id: str, log) -> None:
    """MLflow runs of trials that did not finish: params and tags from trial.json, and a
    terminal status (a restore reopens the run through run_train)."""
    from puma_ray import tracking

    uri = cfg.tracking.tracking_uri
    for name, status in trials.items():
        if status == "finished" or not uri:
            continue
        tdir = storage.join(sweep_dir, name)
        info = _read_json(storage.join(tdir, TRIAL_FILE))
        ref = _read_json(storage.join(tdir, "train", "mlflow_run.json"))
        if not info or not ref:
            continue
        run = tracking.RunHandle(uri, ref["run_id"])
        trial_cfg = apply_values(cfg, info["values"])
        tracking.safe(
            tracking.log_params, run, _trial_params(trial_cfg, info, info["unpruned"]), log=log
        )
        tags = _trial_tags(info, info["unpruned"], status, sweep_id)
        tracking.safe(tracking.set_tags, run, tags, log=log)
        kept = _read_json(storage.join(tdir, "kept", "manifest.json"))
        if kept is not None:  # what it trained on, so the report can still show its size
            counts = kept["counts"]
            sizes = {"kept_rows": counts["kept"], "kept_fraction": counts["kept"] / counts["rows"]}
            tracking.safe(run.log_metrics, sizes, 0, log=log)
            for fname in ("manifest.json", "margin_hist.png"):
                path = storage.join(tdir, "kept", fname)
                if storage.exists(path):
                    data = storage.read_bytes(path)
                    tracking.safe(tracking.log_bytes, run, fname, data, "kept", log=log)
        terminal = {"stopped early": "KILLED", "failed": "FAILED"}.get(status, "KILLED")
        tracking.safe(run.finish, terminal, log=log)


def _write_report(run, cfg, sweep_dir: str, log):
    """The table and plots from MLflow (the same code as `puma-ray report`), saved beside the
    sweep and as artifacts of the parent run."""
    import tempfile

    from puma_ray import tracking
    from puma_ray.report import load_report

    report = load_report(run.tracking_uri, cfg.tracking.experiment, parent_run_id=run.run_id)
    out = storage.join(sweep_dir, "report")
    with tempfile.TemporaryDirectory() as tmp:
        for rel in report.write(tmp):
            data = open(os.path.join(tmp, rel), "rb").read()
            storage.atomic_write_bytes(storage.join(out, *rel.split("/")), data)
            folder = posixpath.join("report", posixpath.dirname(rel)).rstrip("/")
            tracking.safe(tracking.log_bytes, run, posixpath.basename(rel), data, folder, log=log)
    return report, out


def run_sweep(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    tracking_uri: str | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
    debug_fail: dict | None = None,
) -> SweepResult:
    """Run (or restore) the sweep of `cfg.sweep` in `<run_dir>/sweep/<name>-<fingerprint>`.

    The search space is checked before Ray starts. With `resume` (the default) an interrupted
    sweep of the same config is restored with `Tuner.restore`: finished trials are kept, the
    unfinished and failed ones run (resuming their own Train checkpoints); `resume=False`
    deletes that sweep's directory and starts over. `tracking_uri` overrides the config and
    MLFLOW_TRACKING_URI. `debug_fail` ({"values": {...}, "marker": path}) makes the matching
    trial fail once after training (tests)."""
    begin = time.perf_counter()
    plan = plan_sweep(cfg)
    run_dir = storage.local_path(run_dir) or run_dir  # file:// and relative paths: absolute
    cfg = cfg.model_copy(deep=True)
    if tracking_uri:
        cfg.tracking.tracking_uri = tracking_uri
    from puma_ray import tracking

    uri = tracking.tracking_uri(cfg.tracking, run_dir)
    # trials and workers run in other directories and other environments: pin the store
    cfg.tracking.tracking_uri = tracking.absolute_uri(uri) if uri else "none"
    uri = cfg.tracking.tracking_uri if uri else None
    sweep_id = f"{cfg.name}-{sweep_fingerprint(cfg)}"
    sweep_dir = storage.join(run_dir, "sweep", sweep_id)
    tune_path = storage.join(sweep_dir, TUNE_NAME)

    from puma_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    from ray import tune

    concurrency = _fit_concurrency(cfg, log)
    restore = resume and tune.Tuner.can_restore(tune_path)
    if not restore and storage.exists(sweep_dir):
        if not resume:
            log(f"sweep: --fresh: deleting the earlier trials in {sweep_dir}")
        storage.delete(sweep_dir)  # without Tune's state nothing there can be restored
    storage.makedirs(sweep_dir)
    prepare_inputs(cfg, plan, run_dir, log)
    state = (_read_json(storage.join(sweep_dir, STATE_FILE)) or {}) if restore else {}
    state.setdefault("fingerprint", sweep_id)
    _write_json(storage.join(sweep_dir, STATE_FILE), state)
    parent = _parent_run(cfg, plan, run_dir, sweep_dir, sweep_id, state, log) if uri else None

    ctx = {
        "config": cfg.model_dump(mode="json"),
        "run_dir": run_dir,
        "sweep_dir": sweep_dir,
        "sweep_id": sweep_id,
        "swept": plan.swept,
        "tracking_uri": uri,
        "parent_run_id": parent.run_id if parent else None,
        "debug_fail": debug_fail,
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, ctx=ctx), trial_resources(cfg))
    if restore:
        done = _count_results(sweep_dir)
        log(
            f"sweep: restoring the interrupted sweep in {sweep_dir} ({done} of {plan.trials} "
            "trials finished; only the others run)"
        )
        tuner = tune.Tuner.restore(
            tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        log(
            f"sweep: {plan.trials} trials ({', '.join(plan.swept)}"
            f"{'; + unpruned baseline' if plan.baseline_added else ''}), "
            f"{concurrency} at a time -> {sweep_dir}"
        )
        scheduler = None
        if cfg.sweep.asha:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(
                time_attr="epoch",  # the loop's own epoch count survives Train restarts
                metric="test_robust_acc",
                mode="max",
                max_t=cfg.training.epochs,
                grace_period=min(cfg.sweep.asha_grace_epochs, cfg.training.epochs),
                reduction_factor=cfg.sweep.asha_reduction_factor,
                stop_last_trials=False,  # a trial at the last epoch still gets evaluated
            )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(plan),
            # no metric here: per-epoch results carry test_* only; the report ranks trials
            tune_config=tune.TuneConfig(
                num_samples=cfg.sweep.num_samples,
                max_concurrent_trials=concurrency,
                scheduler=scheduler,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_NAME,
                storage_path=sweep_dir,
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures),
            ),
        )
    result = SweepResult(
        sweep_dir=sweep_dir,
        restored=restore,
        tracking_uri=uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=parent.run_id if parent else None,
    )
    status = "FAILED"
    try:
        grid = tuner.fit()
        result.trials = _trial_statuses(grid, sweep_dir)
        _close_unfinished(cfg, result.trials, sweep_dir, sweep_id, log)
        if parent is not None:
            result.report, result.report_dir = _write_report(parent, cfg, sweep_dir, log)
            best = result.report.best
            metrics = {
                f"trials_{s.replace(' ', '_')}": result.count(s)
                for s in ("finished", "stopped early", "failed", "interrupted")
            }
            if best is not None:
                metrics[f"best_{cfg.sweep.metric}"] = getattr(best, cfg.sweep.metric)
            tracking.safe(parent.log_metrics, metrics, 0, log=log)
        if result.complete:
            status = "FINISHED"
        elif result.count("interrupted"):
            status = "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result.wall_s = time.perf_counter() - begin
        if parent is not None:
            tracking.safe(parent.finish, status, log=log)
    return result


def _count_results(sweep_dir: str) -> int:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(sweep_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sum(
        1
        for i in infos
        if i.type == pafs.FileType.Directory
        and storage.exists(storage.join(sweep_dir, i.base_name, RESULT_FILE))
    )
