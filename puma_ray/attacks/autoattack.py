"""AutoAttack through the reference implementation, with the robust accuracy after each stage.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, arXiv:2003.01690. The attacks are those of the reference
code (fra31/auto-attack, on PyPI as `pyautoattack`, what RobustBench evaluates with); nothing
here re-implements them. `standard` runs APGD-CE, APGD-T, FAB-T and Square, each on the rows
every earlier attack failed on.

How the per-stage numbers are obtained without a fork: the reference's
`AutoAttack.run_standard_evaluation` keeps them in a local dict and only logs them, so each
stage runs as its own `run_standard_evaluation` with `attacks_to_run = [stage]` on the rows
still robust, using the attack objects the reference configured for the version. The batches
of a stage are then the same as in one reference call (the robust rows, in order, in chunks of
`batch_size`), every batch is seeded with `seed` as the reference seeds it, and the robust
accuracy after the last stage equals that of one `run_standard_evaluation` call on the same
rows (tests/test_autoattack.py checks it). The reference's sanity checks (randomised, dynamic
or probability-output defences) then run once per stage; they cost a few forward passes.

Reproducibility: the reference re-seeds torch's generator with `seed` before every batch, so a
row's random start depends on its position in its batch, and a stage's batches depend on which
rows earlier stages broke. Results are therefore exactly reproducible for the same rows in the
same order, batch size, seed and device, which is what lets a chunked evaluation recompute an
interrupted chunk and get the same counts; they are not invariant to how the rows are chunked
(unlike `puma_ray.evaluate.robust_accuracy`'s per-row PGD starts). The caller's torch generator
state is restored afterwards.

Memory layout: the reference builds its gradient buffers with `zeros_like(x)` and flattens them
with `.view` (its zero-gradient check), which fails on channels_last inputs ("view size is not
compatible with input tensor's size and stride"). The models here do not switch to
channels_last themselves: an input batch does (NHWC bytes permuted to NCHW without a copy), and
the gradient takes the input's layout. Inputs are made contiguous before they reach the
reference, which makes every buffer it allocates contiguous whatever the model does inside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# How the reference spells each norm.
_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
# The reference's attack objects, by the attribute name `options` uses.
_OBJECTS = ("apgd", "apgd_targeted", "fab", "square")
# Display names, as the reference logs them (`APGD-CE`, ...), for tables.
STAGE_LABELS = {
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "fab": "FAB",
    "square": "Square",
    "apgd-t": "APGD-T",
    "fab-t": "FAB-T",
}


@dataclass
class AutoAttackResult:
    """Per-row outcome of `autoattack`, indexed like its input.

    broken_at: int64 [N]: 0 where the clean prediction is already wrong, k >= 1 where
               `attacks[k - 1]` was the first attack to fool the model, -1 where none did.
    attacks:   the stages in the order they ran (the version's list, or the custom one).
    Counts rather than only accuracies, so chunks evaluated apart add up exactly (`merge`).
    """

    attacks: tuple[str, ...]
    broken_at: torch.Tensor
    version: str
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.broken_at.numel())

    @property
    def correct(self) -> torch.Tensor:
        """bool [N]: classified correctly without attack."""
        return self.broken_at != 0

    @property
    def robust(self) -> torch.Tensor:
        """bool [N]: classified correctly and not fooled by any stage."""
        return self.broken_at == -1

    def robust_counts(self) -> dict[str, int]:
        """{"clean": correct rows, stage: rows still robust after it, ...} in stage order
        (non-increasing; a stage after every row fell did not run and counts 0)."""
        b = self.broken_at
        out = {"clean": int((b != 0).sum())}
        for k, name in enumerate(self.attacks, start=1):
            out[name] = int(((b == -1) | (b > k)).sum())
        return out

    def accuracies(self) -> dict[str, float]:
        """`robust_counts` as fractions of all rows (the reference's `robust_accuracy_dict`)."""
        n = max(1, self.rows)
        return {k: v / n for k, v in self.robust_counts().items()}

    @property
    def clean_acc(self) -> float:
        return self.accuracies()["clean"]

    @property
    def robust_acc(self) -> float:
        """Robust accuracy after the last stage: the AutoAttack number."""
        return int(self.robust.sum()) / max(1, self.rows)

    @classmethod
    def merge(cls, parts: Sequence[AutoAttackResult]) -> AutoAttackResult:
        """The results of disjoint row chunks, concatenated in the given order."""
        if not parts:
            raise ValueError("merge needs at least one result")
        first = parts[0]
        if any(p.attacks != first.attacks or p.version != first.version for p in parts):
            raise ValueError("merge: the results ran different attacks")
        seconds: dict[str, float] = {}
        for p in parts:
            for k, v in p.stage_seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
        return cls(first.attacks, torch.cat([p.broken_at for p in parts]), first.version, seconds)


def attacks_of(version: str, attacks: Sequence[str] | None = None) -> tuple[str, ...]:
    """The stages a version runs, in order (the reference's `_set_version`); `custom` runs
    `attacks`. Raises ValueError on an unknown version or attack."""
    if version not in VERSIONS:
        known = ", ".join(VERSIONS)
        raise ValueError(f"AutoAttack version must be one of {known}, got {version!r}")
    if version != "custom":
        if attacks is not None:
            raise ValueError(f"AutoAttack version {version!r} takes no attack list (use custom)")
        return {
            "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
            "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
            "rand": ("apgd-ce", "apgd-dlr"),
        }[version]
    if not attacks:
        raise ValueError("AutoAttack version 'custom' needs a non-empty attack list")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown AutoAttack attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError("the AutoAttack attack list names an attack twice")
    return tuple(attacks)


def reference_autoattack(
    model: torch.nn.Module,
    eps: float,
    *,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
):
    """The reference `pyautoattack.AutoAttack`, configured for `version` (and `attacks`).

    `num_classes` caps the targeted attacks' target classes at num_classes - 1 (the reference
    uses 9 and fails on fewer classes). `options` sets attributes of the reference's attack
    objects after the version set them, e.g. `{"apgd": {"n_iter": 10}, "square": {"n_queries":
    50}}` (keys: apgd, apgd_targeted, fab, square) - for cheap checks; a changed budget is no
    longer the published AutoAttack. Raises ImportError without pyautoattack."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ImportError(
            "AutoAttack needs the reference implementation: pip install pyautoattack "
            "(the `eval` extra)"
        ) from e
    stages = attacks_of(version, attacks)
    if norm not in _NORMS:
        raise ValueError(f"AutoAttack norm must be one of {', '.join(_NORMS)}, got {norm!r}")
    aa = AutoAttack(
        model,
        norm=_NORMS[norm],
        eps=float(eps),
        version=version,
        attacks=list(stages) if version == "custom" else None,
        seed=seed,
        device=device,
    )
    if num_classes is not None:
        cap = max(1, int(num_classes) - 1)
        for obj in (aa.apgd_targeted, aa.fab):
            obj.n_target_classes = min(obj.n_target_classes, cap)
    for name, values in (options or {}).items():
        if name not in _OBJECTS:
            raise ValueError(f"unknown AutoAttack option group {name!r}; known: {_OBJECTS}")
        obj = getattr(aa, name)
        for key, value in values.items():
            if not hasattr(obj, key):
                raise ValueError(f"the reference's {name} attack has no setting {key!r}")
            setattr(obj, key, value)
    return aa


def autoattack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    device: str | torch.device = "cpu",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> AutoAttackResult:
    """AutoAttack `version` (standard | plus | rand | custom with `attacks`) on x, y with the
    reference implementation, stage by stage; see the module docstring for how and why.

    model: on `device`, put in eval mode, returns logits. x: float [N, C, H, W] in [0, 1] (any
    memory layout, any device: rows move to `device` batch by batch); y: int64 [N]. eps in
    [0, 1] pixel units, norm linf | l2 (| l1). `options` as in `reference_autoattack`. `log`
    gets one line per stage and the reference's warnings (its defence checks)."""
    model.eval()
    x = x.detach().float().contiguous()  # channels_last input breaks the reference's .view
    y = y.detach().long()
    stages = attacks_of(version, attacks)
    n = len(x)
    broken_at = torch.full((n,), -1, dtype=torch.int64)
    result = AutoAttackResult(stages, broken_at, version)
    if n == 0:
        return result
    dev = torch.device(device)
    cuda = []
    if dev.type == "cuda":
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()]
    handler = _ForwardWarnings(log)
    logger = logging.getLogger("auto-attack")
    logger.addHandler(handler)
    # the reference calls torch.random.manual_seed before every batch: keep the caller's stream
    with torch.random.fork_rng(devices=cuda):
        try:
            with torch.no_grad():
                num_classes = model(x[:1].to(dev)).shape[1]
                start = time.perf_counter()
                for i in range(0, n, batch_size):
                    pred = model(x[i : i + batch_size].to(dev)).argmax(1).cpu()
                    broken_at[i : i + batch_size][pred != y[i : i + batch_size]] = 0
                result.stage_seconds["clean"] = time.perf_counter() - start
            aa = reference_autoattack(
                model,
                eps,
                norm=norm,
                version=version,
                attacks=attacks,
                seed=seed,
                device=dev,
                num_classes=num_classes,
                options=options,
            )
            for k, name in enumerate(stages, start=1):
                idx = (broken_at == -1).nonzero().flatten()
                if len(idx) == 0:
                    break
                start = time.perf_counter()
                aa.attacks_to_run = [name]
                _, y_adv = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                broken_at[idx[y_adv.cpu() != y[idx]]] = k
                result.stage_seconds[name] = time.perf_counter() - start
                if log is not None:
                    left = int((broken_at == -1).sum())
                    log(
                        f"autoattack: after {STAGE_LABELS[name]}: {left}/{n} robust "
                        f"({left / n:.4f}) in {result.stage_seconds[name]:.1f}s"
                    )
        finally:
            logger.removeHandler(handler)
    return result


class _ForwardWarnings(logging.Handler):
    """Passes the reference's warnings (e.g. "it seems to be a randomized defense") to `log`."""

    def __init__(self, log: Callable[[str], None] | None):
        super().__init__(level=logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if self.log is not None:
            self.log(f"autoattack: warning: {record.getMessage()}")
