"""What a prune reports: `PruneSummary` (and its table), the one-line description of the
selection, the per-group sizes and cut keys of the manifest, the threshold lines, and the
kept-vs-pruned margin histogram `margin_hist.png`."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from puma_ray import selection, storage
from puma_ray.config import PipelineConfig
from puma_ray.prune.shards import HIST_EDGES, HIST_SIDE, SOURCES
from puma_ray.selection import SelectionParams


@dataclass
class PruneSummary:
    out_dir: str
    strategy: str
    description: str
    rows: int
    kept: int
    pruned: int
    eps_adjusted: int
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    thresholds: list[str] = field(default_factory=list)
    eps_base: float = 0.0
    eps_min: float | None = None
    eps_mean: float | None = None
    mode: str = ""
    passes: int = 0
    shards: int = 0
    wall_s: float = 0.0
    extrapolation: dict | None = None
    policies: dict | None = None  # counts of misclassified / non-converged rows and treatment
    skipped_stage: bool = False

    def format(self) -> str:
        if self.skipped_stage:
            return (
                f"prune: up to date ({self.kept} of {self.rows} rows kept in {self.out_dir}); "
                "nothing to do"
            )
        lines = [f"prune: {self.description} -> {self.out_dir}"]
        lines.append(f"  {'source':<12}{'rows':>10}{'kept':>10}{'pruned':>10}{'eps-adjusted':>14}")
        for src, c in self.per_source.items():
            lines.append(
                f"  {src:<12}{c['rows']:>10,}{c['kept']:>10,}{c['pruned']:>10,}"
                f"{c['eps_adjusted']:>14,}"
            )
        lines.append(
            f"  {'total':<12}{self.rows:>10,}{self.kept:>10,}{self.pruned:>10,}"
            f"{self.eps_adjusted:>14,}"
        )
        lines += [f"  {t}" for t in self.thresholds]
        if self.eps_min is not None:
            lines.append(
                f"  eps: base {self.eps_base:.5f}, min {self.eps_min:.5f}, mean "
                f"{self.eps_mean:.5f} over kept rows"
            )
        lines += [f"  {t}" for t in _policy_lines(self.policies)]
        if self.extrapolation:
            lines += [f"  {t}" for t in _extrapolation_lines(self.extrapolation)]
        lines.append(
            f"  selection: {self.passes} pass{'es' if self.passes != 1 else ''} over "
            f"{self.shards} shards ({self.mode}) + write; "
            f"{self.wall_s:.1f}s"
        )
        return "\n".join(lines)


def _policy_lines(policies: dict | None) -> list[str]:
    """One line per row flag: how many rows have it, how the policy treated the in-scope ones
    and what became of them."""
    if not policies:
        return []
    lines = []
    for flag, title in (("misclassified", "misclassified"), ("nonconverged", "non-converged")):
        p = policies.get(flag)
        if not p or not p["rows"]:
            continue
        moved = {k: v for k, v in p["treated"].items() if v and k != "ranked"}
        how = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in moved.items())
        how = f" ({how})" if how else ""
        o = p["outcome"]
        lines.append(
            f"{title}: {p['rows']:,} rows, {p['in_scope']:,} in scope; {p['policy']}{how}: "
            f"{o['pruned']:,} pruned, {o['eps_adjusted']:,} eps-adjusted, "
            f"{o['kept_base_eps']:,} at base eps"
        )
    return lines


def _extrapolation_lines(e: dict) -> list[str]:
    line = (
        f"extrapolated: {e['scored_rows']:,} of {e['rows']:,} rows DeepFool-scored "
        f"({100 * e['scoring_compute_saved']:.0f}% of scoring compute saved), k={e['k']}"
        + (", same class" if e.get("same_class") else "")
        + {
            "estimate": ", every row ranked by its estimate",
            "exact": ", scored rows ranked by their exact margin",
        }.get(e.get("rank_scored"), "")
    )
    lines = [line + (f", check MAE {e['check_mae']:.4f}" if e.get("check_mae") is not None else "")]
    h = e.get("holdout")
    if h and h.get("rows"):
        rho = "n/a" if h["spearman"] is None else f"{h['spearman']:.3f}"
        lines.append(
            f"extrapolation check on {h['rows']:,} held-out scored rows: Spearman {rho}, "
            f"MAE {h['mae']:.4g}"
        )
    return lines


def _describe(params: SelectionParams, cfg: PipelineConfig) -> str:
    p = cfg.pruning
    name = params.strategy
    if p.strategy == "extrapolated":
        name = f"extrapolated/{params.strategy}"
    if params.strategy == "none":
        return f"{name} (every row kept)"
    parts = [
        f"ratio {params.ratio:g}",
        f"scope {params.scope}",
        "per class" if params.per_class else "global",
    ]
    if params.strategy == "random":
        parts.append(f"seed {params.seed}")
    if params.eps_rule == "scale_lowest":
        parts.append(f"eps x{params.eps_scale:g} for the lowest {params.eps_quantile:g} of kept")
    elif params.eps_rule == "margin_cap":
        parts.append(f"eps = max({params.eps_floor:g}, min(eps, {params.eps_alpha:g} x margin))")
    if params.order == "margin":
        parts.append(f"misclassified {params.misclassified}, non-converged {params.nonconverged}")
    return f"{name} ({', '.join(parts)})"


def _group_report(plans, cuts, counts, params: SelectionParams, class_names) -> list[dict]:
    """Per selection group: sizes and the cut keys (null where a cut is at an end)."""
    in_scope = [1] if params.scope == "synthetic" else [0, 1]
    out = []
    for g, plan in sorted(plans.items()):
        c = counts[g] if params.per_class else counts.sum(axis=0)
        c = c[in_scope].sum(axis=0)
        described = {}
        for name, key in cuts[g].items():
            if 0 < key < selection.KEY_END:
                described[name] = selection.describe_key(key, params.order)
        out.append(
            {
                "group": f"class {g} ({class_names[g]})" if params.per_class else "all",
                "rows": plan.in_scope,
                "kept": plan.kept,
                "pruned": plan.pruned,
                "eps_adjusted": int(c[1]),
                # rows the policies took out of the order (they count in `rows`)
                "forced": {"kept_base_eps": plan.base, "dropped": plan.drop},
                "ranks": {
                    "ranked_rows": plan.rows,
                    "keep_from": plan.keep_from,
                    "keep_until": plan.keep_until,
                    **{f"eps_{q}": r for q, r in plan.eps_ranks.items()},
                },
                "cuts": described,
            }
        )
    return out


def _threshold_lines(groups: list[dict], params: SelectionParams) -> list[str]:
    if params.order != "margin":
        return []

    def span(name: str) -> str | None:
        ms = [g["cuts"][name]["margin"] for g in groups if name in g["cuts"]]
        if not ms:
            return None
        lo, hi = min(ms), max(ms)
        text = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
        text += f" over {len(ms)} groups" if len(ms) > 1 else ""
        # a cut among the non-converged rows a policy moved: the margin is one of theirs
        tiered = [g["cuts"][name]["tier"] for g in groups if "tier" in g["cuts"].get(name, {})]
        if tiered:
            text += f" ({len(tiered)} of them within the {'/'.join(sorted(set(tiered)))} tier)"
        return text

    lines = []
    if s := span("keep_until"):
        lines.append(f"pruned: rows at or above the cut (margin, id); cut margin {s}")
    if s := span("keep_from"):
        lines.append(f"pruned: rows below the cut (margin, id); cut margin {s}")
    for q in selection.EPS_RULES[params.eps_rule].quantiles(params):
        if s := span(f"eps_{q}"):
            lines.append(f"eps x{params.eps_scale:g}: kept rows below the cut; cut margin {s}")
    return lines


def _plot_hist(uri: str, hist: np.ndarray, title: str) -> None:
    """Kept vs pruned margin histograms, one panel per source, log-spaced bins. Margins in
    [0, 1e-4) (mostly exact zeros: rows the margin model misclassifies, unsigned) are counted
    in the legend. Signed scores put those rows below 0: if any are, the axis is symlog with
    the negative bins mirrored left of 0 and their count in the legend too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = HIST_SIDE
    edges = HIST_EDGES[-side - 1 :]
    centers = np.sqrt(edges[:-1] * edges[1:])
    signed = bool(hist[..., : side + 1].any())
    fig, axes = plt.subplots(1, len(SOURCES), figsize=(11, 3.8), squeeze=False)
    for s, src in enumerate(SOURCES):
        ax = axes[0, s]
        for k, (label, color) in enumerate((("kept", "tab:blue"), ("pruned", "tab:red"))):
            h = hist[s, k]
            counts = f"{h.sum():,}; {h[side + 1]:,} in [0, 1e-4)"
            if signed:
                counts += f"; {h[: side + 1].sum():,} below 0"
            ax.step(centers, h[-side:], where="mid", color=color, label=f"{label} ({counts})")
            if signed:
                ax.step(-centers[::-1], h[:side], where="mid", color=color)
        if signed:
            ax.set_xscale("symlog", linthresh=1e-4, linscale=0.1)
            ax.set_xticks([-1e2, -1.0, -1e-2, 0.0, 1e-2, 1.0, 1e2])  # every decade crowds
            ax.axvline(0.0, color="0.6", linewidth=0.6)
        else:
            ax.set_xscale("log")
        ax.set_xlabel("DeepFool margin" + (" (signed)" if signed else ""))
        ax.set_ylabel("rows")
        ax.set_title(src)
        ax.minorticks_off()  # minor log ticks dominate the drawing time
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.atomic_write_bytes(uri, buf.getvalue())
