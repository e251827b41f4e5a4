"""`puma-ray run`: ingest → margin model → score → prune → train → evaluate, from one config.

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

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig, dump_yaml
from puma_ray.errors import ConfigError

STAGES = ("ingest", "margin_model", "score", "prune", "train", "evaluate")
BASELINES = ("random", "full")
# Stages repeated once per extra training seed (`seeds`): `train_s1`, `evaluate_s1`, ...
SEEDED = ("train", "evaluate", *(f"baseline_{b}" for b in BASELINES))


def seed_suffix(k: int) -> str:
    """The suffix of seed k's stage and folder names: '' for the first seed, else '_s<k>'."""
    return f"_s{k}" if k else ""


def split_seed(stage: str) -> tuple[str, int]:
    """('train', 2) for 'train_s2'; (stage, 0) for a stage without a seed suffix."""
    base, _, k = stage.rpartition("_s")
    return (base, int(k)) if base in SEEDED and k.isdigit() else (stage, 0)


def stages_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: the six of the mission, then one per baseline; with
    `seeds: N`, training and evaluation (and each baseline) once more per extra seed."""
    seeds = range(1, cfg.seeds)
    extra = tuple(f"{s}{seed_suffix(k)}" for k in seeds for s in ("train", "evaluate"))
    baselines = tuple(
        f"baseline_{b}{seed_suffix(k)}"
        for b in BASELINES
        if b in cfg.compare
        for k in range(cfg.seeds)
    )
    return STAGES + extra + baselines


def _reads(stage: str) -> str | None:
    """The stage whose output `stage` reads (None for ingest)."""
    base, k = split_seed(stage)
    if base.startswith("baseline_"):
        return "ingest"
    if base == "train":
        return "prune"
    if base == "evaluate":
        return f"train{seed_suffix(k)}"
    return {"margin_model": "ingest", "score": "margin_model", "prune": "score"}.get(stage)


def _downstream(stages: tuple[str, ...], name: str) -> tuple[str, ...]:
    """`name` and every stage that reads its output, directly or through another: the rest of
    the main chain; the baselines read only the ingested data."""
    out = [name]
    for stage in stages:  # in run order, so a stage's input is met before the stage
        if stage not in out and _reads(stage) in out:
            out.append(stage)
    return tuple(s for s in stages if s in out)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_stamps(cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    """Content hashes of the files outside the run dir that stages read: npz and torchvision
    sources, `margin_model.checkpoint` or the RobustBench weights (fetched first when
    `download` is set; missing: a one-line error before any stage runs). sha256, cached in the
    run dir by file stat (size, mtime, ctime, inode), so a large source is read again only when
    it changed."""
    from puma_ray.ingest import source_stamps

    out: dict[str, Any] = {}
    sources = source_stamps(cfg.data, run_dir)
    if any(s is not None for s in sources):
        out["data"] = sources
    if cfg.margin_model.given:
        from puma_ray.models.zoo import margin_model_stamp

        out["margin_checkpoint"] = margin_model_stamp(cfg, run_dir)
    return out


def stage_fingerprints(cfg: PipelineConfig, inputs: dict[str, Any] | None = None) -> dict[str, str]:
    """What each stage's result depends on: the config sections it reads, the fingerprints of
    the stages it consumes and (`inputs`, from `input_stamps`) the content of the files it
    reads from outside the run dir, so a source or checkpoint replaced in place is noticed.
    Resources (Ray address, workers) are left out: they change how fast a stage runs, not
    what it produces."""
    inputs = inputs or {}
    d = cfg.model_dump(mode="json")
    fp: dict[str, str] = {}
    # without external files (builtin data) the fingerprints are those of earlier versions
    fp["ingest"] = _hash([d["data"], inputs["data"]] if "data" in inputs else d["data"])
    zoo = d["margin_model"]["robustbench"]
    margin_inputs = (
        {"checkpoint": d["margin_model"]["checkpoint"]}
        if cfg.margin_model.checkpoint
        # where the weights are staged (model_dir) and `download` do not change the model
        else {"robustbench": {k: zoo[k] for k in ("name", "dataset", "threat_model")}}
        if zoo["name"]
        else {"model": d["margin_model"]["model"], "train": d["margin_model"]["train"]}
    )
    if "margin_checkpoint" in inputs:
        margin_inputs["sha256"] = inputs["margin_checkpoint"]
    fp["margin_model"] = _hash([fp["ingest"], margin_inputs, d["seed"]])
    fp["score"] = _hash([fp["margin_model"], d["scoring"]])
    fp["prune"] = _hash([fp["score"], d["pruning"], d["training"]["attack"]])
    for k in range(cfg.seeds):
        # seed k's stages: the first keeps the fingerprints it had before `seeds` existed
        dk = d if k == 0 else seeded_config(cfg, k).model_dump(mode="json")
        sfx = seed_suffix(k)
        recipe = [dk["model"], dk["training"], dk["seed"]]
        fp[f"train{sfx}"] = _hash([fp["prune"], *recipe])
        fp[f"evaluate{sfx}"] = _hash([fp[f"train{sfx}"], dk["evaluation"]])
        # The baselines read neither scores nor the PUMA kept set: only the data, the recipe
        # and the parameters a random subset shares with the pruned run (ratio, scope,
        # classes, seed).
        p = dk["pruning"]
        random_cut = {key: p[key] for key in ("ratio", "scope", "per_class", "seed")}
        fp[f"baseline_random{sfx}"] = _hash([fp["ingest"], random_cut, *recipe, dk["evaluation"]])
        fp[f"baseline_full{sfx}"] = _hash([fp["ingest"], *recipe, dk["evaluation"]])
    return fp


def seeded_config(cfg: PipelineConfig, k: int) -> PipelineConfig:
    """Seed k's copy of the config: training.seed + k and, for a random subset, pruning.seed
    + k (PUMA's kept set does not depend on pruning.seed, so it is shared by every seed)."""
    if k == 0:
        return cfg
    out = cfg.model_copy(deep=True)
    out.training.seed = cfg.training.seed + k
    out.pruning.seed = cfg.pruning.seed + k
    return out


def margin_model_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the margin model is trained with: the same pipeline, its own model/recipe."""
    out = cfg.model_copy(deep=True)
    out.model = cfg.margin_model.model.model_copy(deep=True)
    out.training = cfg.margin_model.train.model_copy(deep=True)
    return out


def random_baseline_config(cfg: PipelineConfig) -> PipelineConfig:
    """Random sub-sampling at the same ratio and scope, every kept sample at the base eps."""
    out = cfg.model_copy(deep=True)
    out.pruning.strategy = "random"
    out.pruning.eps_rule = "none"
    return out


class PipelineState:
    """`<run_dir>/pipeline.json`: the fingerprint each finished stage was computed with, and the
    MLflow parent run of this run directory."""

    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, "pipeline.json")
        self.done: dict[str, str] = {}
        self.mlflow: dict[str, str] = {}
        if storage.exists(self.path):
            saved = json.loads(storage.read_bytes(self.path))
            self.done = saved.get("stages", {})
            self.mlflow = saved.get("mlflow", {})

    def is_current(self, stage: str, fingerprint: str) -> bool:
        return self.done.get(stage) == fingerprint

    def invalidate(self, stages: tuple[str, ...]) -> None:
        """Forget `stages` (one being redone and all after it) before the redo starts, so an
        interrupted redo is never taken as done and nothing downstream outlives its input."""
        if any([self.done.pop(s, None) is not None for s in stages]):
            self._write()

    def mark(self, stage: str, fingerprint: str) -> None:
        self.done[stage] = fingerprint
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
        body = {"stages": self.done, "mlflow": self.mlflow}
        storage.atomic_write_bytes(self.path, json.dumps(body, indent=2).encode())


# ----------------------------------------------------------------------------------------------
# The end summary: read back from the stages' own files, so a rerun that skips everything
# prints the same story as the run that computed it.


@dataclass
class SeedResult:
    """One training seed of a method: its test-split accuracies and training compute."""

    seed: int  # training.seed of this run
    clean_acc: float | None
    robust_acc: float | None
    train_device_s: float | None
    test_rows: int = 0


@dataclass
class MethodResult:
    """One method of the comparison table: the mean over its seeds, with 95% intervals (over
    the seeds; with one seed, the Wilson sampling interval of its evaluation) and the paired
    difference of robust accuracy to full data (same seeds)."""

    method: str
    rows: int
    clean_acc: float | None
    robust_acc: float | None
    train_device_s: float | None
    seeds: list[SeedResult] = field(default_factory=list)
    clean_ci: dict | None = None  # Interval.to_dict()
    robust_ci: dict | None = None
    robust_vs_full: dict | None = None  # paired difference to `full`, an Interval dict
    interval: str = "wilson"  # what the intervals are: "wilson" (test rows) or "seeds"


@dataclass
class PipelineReport:
    run_dir: str
    rows_scored: int = 0
    misclassified: int = 0
    kept: int = 0
    pruned: int = 0
    eps_adjusted: int = 0
    attack: str = ""
    device_seconds: dict[str, float] = field(default_factory=dict)
    methods: list[MethodResult] = field(default_factory=list)

    @property
    def total_device_s(self) -> float:
        return sum(self.device_seconds.values())

    def metrics(self) -> dict[str, float]:
        """Flat metrics for the MLflow parent run: `<method>.robust_acc` is the mean over
        seeds (test split), with `_ci_low` / `_ci_high` and `<method>.robust_vs_full`."""
        out: dict[str, float] = {
            "score.rows": self.rows_scored,
            "score.misclassified": self.misclassified,
            "prune.kept": self.kept,
            "prune.pruned": self.pruned,
            "prune.eps_adjusted": self.eps_adjusted,
            "device_seconds": self.total_device_s,
        }
        out.update({f"device_seconds.{k}": v for k, v in self.device_seconds.items()})
        for m in self.methods:
            for key in ("clean_acc", "robust_acc", "train_device_s"):
                value = getattr(m, key)
                if value is not None:
                    out[f"{m.method}.{key}"] = value
            for key in ("clean_ci", "robust_ci"):
                ci = getattr(m, key)
                if ci is not None:
                    name = key.replace("_ci", "_acc")
                    out[f"{m.method}.{name}_ci_low"] = ci["low"]
                    out[f"{m.method}.{name}_ci_high"] = ci["high"]
            if m.robust_vs_full is not None:
                out[f"{m.method}.robust_vs_full"] = m.robust_vs_full["value"]
                out[f"{m.method}.robust_vs_full_ci_low"] = m.robust_vs_full["low"]
                out[f"{m.method}.robust_vs_full_ci_high"] = m.robust_vs_full["high"]
        return out

    def table(self) -> str:
        """The comparison as a Markdown table (PUMA first, then the baselines): test-split
        means with 95% intervals and the paired robust-accuracy difference to full data."""
        lines = [
            f"| method | train rows | seeds | clean acc | robust acc ({self.attack}) | "
            "robust − full (paired) | train device-s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in self.methods:
            lines.append(
                f"| {m.method} | {m.rows:,} | {len(m.seeds)} | {_ci(m.clean_acc, m.clean_ci)} | "
                f"{_ci(m.robust_acc, m.robust_ci)} | {_diff(m)} | "
                f"{'—' if m.train_device_s is None else format(m.train_device_s, '.0f')} |"
            )
        return "\n".join(lines)

    def interval_note(self) -> str:
        """What the ± in the table means."""
        seeds = max((len(m.seeds) for m in self.methods), default=0)
        if seeds > 1:
            return (
                f"± : 95% t interval over {seeds} training seeds on the same test rows (the "
                "test-set sampling error, shared by every method, is not in it); robust − "
                "full: mean and 95% t interval of the per-seed differences"
            )
        return "± : 95% Wilson interval of one evaluation over its test rows (one seed)"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "total_device_s": self.total_device_s}


def _ci(value: float | None, ci: dict | None) -> str:
    if value is None:
        return "—"
    if ci is None or ci["high"] == ci["low"]:
        return f"{value:.4f}"
    return f"{value:.4f} ± {(ci['high'] - ci['low']) / 2:.4f}"


def _diff(m: MethodResult) -> str:
    d = m.robust_vs_full
    if d is None:
        return "—"
    half = (d["high"] - d["low"]) / 2
    return f"{d['value']:+.4f}" + (f" ± {half:.4f}" if d["n"] > 1 else "")


def _read(path: str) -> dict:
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _train_device_s(summary: dict) -> float | None:
    history = summary.get("history") or []
    return float(history[-1]["device_seconds"]) if history else None


def pipeline_report(cfg: PipelineConfig, run_dir: str) -> PipelineReport:
    """Collect the numbers of a finished run from the files its stages wrote."""
    score = _read(storage.join(run_dir, "scores", "manifest.json")).get("summary", {})
    kept = _read(storage.join(run_dir, "kept", "manifest.json")).get("counts", {})
    a = cfg.training.attack
    eps = f"{a.epsilon * 255:.0f}/255" if a.norm == "linf" else f"{a.epsilon:.3f}"
    report = PipelineReport(
        run_dir=run_dir,
        rows_scored=int(score.get("rows", 0)),
        misclassified=int(score.get("misclassified", 0)),
        kept=int(kept.get("kept", 0)),
        pruned=int(kept.get("pruned", 0)),
        eps_adjusted=int(kept.get("eps_adjusted", 0)),
        attack=f"PGD-{cfg.evaluation.pgd_steps} {a.norm} {eps}",
    )
    margin = _train_device_s(_read(storage.join(run_dir, "margin_model", "summary.json")))
    if margin is not None:
        report.device_seconds["margin_model"] = margin
    if score.get("device_s") is not None:
        report.device_seconds["score"] = float(score["device_s"])
    names = [(cfg.pruning.strategy, "")] + [(b, f"_{b}") for b in BASELINES if b in cfg.compare]
    for method, suffix in names:
        result = _method_result(cfg, run_dir, method, suffix, report.device_seconds)
        if result is not None:
            report.methods.append(result)
    full = next((m for m in report.methods if m.method == "full"), None)
    for m in report.methods:
        _add_vs_full(m, full)
    return report


def _method_result(cfg, run_dir: str, method: str, suffix: str, device_seconds: dict):
    """A method's seeds read back from their train / evaluate summaries, aggregated; None if
    it has not been trained."""
    from puma_ray.stats import mean_interval

    seeds, rows = [], 0
    for k in range(cfg.seeds):
        sfx = suffix + seed_suffix(k)
        train = _read(storage.join(run_dir, f"train{sfx}", "summary.json"))
        if not train:
            continue
        ev = _read(storage.join(run_dir, f"evaluate{sfx}", "summary.json"))
        device_s = _train_device_s(train)
        if device_s is not None:
            device_seconds[f"train{sfx}"] = device_s
        rows = int(train.get("rows", 0))
        seeds.append(
            SeedResult(
                seed=seeded_config(cfg, k).training.seed,
                clean_acc=ev.get("clean_acc"),
                robust_acc=ev.get("robust_acc"),
                train_device_s=device_s,
                test_rows=int(ev.get("rows", 0)),
            )
        )
        intervals = ev.get("intervals", {})
    if not seeds:
        return None
    m = MethodResult(method, rows, None, None, None, seeds=seeds)
    for key in ("clean_acc", "robust_acc", "train_device_s"):
        values = [getattr(s, key) for s in seeds if getattr(s, key) is not None]
        if len(values) == len(seeds):
            ci = mean_interval(values)
            setattr(m, key, ci.value)
            if key != "train_device_s" and len(seeds) > 1:
                setattr(m, key.replace("_acc", "_ci"), ci.to_dict())
    if len(seeds) == 1:  # one evaluation: its own sampling interval over the test rows
        m.clean_ci, m.robust_ci = intervals.get("clean_acc"), intervals.get("robust_acc")
    else:
        m.interval = "seeds"
    return m


def _add_vs_full(m: MethodResult, full: MethodResult | None) -> None:
    """The paired (same training seed) robust-accuracy difference of `m` to full data."""
    from puma_ray.stats import paired_difference

    if full is None or m is full:
        return
    theirs = {s.seed: s.robust_acc for s in full.seeds}
    pairs = [(s.robust_acc, theirs[s.seed]) for s in m.seeds if theirs.get(s.seed) is not None]
    if pairs and all(a is not None for a, _ in pairs):
        a, b = zip(*pairs, strict=True)
        m.robust_vs_full = paired_difference(list(a), list(b)).to_dict()


@dataclass
class PipelineResult:
    run_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    summaries: dict[str, Any] = field(default_factory=dict)
    report: PipelineReport | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    wall_s: float = 0.0

    def format(self, stages: tuple[str, ...]) -> str:
        r = self.report
        lines = [f"run: finished in {self.wall_s:.0f}s -> {self.run_dir}"]
        lines.append(f"  {'stage':<18}{'status':<10}{'wall s':>8}")
        for name in stages:
            if name in self.skipped:
                lines.append(f"  {name:<18}{'skipped':<10}{'-':>8}")
            else:
                lines.append(f"  {name:<18}{'ran':<10}{self.stage_seconds.get(name, 0):>8.1f}")
        if r is not None:
            lines += [
                f"  rows scored      {r.rows_scored:,} (misclassified by the margin model: "
                f"{r.misclassified:,})",
                f"  kept / pruned    {r.kept:,} / {r.pruned:,}; eps-adjusted {r.eps_adjusted:,}",
            ]
            if r.methods:
                m = r.methods[0]
                lines.append(
                    f"  test accuracy    clean {_ci(m.clean_acc, m.clean_ci)}, robust "
                    f"{_ci(m.robust_acc, m.robust_ci)} ({r.attack}; "
                    f"{'mean of ' + str(len(m.seeds)) + ' seeds' if len(m.seeds) > 1 else '1 seed'}"
                    ", ± 95% interval)"
                    if m.clean_acc is not None and m.robust_acc is not None
                    else "  test accuracy    (not evaluated)"
                )
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r.device_seconds.items())
            lines.append(f"  device-seconds   {r.total_device_s:.0f} ({parts})")
            if len(r.methods) > 1 or (r.methods and len(r.methods[0].seeds) > 1):
                lines += ["", *("  " + t for t in r.table().splitlines())]
                lines.append("  " + r.interval_note())
        lines.append(f"  artifacts        {self.run_dir}")
        if self.mlflow_run_id and self.tracking_uri:
            from puma_ray.tracking import redact

            uri = redact(self.tracking_uri)
            lines.append(f"  MLflow           run {self.mlflow_run_id} in {uri}")
            lines.append(f"  open it with     mlflow ui --backend-store-uri {uri}")
        return "\n".join(lines)


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
            files["report.md"] = report.table() + "\n"
            files["report.json"] = json.dumps(report.to_dict(), indent=1)
        kept = storage.join(run_dir, "kept", "manifest.json")
        if storage.exists(kept):
            files["kept_manifest.json"] = storage.read_bytes(kept).decode()
        for name, text in files.items():
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            tracking.safe(run.log_artifact, path, "pipeline", log=log)


# Stage folders of a run dir (those of `run` and of the single-stage commands): where a killed
# run may have left temp files, swept by the next run while it holds the lock.
def stage_dirs(seeds: int) -> tuple[str, ...]:
    """The run dir's stage folders for a run with `seeds` training seeds."""
    sfx = [seed_suffix(k) for k in range(seeds)]
    methods = [f"{m}{s}" for m in ("", "_random", "_full") for s in sfx]
    return (
        "data/train",
        "data/val",
        "data/test",
        "margin_model",
        "scores",
        "embeddings",
        "extrapolated",
        "kept",
        *(f"kept_random{s}" for s in sfx),
        *(f"{kind}{m}" for kind in ("train", "evaluate") for m in methods),
    )


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


def forced_stages(stages: tuple[str, ...], force: tuple[str, ...]) -> set[str]:
    """`--force STAGE`: that stage and every stage that consumes its output (`_downstream`);
    a seeded stage's name (`train`, `baseline_full`) forces it for every seed."""
    named = {s for f in force for s in stages if f in (s, split_seed(s)[0])}
    return {s for f in named for s in _downstream(stages, f)}


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run every stage not up to date (or forced) under the run-dir lock; see the module doc."""
    stages = stages_of(cfg)
    for stage in force:
        if stage not in stages and stage not in {split_seed(s)[0] for s in stages}:
            raise ConfigError(f"--force {stage}: unknown stage (stages: {', '.join(stages)})")
    from puma_ray.locking import run_dir_lock

    # before Ray starts: a second `run` on the same run dir is refused at once
    with run_dir_lock(run_dir, "run", log=log):
        return _run_locked(cfg, run_dir, stages, forced_stages(stages, force), log)


def _run_locked(cfg, run_dir, stages, forced: set[str], log) -> PipelineResult:
    from puma_ray import outputs, tracking
    from puma_ray.evaluate import run_evaluate
    from puma_ray.ingest import run_ingest
    from puma_ray.prune import run_prune
    from puma_ray.runtime import ensure_ray
    from puma_ray.score import run_score
    from puma_ray.train import run_train

    begin = time.perf_counter()
    storage.makedirs(run_dir)
    _sweep_stale_tmp(run_dir, cfg.seeds, log)
    fps = stage_fingerprints(cfg, input_stamps(cfg, run_dir))
    ensure_ray(cfg.ray)
    state = PipelineState(run_dir)
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
            state.mark(name, fps[name])
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
