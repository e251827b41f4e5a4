"""The sweep's driver, `run_sweep`: checks the plan, sizes trials to the Ray instance, prepares
the inputs every trial shares (ingest, margin model, scores), opens the MLflow parent run, runs
or restores the Tune experiment and, at the end, closes the MLflow runs of trials that did not
finish and writes the results table and plots."""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig, dump_yaml
from puma_ray.sweep.plan import SweepError, SweepPlan, apply_values, plan_sweep, sweep_fingerprint
from puma_ray.sweep.trial import (
    RESULT_FILE,
    TRIAL_FILE,
    _read_json,
    _trial_fn,
    _trial_name,
    _trial_params,
    _trial_tags,
    _write_json,
)
from puma_ray.tracking import run_page

TUNE_NAME = "tune"
STATE_FILE = "sweep.json"
# Ray Data's read tasks ask for 1 CPU each; Train workers holding every CPU starve them forever,
# so this much stays free of trials and workers
DATA_CPUS = 1.0


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
            command, url = run_page(self.tracking_uri, self.parent_run_id)
            if command:
                lines.append(f"  open it with  {command}")
            lines.append(f"  sweep's page  {url}")
        if not self.complete:
            lines.append(
                "  rerun the same command to finish the failed or interrupted trials "
                "(finished trials are kept, not rerun)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Resources and shared inputs.


def trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What Tune reserves for a trial's own process (Train workers and tasks come on top)."""
    s, r = cfg.sweep, cfg.ray
    cpus = s.trial_cpus if r.num_workers > 0 else max(s.trial_cpus, r.cpus_per_worker)
    if r.num_workers == 0 and r.use_gpu:  # it trains on a GPU of its own, not on cuda:0 of all
        return {"CPU": cpus, "GPU": 1}
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
    # in-process training (num_workers 0): the trial's own process trains, and `hold` is it
    need = hold + r.num_workers * r.cpus_per_worker
    # ...and still holds them while its evaluation chunks run, each a task of cpus_per_worker
    spare = max(DATA_CPUS, r.cpus_per_worker if r.num_workers == 0 else 0)
    fits = math.floor((cpus - spare) / need + 1e-9)
    if r.use_gpu:
        fits = min(fits, math.floor(gpus / max(1, r.num_workers) + 1e-9))
    joined = bool(r.address or os.environ.get("RAY_ADDRESS"))
    parts = (
        f"its own process {hold:g} + {r.num_workers} x ray.cpus_per_worker {r.cpus_per_worker:g}"
        if r.num_workers
        else f"its own process, which trains: {hold:g}"
    )
    layout = (
        f"a trial needs {need:g} CPUs ({parts})"
        f"{f' and {max(1, r.num_workers)} GPUs' if r.use_gpu else ''}, plus "
        f"{spare:g} CPU kept free for Ray Data reads and evaluation; Ray has {cpus:g} CPUs"
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
    for dim in cfg.sweep.space.values():  # and those a setting names
        strategies |= {s["pruning.strategy"] for s in dim.settings or [] if "pruning.strategy" in s}
    if not strategies - {"random", "none"}:
        return  # nothing ranks by margin: no margin model, no scores
    if not cfg.margin_model.given:  # a checkpoint or a RobustBench zoo model
        run_train(margin_model_config(cfg), run_dir, dataset="full", name="margin_model", log=log)
    summary = run_score(
        cfg, run_dir, embeddings=True if "extrapolated" in strategies else None, log=log
    )
    log(summary.format())


# ----------------------------------------------------------------------------------------------
# The MLflow parent run.


def _input_fingerprints(run_dir: str) -> dict[str, str]:
    from puma_ray.data import dataset_dirs, open_dataset

    out = {"data": open_dataset(dataset_dirs(run_dir)[0]).info.fingerprint}
    scores = _read_json(storage.join(run_dir, "scores", "manifest.json"))
    if scores and scores.get("state_fingerprint"):
        out["scores"] = scores["state_fingerprint"]
    return out


def _sweep_params(cfg: PipelineConfig, plan: SweepPlan, run_dir: str, sweep_id: str, space):
    """Params of the parent run: the search space and the settings every trial shares."""
    a = cfg.training.attack
    return {
        "sweep": {
            "id": sweep_id,
            "space": json.dumps(space),
            "swept": ",".join(plan.swept),
            **({"setting_keys": ",".join(plan.setting_keys)} if plan.setting_keys else {}),
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


def _sweep_tags(run_dir: str, sweep_id: str) -> dict[str, str]:
    """Tags of the parent run: the sweep, its input fingerprints and the git commit."""
    from puma_ray import tracking

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
    return tags


def _parent_run(cfg, plan, run_dir, sweep_dir, sweep_id, state, log):
    """The sweep's MLflow parent run: reopened on a restore, else created with the config,
    search space, git commit and input fingerprints."""
    from puma_ray import tracking

    uri = cfg.tracking.tracking_uri
    old = state.get("parent_run_id") if state.get("tracking_uri") == tracking.redact(uri) else None
    if old and _run_exists(uri, old):
        run = tracking.start_run(
            cfg.tracking, run_dir, run_name=f"sweep {sweep_id}", resume_run_id=old, log=log
        )
        if run is not None:
            return run
    space = {k: d.model_dump(exclude_none=True) for k, d in cfg.sweep.space.items()}
    params = _sweep_params(cfg, plan, run_dir, sweep_id, space)
    tags = _sweep_tags(run_dir, sweep_id)
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
    state.update(tracking_uri=tracking.redact(uri), parent_run_id=run.run_id)
    _write_json(storage.join(sweep_dir, STATE_FILE), state)
    return run


def _run_exists(uri: str, run_id: str) -> bool:
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# The Tune experiment.


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


def _asha_scheduler(cfg: PipelineConfig):
    """ASHA on the per-epoch validation robust accuracy, or None without `sweep.asha`."""
    if not cfg.sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",  # the loop's own epoch count survives Train restarts
        metric="val/epoch_robust_acc",
        mode="max",
        max_t=cfg.training.epochs,
        grace_period=min(cfg.sweep.asha_grace_epochs, cfg.training.epochs),
        reduction_factor=cfg.sweep.asha_reduction_factor,
        stop_last_trials=False,  # a trial at the last epoch still gets evaluated
    )


def _new_tuner(cfg: PipelineConfig, plan: SweepPlan, trainable, sweep_dir: str, concurrency: int):
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space=_param_space(plan),
        # no metric here: per-epoch results carry val/epoch_* only; the report ranks trials
        tune_config=tune.TuneConfig(
            num_samples=plan.num_samples,
            max_concurrent_trials=concurrency,
            scheduler=_asha_scheduler(cfg),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=sweep_dir,
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures),
        ),
    )


def _trial_statuses(grid, sweep_dir: str, asha: bool) -> dict[str, str]:
    """finished (result.json written) | stopped early (ASHA) | failed | interrupted. A trial
    Tune ended without a result is ASHA's doing only when ASHA is on; without it, the sweep was
    stopped under it (Ctrl-C, a time limit) and a rerun restores it."""
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
        elif asha and states.get(name, "TERMINATED") == "TERMINATED":
            out[name] = "stopped early"
        else:
            out[name] = "interrupted"
    return dict(sorted(out.items()))


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


# ----------------------------------------------------------------------------------------------
# After the experiment.


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


def _collect(grid, result: SweepResult, cfg, sweep_dir: str, sweep_id: str, parent, log) -> None:
    """Fill `result` from the finished experiment: trial statuses, the unfinished trials' MLflow
    runs closed, and with a parent run the report and the sweep's counts and best value."""
    from puma_ray import tracking

    result.trials = _trial_statuses(grid, sweep_dir, cfg.sweep.asha)
    _close_unfinished(cfg, result.trials, sweep_dir, sweep_id, log)
    if parent is None:
        return
    result.report, result.report_dir = _write_report(parent, cfg, sweep_dir, log)
    best = result.report.best
    metrics = {
        f"trials_{s.replace(' ', '_')}": result.count(s)
        for s in ("finished", "stopped early", "failed", "interrupted")
    }
    if best is not None:
        metrics[f"best_{cfg.sweep.metric}"] = best.metric(cfg.sweep.metric)
    tracking.safe(parent.log_metrics, metrics, 0, log=log)


def _parent_status(result: SweepResult) -> str:
    """The parent run's terminal status once the experiment returned."""
    if result.complete:
        return "FINISHED"
    if result.count("interrupted"):
        return "KILLED"
    return "FAILED"


# ----------------------------------------------------------------------------------------------
# The driver.


def _pin_tracking(
    cfg: PipelineConfig, run_dir: str, tracking_uri: str | None
) -> tuple[PipelineConfig, str | None]:
    """A copy of `cfg` whose tracking URI is absolute (trials and workers run in other
    directories and other environments), and that URI, or None without tracking."""
    from puma_ray import tracking

    cfg = cfg.model_copy(deep=True)
    if tracking_uri:
        cfg.tracking.tracking_uri = tracking_uri
    uri = tracking.tracking_uri(cfg.tracking, run_dir)
    cfg.tracking.tracking_uri = tracking.absolute_uri(uri) if uri else "none"
    return cfg, (cfg.tracking.tracking_uri if uri else None)


def _reset_sweep_dir(sweep_dir: str, restore: bool, resume: bool, log) -> None:
    """Without Tune's state to restore, nothing in the sweep's directory can be reused."""
    if not restore and storage.exists(sweep_dir):
        if not resume:
            log(f"sweep: --fresh: deleting the earlier trials in {sweep_dir}")
        storage.delete(sweep_dir)
    storage.makedirs(sweep_dir)


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
    cfg, uri = _pin_tracking(cfg, run_dir, tracking_uri)
    sweep_id = f"{cfg.name}-{sweep_fingerprint(cfg)}"
    sweep_dir = storage.join(run_dir, "sweep", sweep_id)
    tune_path = storage.join(sweep_dir, TUNE_NAME)

    from puma_ray import tracking
    from puma_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    from ray import tune

    concurrency = _fit_concurrency(cfg, log)
    restore = resume and tune.Tuner.can_restore(tune_path)
    _reset_sweep_dir(sweep_dir, restore, resume, log)
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
        tuner = _new_tuner(cfg, plan, trainable, sweep_dir, concurrency)
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
        _collect(grid, result, cfg, sweep_dir, sweep_id, parent, log)
        status = _parent_status(result)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result.wall_s = time.perf_counter() - begin
        if parent is not None:
            tracking.safe(parent.finish, status, log=log)
    return result
