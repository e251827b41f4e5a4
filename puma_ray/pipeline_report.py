"""The end summary of `puma-ray run`: read back from the stages' own files (train and evaluate
summaries, the score and kept manifests), so a rerun that skips everything prints the same
story as the run that computed it; per method the mean over its seeds with 95% intervals and the
paired difference to full data (`puma_ray.stats`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from puma_ray import storage
from puma_ray.config import PipelineConfig
from puma_ray.stages import BASELINES, seed_suffix, seeded_config


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
        w = max([18, *(len(name) + 2 for name in stages)])  # baseline_random_s1 is 18 long
        lines.append(f"  {'stage':<{w}}{'status':<10}{'wall s':>8}")
        for name in stages:
            if name in self.skipped:
                lines.append(f"  {name:<{w}}{'skipped':<10}{'-':>8}")
            else:
                lines.append(f"  {name:<{w}}{'ran':<10}{self.stage_seconds.get(name, 0):>8.1f}")
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
            from puma_ray.tracking import redact, run_page

            command, url = run_page(self.tracking_uri, self.mlflow_run_id)
            lines.append(
                f"  MLflow           run {self.mlflow_run_id} in {redact(self.tracking_uri)}"
            )
            if command:
                lines.append(f"  open it with     {command}")
            lines.append(f"  the run's page   {url}")
        return "\n".join(lines)
