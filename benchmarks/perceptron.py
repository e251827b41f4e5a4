"""The perceptron analysis: PUMA's argument in a linear teacher-student model, in seconds.

Maroto & Frossard (arXiv 2405.06298) explain their findings with a linear teacher-student model;
their paper could not be read here, so this model is designed from first principles:

- **Teacher** w* = e_1 in d dimensions (x ~ N(0, I) is rotation invariant, so under l2 any unit
  teacher is e_1 in some basis; under linf, which is not, it is a 1-sparse teacher). Test points
  are clean: y = sign(w*.x).
- **Synthetic pool** of n points x ~ N(0, I): a fraction `near` of them has its teacher
  coordinate redrawn uniformly in [-near_width, near_width] (ambiguous, near-boundary samples),
  then a fraction `flip` of all labels is flipped (mislabelled samples).
- **Adversarial training** of a linear student w (no bias; the teacher has none) at radius eps.
  For a linear model the worst perturbation is closed form: the adversarial margin of (x, y) is
  y w.x - eps ||w||_* (dual norm: l2 -> l2, linf -> l1), so the adversarial logistic loss is
  exact, no PGD. Each kept sample i trains at its own eps_i (from the selection); the loss is the
  mean over the kept set, minimised by a fixed budget of full-batch gradient steps from w = 0.
- **Margin model**: a student trained the same way on the whole pool (the "full" method), as in
  PUMA's pipeline; its signed margins y w_m.x / ||w_m||_* are the exact DeepFool margins of a
  linear model (negative when it misclassifies), and its prediction gives the misclassified flag.
- **Selection** by the project's own code: `puma_ray.selection.select_reference`, class = label,
  every row synthetic (scope synthetic), per class.
- **Metrics**, exact for the population (an infinite clean test set): with c = cos(w, w*),
  clean accuracy 1 - arccos(c) / pi; robust accuracy at eps
  P(c |a| + sqrt(1 - c^2) z > eps ||w||_* / ||w||_2), a, z ~ N(0, 1), by quadrature over |a|.

Two pools (`SCENARIOS`): `noisy` (10% flipped, 20% near the boundary) and `ambiguous` (the
near-boundary points only), each over n/d = 1..128; then the mechanism table (`VARIANTS`: one
change at a time, such as standard training or oracle margins, at n/d = 8 and 128), as paired
differences to random pruning. The reported run is l2; `--norm linf` works (the l1 term then
gets a subgradient) but has not been studied.

    OMP_NUM_THREADS=1 python benchmarks/perceptron.py    # ~30 s; plot docs/img/perceptron.png
    python benchmarks/perceptron.py --seeds 3 --no-plot

Prints markdown tables (robust and clean accuracy per method and pool size, mean ± 95% t
interval over seeds); docs/study.md, "1. The perceptron analysis", reads them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from puma_ray.selection import SelectionParams, select_reference
from puma_ray.stats import mean_interval, paired_difference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Config:
    """Every knob of the study; the defaults are the reported run's noisy pool."""

    d: int = 50  # input dimension
    pool_per_d: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # pool sizes n, in units of d
    seeds: int = 6
    flip: float = 0.1  # fraction of pool labels flipped (mislabelled synthetic samples)
    near: float = 0.2  # fraction of pool points with |w*.x| <= near_width (ambiguous samples)
    near_width: float = 0.1  # < eps: every near point's worst perturbation crosses the teacher
    norm: str = "l2"  # attack norm: l2 or linf
    eps: float = 0.3  # training radius, in units of the teacher margin |w*.x|
    eval_eps: float | None = None  # evaluation radius (None: eps); eps = 0 is standard training
    steps: int = 300  # full-batch gradient steps per student (the fixed training budget)
    # Step size: the logistic part's curvature lambda_max(X'X / n) / 4 is below 2 / lr for kept
    # sets of n >= d / 2 rows; the eps ||w|| part's grows as w -> 0, where GD then circles 0.
    lr: float = 1.0
    ratio: float = 0.5  # fraction of the pool each pruning method drops
    eps_scale: float = 0.5  # scale_lowest: eps * eps_scale ...
    eps_quantile: float = 0.1  # ... on this fraction of the kept rows, the lowest margins
    eps_alpha: float = 1.0  # margin_cap: eps_i = max(eps_floor, min(eps, eps_alpha * margin_i))
    eps_floor: float = 0.0
    margin_model: str = "student"  # student (trained on the pool) | teacher (oracle margins)

    @property
    def radius(self) -> float:
        """The evaluation radius."""
        return self.eps if self.eval_eps is None else self.eval_eps


# name -> SelectionParams fields (besides ratio, eps and the rule parameters from Config)
METHODS: dict[str, dict] = {
    "full": {"strategy": "none"},
    "random": {"strategy": "random"},
    "low_margin": {"strategy": "low_margin"},
    "high_margin": {"strategy": "high_margin"},
    "high_margin+drop": {"strategy": "high_margin", "misclassified": "drop"},
    **{
        f"puma:{rule}:{policy}": {"strategy": "puma", "eps_rule": rule, "misclassified": policy}
        for rule in ("scale_lowest", "margin_cap")
        for policy in ("eps_rule", "drop", "base_eps")
    },
}


@dataclass
class Pool:
    x: np.ndarray  # float64[n, d]
    y: np.ndarray  # float64[n], +-1 (the possibly flipped label)
    flipped: np.ndarray  # bool[n]
    near: np.ndarray  # bool[n]


def make_pool(rng: np.random.Generator, n: int, cfg: Config) -> Pool:
    """n synthetic points: Gaussian, a `near` fraction squeezed to the teacher's boundary, a
    `flip` fraction of labels flipped (independently of the point)."""
    x = rng.standard_normal((n, cfg.d))
    near = rng.random(n) < cfg.near
    x[near, 0] = rng.uniform(-cfg.near_width, cfg.near_width, int(near.sum()))
    y = np.where(x[:, 0] >= 0, 1.0, -1.0)
    flipped = rng.random(n) < cfg.flip
    y[flipped] *= -1
    return Pool(x, y, flipped, near)


def dual_norm(w: np.ndarray, norm: str) -> np.ndarray:
    """||w||_* per column of w[d, M]: the factor of eps in the worst-case margin loss."""
    if norm == "l2":
        return np.linalg.norm(w, axis=0)
    if norm == "linf":
        return np.abs(w).sum(axis=0)
    raise ValueError(f"unknown norm {norm!r} (l2 or linf)")


def _dual_norm_grad(w: np.ndarray, norm: str) -> np.ndarray:
    if norm == "l2":
        return w / np.maximum(np.linalg.norm(w, axis=0), 1e-12)
    return np.sign(w)  # a subgradient of ||w||_1


def train_students(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    eps: np.ndarray,
    norm: str = "l2",
    steps: int = 300,
    lr: float = 1.0,
) -> np.ndarray:
    """M linear students at once, w[d, M]: student j minimises
    sum_i weights[i, j] * log(1 + exp(-(y_i w.x_i - eps[i, j] ||w||_*))) (weights of a student
    sum to 1; 0 for rows it does not train on) by `steps` full-batch gradient steps from 0.
    The loss is convex in w (logistic is convex decreasing, the margin concave)."""
    w = np.zeros((x.shape[1], weights.shape[1]))
    for _ in range(steps):
        margin = y[:, None] * (x @ w) - eps * dual_norm(w, norm)
        s = weights * 0.5 * (1.0 - np.tanh(margin / 2))  # weight * sigmoid(-margin)
        grad = -(x.T @ (s * y[:, None])) + (s * eps).sum(axis=0) * _dual_norm_grad(w, norm)
        w -= lr * grad
    return w


def signed_margins(x: np.ndarray, y: np.ndarray, w: np.ndarray, norm: str) -> np.ndarray:
    """y w.x / ||w||_*: the signed distance (in the attack norm) from x to w's boundary, which
    is what DeepFool returns on a linear model; negative where w misclassifies."""
    return y * (x @ w) / dual_norm(w[:, None], norm)[0]


def selection_params(method: str, cfg: Config, seed: int) -> SelectionParams:
    return SelectionParams(
        ratio=cfg.ratio,
        scope="synthetic",
        per_class=True,
        seed=seed,
        eps=cfg.eps,
        eps_scale=cfg.eps_scale,
        eps_quantile=cfg.eps_quantile,
        eps_alpha=cfg.eps_alpha,
        eps_floor=cfg.eps_floor,
        **METHODS[method],
    )


def select(method: str, margins: np.ndarray, y: np.ndarray, cfg: Config, seed: int):
    """(kept bool[n], eps float64[n], 0 where dropped) of one method, by `select_reference`."""
    n = len(y)
    sel = select_reference(
        np.arange(n),
        (y > 0).astype(np.int64),  # class 1 = positive side of the teacher
        np.ones(n, bool),
        margins,
        selection_params(method, cfg, seed),
        misclassified=margins < 0,
        converged=np.ones(n, bool),  # the linear DeepFool is exact in one step
    )
    return sel.kept, np.where(sel.kept, sel.eps, 0.0).astype(np.float64)


_A = np.linspace(0.0, 10.0, 8001)  # |a| = |w*.x| grid; P(|a| > 10) ~ 1e-23
_W = 2 * np.exp(-(_A**2) / 2) / math.sqrt(2 * math.pi) * (_A[1] - _A[0])  # half-normal mass
_W[[0, -1]] /= 2  # trapezoid ends
_erfc = np.frompyfunc(math.erfc, 1, 1)


def accuracies(w: np.ndarray, eps: float, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(robust, clean) population accuracy of students w[d, M] against teacher e_1.

    With u = w / ||w||_2 and c = u_1, u.x = c a + sqrt(1 - c^2) z with a = w*.x and z
    independent N(0, 1); x is robustly correct iff y u.x > eps ||w||_* / ||w||_2, so robust
    accuracy is E_|a| Phi((c |a| - eps') / sqrt(1 - c^2)). w = 0 predicts nothing: 0 and 0."""
    l2 = np.linalg.norm(w, axis=0)
    ok = l2 > 0
    c = np.where(ok, w[0] / np.where(ok, l2, 1), 0.0).clip(-1, 1)
    s = np.sqrt(1 - c**2)
    eps_eff = eps * np.where(ok, dual_norm(w, norm) / np.where(ok, l2, 1), 0.0)
    arg = (c[:, None] * _A[None] - eps_eff[:, None]) / np.maximum(s, 1e-12)[:, None]
    phi = 0.5 * _erfc(-arg / math.sqrt(2)).astype(np.float64)
    robust = np.where(ok, phi @ _W, 0.0)
    clean = np.where(ok, 1 - np.arccos(c) / math.pi, 0.0)
    return robust, clean


def run_instance(cfg: Config, seed: int, methods=tuple(METHODS)) -> dict[str, np.ndarray]:
    """One seed: a pool of max(pool_per_d) * d points whose prefixes are the smaller pools (so a
    curve over n shares its points). Returns {"robust", "clean"}: float[len(pool_per_d),
    len(methods)]."""
    rng = np.random.default_rng([seed, 2405_06298])
    big = make_pool(rng, max(cfg.pool_per_d) * cfg.d, cfg)
    robust = np.zeros((len(cfg.pool_per_d), len(methods)))
    clean = np.zeros_like(robust)
    for k, per_d in enumerate(cfg.pool_per_d):
        n = per_d * cfg.d
        x, y = big.x[:n], big.y[:n]
        if cfg.margin_model == "teacher":
            w_m = np.eye(cfg.d)[:, :1]
        else:
            w_m = train_students(
                x, y, np.full((n, 1), 1 / n), np.full((n, 1), cfg.eps), cfg.norm, cfg.steps, cfg.lr
            )
        margins = signed_margins(x, y, w_m[:, 0], cfg.norm).astype(np.float32)
        weights, eps = [], []
        for method in methods:
            kept, e = select(method, margins, y, cfg, seed)
            weights.append(kept / kept.sum())
            eps.append(e)
        w = train_students(
            x, y, np.stack(weights, 1), np.stack(eps, 1), cfg.norm, cfg.steps, cfg.lr
        )
        robust[k], clean[k] = accuracies(w, cfg.radius, cfg.norm)
    return {"robust": robust, "clean": clean}


def run_study(cfg: Config, methods=tuple(METHODS)) -> dict[str, np.ndarray]:
    """Every seed: {"robust", "clean"}: float[seeds, len(pool_per_d), len(methods)]."""
    runs = [run_instance(cfg, seed, methods) for seed in range(cfg.seeds)]
    return {key: np.stack([r[key] for r in runs]) for key in ("robust", "clean")}


# The two pools of the main study: `noisy` has both kinds of hard synthetic samples; `ambiguous`
# only the near-boundary ones, which isolates the part of the argument about perturbations.
SCENARIOS = {"noisy": Config(), "ambiguous": Config(flip=0.0)}
# The mechanism table: each variant changes one thing of a scenario; pool sizes in units of d.
MECHANISM_SIZES = (8, 128)
MECHANISM_METHODS = (
    "full",
    "low_margin",
    "high_margin",
    "high_margin+drop",
    "puma:scale_lowest:eps_rule",
    "puma:margin_cap:eps_rule",
    "puma:margin_cap:drop",
)
VARIANTS: dict[str, tuple[str, dict]] = {
    "noisy, adversarial": ("noisy", {}),
    "noisy, standard training": ("noisy", {"eps": 0.0, "eval_eps": 0.3}),
    "noisy, oracle margins": ("noisy", {"margin_model": "teacher"}),
    "ambiguous, adversarial": ("ambiguous", {}),
    "ambiguous, standard training": ("ambiguous", {"eps": 0.0, "eval_eps": 0.3}),
    "ambiguous, scale_lowest q 0.4 x 0.1": ("ambiguous", {"eps_quantile": 0.4, "eps_scale": 0.1}),
    "clean pool, adversarial": ("noisy", {"flip": 0.0, "near": 0.0}),
}


def run_mechanism(seeds: int, d: int, norm: str) -> dict[str, dict[str, np.ndarray]]:
    """Robust accuracy of MECHANISM_METHODS and random, per variant: float[seeds, sizes, M+1]."""
    methods = ("random", *MECHANISM_METHODS)
    out = {}
    for name, (scenario, changes) in VARIANTS.items():
        cfg = replace(
            SCENARIOS[scenario], seeds=seeds, d=d, norm=norm, pool_per_d=MECHANISM_SIZES, **changes
        )
        out[name] = run_study(cfg, methods)["robust"]
    return out


def table(values: np.ndarray, cfg: Config, methods=tuple(METHODS), digits: int = 3) -> str:
    """Markdown: one row per method, one column per pool size, mean ± 95% t interval."""
    head = "| method | " + " | ".join(f"n/d={p}" for p in cfg.pool_per_d) + " |"
    rows = [head, "|---|" + "---:|" * len(cfg.pool_per_d)]
    for j, method in enumerate(methods):
        cells = [
            mean_interval(list(values[:, k, j])).format(digits) for k in range(values.shape[1])
        ]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mechanism_table(mech: dict[str, np.ndarray]) -> str:
    """Markdown: per variant and pool size, each method's robust accuracy minus random's on the
    same seed (mean ± 95% t interval of the paired differences), and random's own."""
    cols = " | ".join(MECHANISM_METHODS)
    rule = "|---|---:|" + "---:|" * (1 + len(MECHANISM_METHODS))
    rows = [f"| variant | n/d | random | {cols} |", rule]
    for name, values in mech.items():
        for k, per_d in enumerate(MECHANISM_SIZES):
            ref = list(values[:, k, 0])
            cells = [mean_interval(ref).format(3)] + [
                _signed(paired_difference(list(values[:, k, j]), ref))
                for j in range(1, values.shape[2])
            ]
            rows.append(f"| {name} | {per_d} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _signed(iv) -> str:
    return f"{iv.value:+.3f} ± {iv.half_width:.3f}"


_BASELINE_COLOURS = {
    "full": "black",
    "random": "tab:orange",
    "low_margin": "tab:green",
    "high_margin": "tab:red",
    "high_margin+drop": "tab:purple",
}
_POLICY_COLOURS = {"eps_rule": "tab:blue", "drop": "tab:cyan", "base_eps": "tab:brown"}
_RULE_STYLES = {"scale_lowest": "--", "margin_cap": "-."}


def _style(method: str) -> dict:
    """Baselines solid; PUMA coloured by misclassified policy, dashed by eps rule."""
    if method in _BASELINE_COLOURS:
        return {"color": _BASELINE_COLOURS[method], "ls": "-"}
    _, rule, policy = method.split(":")
    return {"color": _POLICY_COLOURS[policy], "ls": _RULE_STYLES[rule]}


def plot(studies: dict[str, tuple[Config, dict]], path: str, methods=tuple(METHODS)) -> None:
    """One panel per scenario: robust accuracy vs pool size per method, mean and 95% t
    interval over seeds; the teacher's robust accuracy is the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 5.5), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (name, (cfg, results)) in zip(axes, studies.items(), strict=True):
        xs = np.asarray(cfg.pool_per_d, float)
        for j, method in enumerate(methods):
            ivs = [mean_interval(list(results["robust"][:, k, j])) for k in range(len(xs))]
            style = _style(method)
            ax.plot(xs, [iv.value for iv in ivs], marker="o", ms=3, lw=1.4, label=method, **style)
            lows, highs = [iv.low for iv in ivs], [iv.high for iv in ivs]
            ax.fill_between(xs, lows, highs, color=style["color"], alpha=0.1, lw=0)
        teacher = accuracies(np.eye(cfg.d)[:, :1], cfg.radius, cfg.norm)[0][0]
        ax.axhline(teacher, color="grey", lw=0.8, ls=":", label="teacher (ceiling)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(p) for p in cfg.pool_per_d])
        ax.set_xlabel("pool size n / d")
        ax.set_title(
            f"{name}: {cfg.flip:.0%} labels flipped, {cfg.near:.0%} near the boundary\n"
            f"d = {cfg.d}, {cfg.norm} eps = {cfg.eps}, keep {1 - cfg.ratio:.0%}, "
            f"{cfg.seeds} seeds (mean, 95% t interval)",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=Config.seeds)
    ap.add_argument("--d", type=int, default=Config.d)
    ap.add_argument("--norm", choices=("l2", "linf"), default=Config.norm)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "perceptron.png"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    studies = {}
    for name, scenario in SCENARIOS.items():
        cfg = replace(scenario, seeds=args.seeds, d=args.d, norm=args.norm)
        studies[name] = (cfg, run_study(cfg))
        print(f"## {name}: {cfg}\n")
        print("Robust accuracy:\n")
        print(table(studies[name][1]["robust"], cfg))
        print("\nClean accuracy:\n")
        print(table(studies[name][1]["clean"], cfg))
        print()
    print("## Mechanism: robust accuracy minus random (paired by seed)\n")
    print(mechanism_table(run_mechanism(args.seeds, args.d, args.norm)))
    if not args.no_plot:
        plot(studies, args.out)
        print(f"\nplot: {args.out}")
    print(f"\n{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
