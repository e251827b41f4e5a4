"""`puma-ray evaluate CHECKPOINT`: clean accuracy, PGD-k robust accuracy and (optionally)
AutoAttack on the held-out test split, or its first `evaluation.subset` rows.

The threat model is `training.attack` (norm, epsilon). PGD uses step size 2.5·ε/k (Madry et al.
2018, arXiv:1706.06083) with a random start per restart; a sample counts as robust only if no
restart fools the model. AutoAttack (Croce & Hein 2020, arXiv:2003.01690, standard version) runs
through `torchattacks.AutoAttack` when `evaluation.autoattack` is set and torchattacks imports;
the summary records which attacks actually ran.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from puma_ray import storage
from puma_ray.attacks.pgd import pgd
from puma_ray.config import PipelineConfig
from puma_ray.data import dataset_dirs, open_dataset
from puma_ray.errors import DataError


def load_test_subset(test_uri: str, subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `subset` rows of a test shard set (all when None) as (x float [N,C,H,W] in
    [0, 1], y int64 [N]). Test splits are small (10k rows for CIFAR), so this is in memory."""
    ds = open_dataset(test_uri)
    want = ds.num_rows if subset is None else min(subset, ds.num_rows)
    xs, ys, have = [], [], 0
    for b in ds.iter_batches(batch_size=min(4096, max(1, want)), columns=["image", "label"]):
        xs.append(b.images)
        ys.append(b.labels)
        have += len(b)
        if have >= want:
            break
    if have == 0:
        raise DataError(f"{test_uri}: the test split is empty")
    images = np.concatenate(xs)[:want]
    labels = np.concatenate(ys)[:want]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def robust_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 20,
    restarts: int = 1,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[float, float]:
    """(clean accuracy, PGD-`steps` robust accuracy) of `model` (put in eval mode) on x, y.

    x: [N, C, H, W] in [0, 1]; eps in [0, 1] pixel units. Robust accuracy counts a sample only
    when it is classified correctly and no restart finds an adversarial example, so it is never
    above clean accuracy. Row i's random start in restart r comes from (seed, i, r) alone, so
    the same model gives the same number whatever the batch size or what ran before."""
    model.eval()
    clean = robust = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        clean += int(ok.sum())
        still = ok.clone()
        for r in range(restarts):
            idx = still.nonzero().flatten()
            if len(idx) == 0:
                break
            rows = (idx.cpu() + i).to(torch.int64)
            adv = pgd(
                model,
                xb[idx],
                yb[idx],
                eps,
                norm=norm,
                steps=steps,
                step_ratio=2.5 / steps,
                row_seeds=(seed * 1_000_003 + rows) * 64 + r,
            )
            with torch.no_grad():
                still[idx] = model(adv).argmax(1) == yb[idx]
        robust += int(still.sum())
    n = max(1, len(x))
    return clean / n, robust / n


def autoattack_accuracy(model, x, y, eps: float, *, norm: str, num_classes: int, batch_size: int):
    """AutoAttack (standard) robust accuracy via torchattacks; raises ImportError without it."""
    import torchattacks

    attack = torchattacks.AutoAttack(
        model,
        norm="Linf" if norm == "linf" else "L2",
        eps=eps,
        version="standard",
        n_classes=num_classes,
    )
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = attack(xb, yb)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == yb).sum())
    return correct / max(1, len(x))


@dataclass
class EvalSummary:
    checkpoint: str
    rows: int
    norm: str
    epsilon: float
    pgd_steps: int
    pgd_restarts: int
    clean_acc: float
    pgd_acc: float
    autoattack_acc: float | None = None
    attacks_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    mlflow_run_id: str | None = None

    @property
    def robust_acc(self) -> float:
        """The strongest attack that ran."""
        return self.autoattack_acc if self.autoattack_acc is not None else self.pgd_acc

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "robust_acc": self.robust_acc}

    def format(self) -> str:
        eps = f"{self.epsilon * 255:.2f}/255" if self.norm == "linf" else f"{self.epsilon:.3f}"
        lines = [
            f"evaluate {self.checkpoint}",
            f"  {self.rows} test rows, threat model {self.norm} eps={eps}",
            f"  {'attack':<24}{'accuracy':>10}",
            f"  {'clean':<24}{self.clean_acc:>10.4f}",
            f"  {f'PGD-{self.pgd_steps} x{self.pgd_restarts}':<24}{self.pgd_acc:>10.4f}",
        ]
        if self.autoattack_acc is not None:
            lines.append(f"  {'AutoAttack (standard)':<24}{self.autoattack_acc:>10.4f}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  {self.wall_s:.1f} s")
        return "\n".join(lines)


def run_evaluate(
    cfg: PipelineConfig,
    run_dir: str,
    checkpoint: str,
    *,
    name: str = "evaluate",
    mlflow_parent_run_id: str | None = None,
    log=print,
) -> EvalSummary:
    """Evaluate `checkpoint` on `<run_dir>/data/test`; writes `<run_dir>/<name>/summary.json`
    and logs the accuracies to MLflow (child of `mlflow_parent_run_id` when given)."""
    from puma_ray import tracking
    from puma_ray.models import check_compatible, load_checkpoint

    start = time.perf_counter()
    ev, attack = cfg.evaluation, cfg.training.attack
    model, meta = load_checkpoint(checkpoint)
    _, test_uri = dataset_dirs(run_dir)
    # as score does: a model for other classes or image sizes would print meaningless accuracies
    info = open_dataset(test_uri).info
    check_compatible(meta, info.num_classes, tuple(info.image_shape))
    x, y = load_test_subset(test_uri, ev.subset)
    clean, robust = robust_accuracy(
        model,
        x,
        y,
        attack.epsilon,
        norm=attack.norm,
        steps=ev.pgd_steps,
        restarts=ev.pgd_restarts,
        batch_size=ev.batch_size,
        seed=cfg.seed,
    )
    summary = EvalSummary(
        checkpoint=str(checkpoint),
        rows=len(x),
        norm=attack.norm,
        epsilon=attack.epsilon,
        pgd_steps=ev.pgd_steps,
        pgd_restarts=ev.pgd_restarts,
        clean_acc=clean,
        pgd_acc=robust,
        attacks_run=["clean", f"pgd-{ev.pgd_steps}"],
    )
    if ev.autoattack:
        try:
            summary.autoattack_acc = autoattack_accuracy(
                model,
                x,
                y,
                attack.epsilon,
                norm=attack.norm,
                num_classes=meta["num_classes"],
                batch_size=ev.batch_size,
            )
            summary.attacks_run.append("autoattack-standard (torchattacks)")
        except ImportError:
            summary.notes.append("AutoAttack skipped: torchattacks is not installed (eval extra)")
    summary.wall_s = time.perf_counter() - start
    run = tracking.start_run(
        cfg.tracking,
        run_dir,
        run_name=name,
        parent_run_id=mlflow_parent_run_id,
        params={
            "checkpoint": str(checkpoint),
            "evaluation": ev.model_dump(mode="json"),
            "attack": attack.model_dump(mode="json"),
        },
        log=log,
    )
    if run is not None:
        summary.mlflow_run_id = run.run_id
        metrics = {"clean_acc": clean, "pgd_acc": robust, "robust_acc": summary.robust_acc}
        if summary.autoattack_acc is not None:
            metrics["autoattack_acc"] = summary.autoattack_acc
        tracking.safe(run.log_metrics, metrics, 0, log=log)
        tracking.safe(run.finish, log=log)
    out = storage.join(run_dir, name, "summary.json")
    storage.makedirs(storage.join(run_dir, name))
    storage.atomic_write_bytes(out, json.dumps(summary.to_dict(), indent=1).encode())
    log(summary.format())
    return summary
