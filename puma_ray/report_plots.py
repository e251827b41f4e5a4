"""The four plots of a sweep report (matplotlib, Agg: no display needed); what each shows is
in `puma_ray.report`'s docstring and docs/sweeps.md."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from puma_ray.report import TrialRow, _short

if TYPE_CHECKING:
    from puma_ray.report import SweepReport


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tag(r: TrialRow) -> str:
    if r.added_baseline:
        return "unpruned"
    parts = [f"{_short(k)} {v}" for k, v in r.values.items() if v != "—"]
    return ", ".join(parts) or r.trial


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig, path: str) -> None:
    fig.savefig(path, format="png", dpi=100)
    _plt().close(fig)


def plot_all(report: SweepReport, out: str) -> None:
    _plot_pareto(report, os.path.join(out, "pareto.png"))
    _plot_ratio(report, os.path.join(out, "robust_vs_ratio.png"))
    _plot_compute(report, os.path.join(out, "compute.png"))
    _plot_curves(report, os.path.join(out, "curves.png"))


def _plot_pareto(report: SweepReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    done = [r for r in report.rows if r.finished]
    if not done:
        _empty(ax, "no finished trials yet")
    rest = [r for r in done if not r.pareto]
    ax.scatter(
        [r.clean_acc for r in rest], [r.robust_acc for r in rest], color="tab:gray", label="trial"
    )
    front = sorted((r for r in done if r.pareto), key=lambda r: r.clean_acc)
    if front:
        ax.plot(
            [r.clean_acc for r in front],
            [r.robust_acc for r in front],
            "-o",
            color="tab:red",
            label="Pareto front",
        )
    for r in done:
        if r.baseline:  # a red edge when the baseline is on the front itself
            ax.scatter(
                r.clean_acc,
                r.robust_acc,
                marker="*",
                s=260,
                color="black",
                edgecolors="tab:red" if r.pareto else "black",
                linewidths=1.5,
                zorder=5,
                label="unpruned baseline",
            )
        ax.annotate(
            _tag(r),
            (r.clean_acc, r.robust_acc),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
        )
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    ax.set_xlabel("test clean accuracy")
    ax.set_ylabel(f"test robust accuracy ({report.attack})")
    ax.set_title(f"Clean vs robust accuracy per trial — {report.sweep}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _plot_ratio(report: SweepReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    # one line per setting of every swept key but the ratio and the seeds (replicates)
    group_keys = [k for k in report.swept if k != "pruning.ratio" and not k.endswith(".seed")]
    groups: dict[str, dict[float, list[float]]] = {}
    for r in report.rows:
        if not r.finished or r.added_baseline or r.ratio is None:
            continue
        name = ", ".join(f"{_short(k)}={r.values.get(k, '—')}" for k in group_keys) or "trials"
        groups.setdefault(name, {}).setdefault(r.ratio, []).append(r.robust_acc)
    for name, by_ratio in sorted(groups.items()):
        xs = sorted(by_ratio)
        ys = [sum(by_ratio[x]) / len(by_ratio[x]) for x in xs]
        lo = [y - min(by_ratio[x]) for x, y in zip(xs, ys, strict=True)]
        hi = [max(by_ratio[x]) - y for x, y in zip(xs, ys, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    base = [r.robust_acc for r in report.rows if r.baseline and r.finished]
    if base:
        ax.axhline(sum(base) / len(base), color="black", ls="--", lw=1, label="unpruned baseline")
    if not groups and not base:
        _empty(ax, "no finished trials yet")
    if groups or base:
        ax.legend(fontsize=8, title=None)
    ax.set_xlabel("prune ratio (fraction of in-scope samples dropped)")
    ax.set_ylabel(f"test robust accuracy ({report.attack})")
    ax.set_title("Robust accuracy vs prune ratio", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _plot_compute(report: SweepReport, path: str) -> None:
    plt = _plt()
    rows = [r for r in report.rows if r.device_seconds is not None]
    rows.sort(key=lambda r: r.device_seconds)
    fig, ax = plt.subplots(figsize=(6.4, 1.6 + 0.32 * max(1, len(rows))))
    colors = ["black" if r.baseline else ("tab:red" if r.pareto else "tab:blue") for r in rows]
    bars = ax.barh(
        [f"{r.trial} ({_tag(r)})" for r in rows],
        [r.device_seconds for r in rows],
        color=colors,
        hatch=None,
    )
    for bar, r in zip(bars, rows, strict=True):
        if r.status == "stopped early":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
        if r.vs_baseline is not None:
            ax.annotate(
                f"{100 * r.vs_baseline:.0f}%",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    base = report.baseline_device_s
    title = "Training compute per trial (device-seconds, all workers)"
    if base is not None:
        ax.axvline(base, color="black", ls="--", lw=1)
        title += "\n% = share of the unpruned baseline (black); red = Pareto front"
    else:
        title += "\n(no unpruned baseline in this sweep)"
    if not rows:
        _empty(ax, "no trial has reported training compute yet")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("device-seconds")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    _save(fig, path)


def _plot_curves(report: SweepReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for r in sorted(report.rows, key=lambda r: r.trial):
        if not r.curve:
            continue
        xs, ys = zip(*r.curve, strict=True)
        style = "--" if r.baseline else "-"
        ax.plot(xs, ys, style, marker="o", ms=3, label=f"{r.trial} ({_tag(r)})")
        drawn += 1
    if not drawn:
        _empty(ax, "no per-epoch results yet")
    else:
        ax.legend(fontsize=7, ncol=2 if drawn > 6 else 1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("robust accuracy, per-epoch validation subset")
    ax.set_title("Per-epoch robust accuracy (what ASHA compares)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
