"""What one evaluation measured (`EvalSummary`): accuracies on one split with their 95% Wilson
intervals, the AutoAttack stages, and how they are printed, logged to MLflow and saved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from puma_ray.attacks.autoattack import STAGE_LABELS, AutoAttackResult
from puma_ray.stats import Interval, wilson_interval


def autoattack_stages(result: AutoAttackResult) -> dict[str, float]:
    """{stage: robust accuracy after it} of an AutoAttack result, in the order they ran."""
    acc = result.accuracies()
    return {name: acc[name] for name in result.attacks}


@dataclass
class EvalSummary:
    checkpoint: str
    split: str  # test | val
    rows: int
    norm: str
    epsilon: float
    pgd_steps: int
    pgd_restarts: int
    clean_acc: float
    pgd_acc: float
    autoattack_acc: float | None = None
    autoattack_version: str | None = None
    # robust accuracy after each AutoAttack stage, in the order they ran (as the reference logs)
    autoattack_stages: dict[str, float] = field(default_factory=dict)
    attacks_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    mlflow_run_id: str | None = None
    chunks: dict = field(default_factory=dict)  # {"run": chunks run now, "kept": from before}

    @property
    def robust_acc(self) -> float:
        """The strongest attack that ran."""
        return self.autoattack_acc if self.autoattack_acc is not None else self.pgd_acc

    def interval(self, accuracy: float) -> Interval:
        """The 95% Wilson interval of an accuracy measured on these rows."""
        return wilson_interval(round(accuracy * self.rows), self.rows)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics, named by split: `test/robust_acc`, `test/robust_acc_ci_low`, ..."""
        out = {"clean_acc": self.clean_acc, "pgd_acc": self.pgd_acc, "robust_acc": self.robust_acc}
        if self.autoattack_acc is not None:
            out["autoattack_acc"] = self.autoattack_acc
            out.update({f"autoattack/{k}": v for k, v in self.autoattack_stages.items()})
        for key in ("clean_acc", "robust_acc"):
            ci = self.interval(out[key])
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = ci.low, ci.high
        return {f"{self.split}/{k}": v for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "robust_acc": self.robust_acc,
            "metrics": self.metrics(),
            "intervals": {
                k: self.interval(getattr(self, k)).to_dict() for k in ("clean_acc", "robust_acc")
            },
        }

    def format(self) -> str:
        eps = f"{self.epsilon * 255:.2f}/255" if self.norm == "linf" else f"{self.epsilon:.3f}"
        lines = [
            f"evaluate {self.checkpoint}",
            f"  {self.rows} {self.split} rows, threat model {self.norm} eps={eps}",
            f"  {'attack':<24}{'accuracy':>10}  95% interval ({self.rows} rows)",
            self._line("clean", self.clean_acc),
            self._line(f"PGD-{self.pgd_steps} x{self.pgd_restarts}", self.pgd_acc),
        ]
        if self.autoattack_acc is not None:
            lines.append(f"  AutoAttack ({self.autoattack_version}), robust after each attack:")
            for stage, acc in self.autoattack_stages.items():
                lines.append(self._line(f"  {STAGE_LABELS[stage]}", acc))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  {self.wall_s:.1f} s")
        return "\n".join(lines)

    def _line(self, attack: str, accuracy: float) -> str:
        ci = self.interval(accuracy)
        return f"  {attack:<24}{accuracy:>10.4f}  [{ci.low:.3f}, {ci.high:.3f}]"
