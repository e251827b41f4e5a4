"""`puma-ray report [CONFIG]`: a sweep's results read back from MLflow alone (no Ray; nothing
but the MLflow store is read): a table (Markdown and CSV) and four plots. `puma-ray sweep` runs
the same code at its end and logs the files on the sweep's parent run, so the MLflow UI and this
command show the same numbers. The CLI reads the store and experiment the sweep of CONFIG logs
to (`puma_ray.cli.report_source`); `--experiment` / `--tracking-uri` name others.

What the plots show (docs/sweeps.md has an example of each):
- pareto.png: clean vs robust accuracy per finished trial. The Pareto front (no other trial is
  at least as good on both and better on one) is the red line; the unpruned baseline is a star.
- robust_vs_ratio.png: robust accuracy vs prune ratio, one line per eps_scale (and per other
  swept setting); repeats of a point are averaged, the bar spans their min..max; the unpruned
  baseline is a dashed line.
- compute.png: training device-seconds per trial (summed over workers) and its share of the
  unpruned baseline's; says so when the sweep has no baseline.
- curves.png: per-epoch robust accuracy on the validation subset, the signal ASHA stops
  trials on.

"Best" (`sweep.metric`) is chosen on the validation split; the clean and robust accuracy columns
are the test split's, measured on rows no choice was made on.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

from puma_ray.errors import PumaRayError
from puma_ray.stats import Interval, mean_interval, paired_difference
from puma_ray.tracking import redact

PLOTS = ("pareto.png", "robust_vs_ratio.png", "compute.png", "curves.png")
_EPS_KEYS = ("pruning.eps_scale", "pruning.eps_quantile", "pruning.eps_alpha")


class ReportError(PumaRayError):
    """The tracking store, experiment or sweep run asked for does not exist."""


@dataclass
class TrialRow:
    """One trial of a sweep, as its MLflow child run records it."""

    trial: str
    run_id: str
    status: str  # finished | stopped early | failed | interrupted | running
    label: str
    values: dict[str, str]  # swept key -> value as logged ("—" where it does not apply)
    ratio: float | None
    baseline: bool  # prunes nothing and keeps every epsilon: the compute reference
    added_baseline: bool  # the trial the sweep added (not a point of the grid)
    clean_acc: float | None  # test split (reported, never chosen on)
    robust_acc: float | None
    pgd_acc: float | None
    val_clean_acc: float | None  # validation split (what `sweep.metric` chooses on)
    val_robust_acc: float | None
    device_seconds: float | None
    kept_rows: int | None
    kept_fraction: float | None
    epochs: int | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val robust acc)
    pareto: bool = False
    vs_baseline: float | None = None  # device_seconds / the baseline's
    # key a settings dimension sets -> the value this trial's setting gives it ("—": its
    # setting leaves the key at the config's value); the table's columns after the swept keys
    setting_values: dict[str, str] = field(default_factory=dict)

    def cell(self, key: str) -> str:
        """The trial's value of a swept key or of a key its settings set."""
        return self.values.get(key, self.setting_values.get(key, "—"))

    @property
    def finished(self) -> bool:
        return self.status == "finished" and self.clean_acc is not None

    def metric(self, name: str) -> float | None:
        """A `sweep.metric` value: val/robust_acc, val/clean_acc or device_seconds."""
        return getattr(self, name.replace("val/", "val_"))


@dataclass
class SweepReport:
    experiment: str
    tracking_uri: str
    parent_run_id: str
    sweep: str
    metric: str
    mode: str
    swept: list[str]
    attack: str
    rows: list[TrialRow]
    notes: list[str] = field(default_factory=list)
    setting_keys: list[str] = field(default_factory=list)  # the keys settings dimensions set

    @property
    def baselines(self) -> list[TrialRow]:
        return [r for r in self.rows if r.baseline and r.device_seconds is not None]

    @property
    def baseline_device_s(self) -> float | None:
        b = [r.device_seconds for r in self.baselines if r.finished]
        return sum(b) / len(b) if b else None

    @property
    def best(self) -> TrialRow | None:
        done = [r for r in self.rows if r.finished and r.metric(self.metric) is not None]
        if not done:
            return None
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda r: r.metric(self.metric))

    def settings(self) -> list[SettingSummary]:
        """Finished trials grouped by setting (every swept value but the seeds): repeats of
        one setting (`sweep.num_samples`) get a mean, a 95% t interval over the repeats and
        the paired (same training seed) difference to the unpruned baseline."""
        setting_keys = [k for k in self.swept if not k.endswith(".seed")]
        groups: dict[tuple, list[TrialRow]] = {}
        for r in self.rows:
            if r.finished and r.robust_acc is not None:
                key = (
                    ("baseline",)
                    if r.added_baseline
                    else tuple(r.values.get(k, "—") for k in setting_keys)
                )
                groups.setdefault(key, []).append(r)
        base = {r.values.get("training.seed"): r for r in self.rows if r.baseline and r.finished}
        out = []
        for key, rows in groups.items():
            pairs = [
                (r.robust_acc, base[r.values.get("training.seed")].robust_acc)
                for r in rows
                if r.values.get("training.seed") in base and not r.baseline
            ]
            val = [r.val_robust_acc for r in rows if r.val_robust_acc is not None]
            out.append(
                SettingSummary(
                    label=rows[0].label
                    if key == ("baseline",)
                    else _setting_label(setting_keys, key),
                    trials=[r.trial for r in rows],
                    val_robust=mean_interval(val) if len(val) == len(rows) else None,
                    test_robust=mean_interval([r.robust_acc for r in rows]),
                    test_clean=mean_interval([r.clean_acc for r in rows]),
                    vs_baseline=paired_difference(*map(list, zip(*pairs, strict=True)))
                    if pairs and len(pairs) == len(rows)
                    else None,
                    baseline=rows[0].baseline,
                )
            )
        out.sort(key=lambda g: -(g.val_robust.value if g.val_robust else -1))
        return out

    def settings_markdown(self) -> str:
        """The settings table: mean ± 95% interval over each setting's repeats."""
        head = ["setting", "repeats", "val robust acc", "test clean acc"]
        head += [f"test robust acc ({self.attack})", "test robust − unpruned (paired)"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for g in self.settings():
            diff = "—" if g.vs_baseline is None else g.vs_baseline.format(4)
            lines.append(
                f"| {g.label}{' (unpruned)' if g.baseline else ''} | {len(g.trials)} | "
                f"{g.val_robust.format(4) if g.val_robust else '—'} | {g.test_clean.format(4)} | "
                f"{g.test_robust.format(4)} | {diff} |"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ table

    def _columns(self) -> list[str]:
        return (
            [k for k in self.swept if not k.endswith(".seed")]
            + self.setting_keys
            + [k for k in self.swept if k.endswith(".seed")]
        )

    def markdown(self) -> str:
        cols = self._columns()
        head = ["trial", "status", *(_short(k) for k in cols)]
        head += ["kept rows", "val robust acc", "test clean acc"]
        head += [f"test robust acc ({self.attack})", "train device-s", "vs unpruned", "Pareto"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(_align(h) for h in head) + "|"]
        for r in self.rows:
            name = r.trial + (" (unpruned)" if r.baseline else "")
            cells = [name, r.status, *(r.cell(k) for k in cols)]
            cells += [
                _num(r.kept_rows, ",d"),
                _num(r.val_robust_acc, ".4f"),
                _num(r.clean_acc, ".4f"),
                _num(r.robust_acc, ".4f"),
                _num(r.device_seconds, ".1f"),
                _num(None if r.vs_baseline is None else 100 * r.vs_baseline, ".0f", "%"),
                "yes" if r.pareto else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        cols = self._columns()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            ["trial", "status", "label", *cols, "unpruned", "kept_rows", "kept_fraction"]
            + ["val_clean_acc", "val_robust_acc"]
            + ["test_clean_acc", "test_robust_acc", "test_pgd_acc", "device_seconds", "vs_unpruned"]
            + ["pareto", "epochs", "mlflow_run_id"]
        )
        for r in self.rows:
            w.writerow(
                [r.trial, r.status, r.label, *(r.cell(k) for k in cols)]
                + [r.baseline, _raw(r.kept_rows), _raw(r.kept_fraction)]
                + [_raw(r.val_clean_acc), _raw(r.val_robust_acc)]
                + [_raw(r.clean_acc), _raw(r.robust_acc), _raw(r.pgd_acc)]
                + [_raw(r.device_seconds), _raw(r.vs_baseline), r.pareto, _raw(r.epochs)]
                + [r.run_id]
            )
        return buf.getvalue()

    def format(self) -> str:
        lines = [
            f"sweep {self.sweep}: {len(self.rows)} trials in experiment {self.experiment!r} "
            f"(MLflow run {self.parent_run_id})",
            "",
            self.markdown(),
            "",
        ]
        if any(len(g.trials) > 1 for g in self.settings()):
            lines += [
                "Settings over their repeats (± : 95% t interval over the repeats' training "
                "seeds; paired: the same seed's unpruned trial):",
                "",
                self.settings_markdown(),
                "",
            ]
        best = self.best
        if best is not None:
            lines.append(
                f"best by {self.metric} ({self.mode}): {best.trial} {best.label} — "
                f"{self.metric} {_num(best.metric(self.metric), '.4f')}; test clean "
                f"{best.clean_acc:.4f}, robust {best.robust_acc:.4f}, "
                f"{_num(best.device_seconds, '.1f')} device-s"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def write(self, out_dir: str) -> list[str]:
        """Write results.md, results.csv and plots/*.png under `out_dir`; return the paths
        relative to it."""
        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
        md = [f"# Sweep {self.sweep}", "", self.format(), ""]
        md += [f"![{p}](plots/{p})" for p in PLOTS]
        files = {"results.md": "\n".join(md) + "\n", "results.csv": self.csv_text()}
        for name, text in files.items():
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(text)
        from puma_ray.report_plots import plot_all  # matplotlib only when plots are drawn

        plot_all(self, os.path.join(out_dir, "plots"))
        return list(files) + [f"plots/{p}" for p in PLOTS]


@dataclass
class SettingSummary:
    """One setting of a sweep over its repeats (see `SweepReport.settings`)."""

    label: str
    trials: list[str]
    val_robust: Interval | None
    test_robust: Interval
    test_clean: Interval
    vs_baseline: Interval | None
    baseline: bool


def _setting_label(keys: list[str], values: tuple) -> str:
    return " ".join(f"{_short(k)}={v}" for k, v in zip(keys, values, strict=True)) or "trials"


def _short(key: str) -> str:
    if "." not in key:  # a settings dimension's name
        return key
    section, name = key.split(".", 1)
    return name if section == "pruning" else f"{section}_{name}"


def _align(header: str) -> str:
    return "---" if header in ("trial", "status", "Pareto") else "---:"


def _num(v, fmt: str, suffix: str = "") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{fmt}}{suffix}"


def _raw(v) -> str:
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------
# Reading MLflow.


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    from puma_ray.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not os.path.exists(db):
        # MlflowClient would create an empty store there and then find nothing
        raise ReportError(
            f"{redact(tracking_uri)}: no MLflow store at {db} (has `puma-ray sweep` run with "
            "this config? else give its --run-dir or --tracking-uri)"
        )
    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _float(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None or math.isnan(v) else float(v)


def _status(run) -> str:
    tag = run.data.tags.get("puma_ray.trial_status")
    if tag:
        return tag
    return "running" if run.info.status == "RUNNING" else "incomplete"


def _experiment(client, tracking_uri: str, experiment: str):
    """The MLflow experiment named (or numbered) `experiment`, else one line listing them."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:
            exp = None
    if exp is None:
        names = ", ".join(repr(e.name) for e in client.search_experiments()) or "none"
        raise ReportError(
            f"no experiment {experiment!r} in {redact(tracking_uri)} (experiments: {names})"
        )
    return exp


def _parent_run(client, tracking_uri: str, exp, stage: str, run_id: str | None, missing: str):
    """The run `run_id`, else the latest run of `exp` tagged `puma_ray.stage = stage` (none:
    one line, `experiment ... <missing>`)."""
    if run_id:
        try:
            return client.get_run(run_id)
        except Exception:
            raise ReportError(f"{redact(tracking_uri)}: no run {run_id}") from None
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`puma_ray.stage` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise ReportError(f"experiment {exp.name!r} in {redact(tracking_uri)} {missing}")
    return found[0]


def load_report(
    tracking_uri: str, experiment: str, *, parent_run_id: str | None = None
) -> SweepReport:
    """The sweep `parent_run_id` (default: the latest sweep) of `experiment` (a name or an
    id) from the MLflow store at `tracking_uri`."""
    client = _client(tracking_uri)
    exp = _experiment(client, tracking_uri, experiment)
    parent = _parent_run(
        client, tracking_uri, exp, "sweep", parent_run_id, "has no sweep (run `puma-ray sweep`)"
    )
    p = parent.data.params
    swept = [k for k in p.get("sweep.swept", "").split(",") if k]
    setting_keys = [k for k in p.get("sweep.setting_keys", "").split(",") if k]
    children = _search_all(
        client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    sets = _settings_keys(p.get("sweep.space"))
    rows = [_row(client, run, swept, setting_keys, sets) for run in children]
    report = SweepReport(
        experiment=exp.name,
        tracking_uri=tracking_uri,
        parent_run_id=parent.info.run_id,
        sweep=p.get("sweep.id", parent.info.run_name or parent.info.run_id),
        metric=_metric(p.get("sweep.metric")),
        mode=p.get("sweep.mode", "max"),
        swept=swept,
        attack=_attack(p),
        rows=rows,
        setting_keys=setting_keys,
    )
    _annotate(report)
    return report


def load_pipeline_report(
    tracking_uri: str, experiment: str, *, parent_run_id: str | None = None
) -> str:
    """The comparison table `puma-ray run` logged on its parent run (`pipeline/report.md`: per
    method the test accuracies over its seeds with 95% intervals and the paired difference to
    full data) of `experiment` (the latest pipeline run, or `parent_run_id`), with a header."""
    import tempfile

    client = _client(tracking_uri)
    exp = _experiment(client, tracking_uri, experiment)
    run = _parent_run(
        client, tracking_uri, exp, "pipeline", parent_run_id, "has no `puma-ray run` (pipeline) run"
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "pipeline/report.md", tmp)
        except Exception:
            raise ReportError(
                f"run {run.info.run_id} has no pipeline/report.md (it did not finish)"
            ) from None
        with open(path) as f:
            table = f.read().rstrip()
    head = (
        f"run {run.info.run_name or run.info.run_id} ({run.info.run_id}) in experiment {exp.name!r}"
    )
    return f"{head}\n\n{table}"


def _metric(logged: str | None) -> str:
    """The sweep's `sweep.metric`; sweeps logged before the validation split chose on the test
    robust accuracy, which the report no longer ranks by: their rows rank by val/robust_acc
    (absent there, so none is 'best')."""
    from puma_ray.config import SWEEP_METRICS

    return logged if logged in SWEEP_METRICS else "val/robust_acc"


def _attack(p: dict) -> str:
    norm, eps = p.get("training.attack.norm"), p.get("training.attack.epsilon")
    steps = p.get("evaluation.pgd_steps", "?")
    if norm is None or eps is None:
        return f"PGD-{steps}"
    e = float(eps)
    return f"PGD-{steps} {norm} " + (f"{e * 255:.3g}/255" if norm == "linf" else f"{e:.3g}")


def _settings_keys(space_json: str | None) -> dict[str, dict[str, set[str]]] | None:
    """settings dimension -> setting name -> the keys it sets, from the sweep's logged search
    space; None when it cannot be read (a space longer than MLflow keeps of a param)."""
    import json

    try:
        space = json.loads(space_json or "{}")
        return {
            dim: {s["name"]: set(s) - {"name"} for s in d["settings"]}
            for dim, d in space.items()
            if "settings" in d
        }
    except (ValueError, TypeError, KeyError):
        return None


def _row(
    client,
    run,
    swept: list[str],
    setting_keys: tuple[str, ...] | list[str] = (),
    settings: dict[str, dict[str, set[str]]] | None = None,
) -> TrialRow:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    eps_rule = p.get("pruning.eps_rule")

    def value(key: str) -> str:
        v = p.get(key) if "." in key else p.get(f"setting.{key}")  # a setting: its name
        if key in _EPS_KEYS and eps_rule == "none":
            v = None  # an epsilon parameter of a trial that keeps every epsilon
        return "—" if v is None else v

    values = {key: value(key) for key in swept}
    setting_values = {}
    for key in setting_keys:
        v = value(key)
        for dim, named in (settings or {}).items():
            chosen = named.get(p.get(f"setting.{dim}"))
            if chosen is not None and key not in chosen and any(key in s for s in named.values()):
                v = "—"  # this trial's setting leaves the key at the config's value
        setting_values[key] = v
    ratio = p.get("pruning.ratio")
    epochs = m.get("epoch")
    try:
        history = client.get_metric_history(run.info.run_id, "val/epoch_robust_acc")
    except Exception:
        history = []
    curve = sorted((int(h.step), float(h.value)) for h in history)
    return TrialRow(
        trial=t.get("puma_ray.trial") or p.get("trial") or run.info.run_name or run.info.run_id,
        run_id=run.info.run_id,
        status=_status(run),
        label=t.get("puma_ray.label", ""),
        values=values,
        ratio=float(ratio) if ratio is not None else None,
        baseline=t.get("puma_ray.unpruned", p.get("sweep.unpruned", "")).lower() == "true",
        added_baseline=t.get("puma_ray.baseline", "").lower() == "true",
        clean_acc=_float(m, "test/clean_acc"),
        robust_acc=_float(m, "test/robust_acc"),
        pgd_acc=_float(m, "test/pgd_acc"),
        val_clean_acc=_float(m, "val/clean_acc"),
        val_robust_acc=_float(m, "val/robust_acc"),
        device_seconds=_float(m, "device_seconds"),
        kept_rows=int(m["kept_rows"]) if "kept_rows" in m else None,
        kept_fraction=_float(m, "kept_fraction"),
        epochs=int(epochs) if epochs is not None else None,
        curve=curve,
        setting_values=setting_values,
    )


def _pareto(rows: list[TrialRow]) -> None:
    """Mark the trials no other finished trial dominates on (clean, robust), both maximised."""
    done = [r for r in rows if r.finished and r.robust_acc is not None]
    for r in done:
        r.pareto = not any(
            o.clean_acc >= r.clean_acc
            and o.robust_acc >= r.robust_acc
            and (o.clean_acc > r.clean_acc or o.robust_acc > r.robust_acc)
            for o in done
        )


def _annotate(report: SweepReport) -> None:
    rows = report.rows
    _pareto(rows)
    base = report.baseline_device_s
    for r in rows:
        if base and r.device_seconds is not None:
            r.vs_baseline = r.device_seconds / base

    def key(r: TrialRow):
        v = r.metric(report.metric)
        rank = -v if (v is not None and report.mode == "max") else (v if v is not None else 0)
        return (not r.finished, rank, r.trial)

    rows.sort(key=key)
    if base is None:
        report.notes.append(
            "no unpruned baseline in this sweep (sweep.baseline: false and no grid point with "
            "ratio 0 and unchanged epsilon), so compute is not compared with one"
        )
    stopped = [r.trial for r in rows if r.status == "stopped early"]
    if stopped:
        report.notes.append(
            f"{len(stopped)} trial(s) stopped early by ASHA (no final evaluation): "
            + ", ".join(stopped)
        )
    other = [r.trial for r in rows if r.status not in ("finished", "stopped early")]
    if other:
        report.notes.append(
            "not finished (rerun `puma-ray sweep` with the same config to restore): "
            + ", ".join(f"{r.trial} {r.status}" for r in rows if r.trial in other)
        )
