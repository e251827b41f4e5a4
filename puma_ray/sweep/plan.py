"""The sweep's plan: `sweep.space` expanded into Tune's grid points and sampled dimensions, and
every grid point checked as a trial would check it, all before Ray starts. Also what one trial's
Tune config means (`trial_values`) and how it is labelled, shared by the trial and the driver.

A grid point maps each grid key to its value and each `settings` dimension to its chosen
setting, kept whole (`{"method": {"name": "puma_cap", "pruning.strategy": "puma", ...}}`): the
Tune config then carries the setting's name and values, so a restored trial needs nothing but
its own config, and `apply_values` sets the setting's keys."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from puma_ray.config import PipelineConfig, SearchDim
from puma_ray.errors import ConfigError, PumaRayError
from puma_ray.stages import recipe_dump

# the auto-added reference: every sample kept, every sample at the full training epsilon
BASELINE_VALUES = {"pruning.strategy": "none", "pruning.ratio": 0.0, "pruning.eps_rule": "none"}
# keys that decide whether a trial drops samples or changes any epsilon
_PRUNING_SHAPE = {
    "pruning.ratio",
    "pruning.strategy",
    "pruning.eps_rule",
    "pruning.eps_scale",
    "pruning.eps_quantile",
    "pruning.eps_alpha",
    "pruning.misclassified",
    "pruning.nonconverged",
}
_SEEDS = ("pruning.seed", "training.seed")


class SweepError(PumaRayError):
    """A sweep cannot run as configured (e.g. one trial needs more than the machine has)."""


def config_values(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of a point or a trial's values: each setting (a mapping under its
    dimension's name) contributes its own keys, its name none."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({k: v for k, v in value.items() if k != "name"})
        else:
            out[key] = value
    return out


def apply_values(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """A copy of `cfg` with each dotted key ("pruning.ratio") set, a setting's keys too
    (`config_values`); assignment re-validates."""
    out = cfg.model_copy(deep=True)
    for key, value in config_values(values).items():
        section, name = key.split(".", 1)
        setattr(getattr(out, section), name, value)
    return out


def _eps_rule(cfg: PipelineConfig) -> str:
    """The epsilon rule a trial applies: its `pruning.eps_rule` under puma, else none (as
    `selection.SelectionParams.from_config` decides)."""
    p = cfg.pruning
    strategy = p.extrapolation.base_strategy if p.strategy == "extrapolated" else p.strategy
    return p.eps_rule if strategy == "puma" else "none"


def is_unpruned(cfg: PipelineConfig) -> bool:
    """True when `cfg.pruning` keeps every sample at the base epsilon (the compute reference)."""
    p = cfg.pruning
    # `misclassified: drop` drops rows even at ratio 0 (random and none ignore the policies)
    drops_misclassified = p.misclassified == "drop" and p.strategy not in ("random", "none")
    keeps_all = p.strategy == "none" or (p.ratio == 0 and not drops_misclassified)
    rule = _eps_rule(cfg)
    same_eps = rule == "none" or (
        rule == "scale_lowest" and (p.eps_scale == 1 or p.eps_quantile == 0)
    )
    return keeps_all and same_eps


@dataclass
class SweepPlan:
    """Grid points (each a dict of dotted key -> value; `{"baseline": True}` for the added
    unpruned trial) crossed by Tune with the sampled dimensions, `num_samples` times."""

    points: list[dict[str, Any]]
    sampled: dict[str, SearchDim]
    swept: list[str]
    num_samples: int
    baseline_added: bool
    baseline_in_grid: bool
    setting_keys: list[str] = field(default_factory=list)  # the keys settings dimensions set

    @property
    def trials(self) -> int:
        return len(self.points) * self.num_samples


def _check_trial(cfg: PipelineConfig, values: dict[str, Any]) -> None:
    """Combinations the schema cannot see field by field (prune.run_prune checks them too,
    but only once a trial runs)."""
    from puma_ray import selection

    rule = selection.EPS_RULES[_eps_rule(cfg)]
    if rule.compares_margin_with_eps and cfg.scoring.norm != cfg.training.attack.norm:
        raise ConfigError(
            f"sweep.space: {_describe(values)}: pruning.eps_rule={cfg.pruning.eps_rule} compares "
            f"margins with the training epsilon, so scoring.norm ({cfg.scoring.norm}) must "
            f"equal training.attack.norm ({cfg.training.attack.norm})"
        )


def plan_sweep(cfg: PipelineConfig) -> SweepPlan:
    """Expand and check the search space; raise ConfigError (one line naming the key) for
    anything a trial would refuse. Needs no Ray, so a bad space fails before Ray starts."""
    s = cfg.sweep
    if not cfg.data.has_validation:
        raise ConfigError(
            "data.validation: 0 and no source has `split: val`, but a sweep chooses its best "
            "trial (and ASHA stops trials) on the validation split; set data.validation"
        )
    if not s.space:
        raise ConfigError("sweep.space: empty (give at least one key, e.g. pruning.ratio)")
    # grids and settings dimensions are crossed (a setting is one value of its dimension)
    grid_keys = [k for k, d in s.space.items() if d.kind in ("grid", "settings")]
    sampled = {k: d for k, d in s.space.items() if k not in grid_keys}
    points = [
        dict(zip(grid_keys, combo, strict=True))
        for combo in itertools.product(*(s.space[k].values() for k in grid_keys))
    ]
    unpruned_points = 0
    for point in points:
        try:
            trial_cfg = apply_values(cfg, point)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            msg = str(e).splitlines()
            raise ConfigError(f"sweep.space: {_describe(point)}: {' '.join(msg[:3])}") from None
        _check_trial(trial_cfg, point)
        unpruned_points += is_unpruned(trial_cfg)
    _refuse_repeated_unpruned(cfg, points)
    if s.asha and cfg.ray.num_workers == 0:
        raise ConfigError(
            "sweep.asha: needs ray.num_workers >= 1 (per-epoch results reach Tune through "
            "Ray Train's reports; in-process training has none)"
        )
    # a grid point only counts as the reference when no sampled value can change its pruning
    in_grid = unpruned_points > 0 and not (sampled.keys() & _PRUNING_SHAPE)
    added = s.baseline and not in_grid
    if added:
        points.append({"baseline": True})
    swept, num_samples = list(s.space), s.num_samples
    if num_samples > 1 and not sampled:
        # repeats of a grid are replicates: repeat r trains with training.seed + r (and draws a
        # random subset with pruning.seed + r) where the space does not set those seeds itself,
        # so the report can put a mean and an interval on every point
        seeds = [k for k in _SEEDS if k not in s.space]
        base = {"training.seed": cfg.training.seed, "pruning.seed": cfg.pruning.seed}
        points = [
            {**p, **{k: base[k] + r for k in seeds}} for r in range(num_samples) for p in points
        ]
        swept += seeds
        num_samples = 1
    setting_keys = dict.fromkeys(
        k for d in s.space.values() for setting in d.settings or [] for k in setting if k != "name"
    )
    return SweepPlan(
        points=points,
        sampled=sampled,
        swept=swept,
        num_samples=num_samples,
        baseline_added=added,
        baseline_in_grid=in_grid,
        setting_keys=list(setting_keys),
    )


def _refuse_repeated_unpruned(cfg: PipelineConfig, points: list[dict[str, Any]]) -> None:
    """A setting that keeps every sample at the base epsilon (`{pruning.strategy: none}`) is
    one trial whatever the pruning grids cross it with: refused when that would run it twice
    (same seeds), with the way to run it once."""
    s = cfg.sweep
    seen: set[tuple] = set()
    for point in points:
        dims = [k for k, v in point.items() if isinstance(v, dict)]
        if not dims or not is_unpruned(apply_values(cfg, point)):
            continue
        same = tuple((k, v["name"] if k in dims else v) for k, v in point.items())
        same = tuple((k, v) for k, v in same if k in dims or k not in _PRUNING_SHAPE)
        if same in seen:
            dim = dims[0]
            index = s.space[dim].settings.index(point[dim])
            crossed = [k for k in point if k in _PRUNING_SHAPE and len(s.space[k].values()) > 1]
            raise ConfigError(
                f"sweep.space.{dim}.settings[{index}]: {point[dim]['name']} keeps every sample "
                f"at the base epsilon, so crossed with {', '.join(crossed)} it is the same "
                "unpruned trial more than once; leave it out (sweep.baseline: true adds that "
                "trial once per repeat, the report's compute reference)"
            )
        seen.add(same)


def sweep_fingerprint(cfg: PipelineConfig) -> str:
    """What the sweep's results depend on: the config without resources and tracking, so a
    restore may change ray.* or concurrency but a changed search space starts a new sweep."""
    d = _fingerprint_dump(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _fingerprint_dump(cfg: PipelineConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    d["training"] = recipe_dump(d["training"])  # as before training.init_from existed
    d["margin_model"]["train"] = recipe_dump(d["margin_model"]["train"])
    for key in ("ray", "tracking"):
        d.pop(key)
    for key in ("max_concurrent_trials", "trial_cpus", "trial_max_failures"):
        d["sweep"].pop(key)
    for dim in d["sweep"]["space"].values():  # as before settings dimensions existed
        if dim.get("settings") is None:
            dim.pop("settings", None)
    return d


def _short(key: str) -> str:
    if "." not in key:  # a settings dimension's name
        return key
    section, name = key.split(".", 1)
    return name if section == "pruning" else f"{section}_{name}"


def _describe(values: dict[str, Any]) -> str:
    """`ratio=0.3 eps_scale=0.5`; a setting shows its name (`method=puma_cap ratio=0.3`)."""
    if values.get("baseline"):
        return "unpruned baseline"
    parts = []
    for k, v in values.items():
        if isinstance(v, dict):
            v = v["name"]
        parts.append(f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}")
    return " ".join(parts)


def trial_values(config: dict, plan_swept: list[str]) -> tuple[dict[str, Any], bool]:
    """(swept key -> value, is the added baseline) of one trial's Tune config; a settings
    dimension maps to its setting ({"name": ..., key: value}, see `config_values`). The added
    baseline takes only sampled seeds from the space (replicates), nothing that prunes."""
    point = dict(config["point"])
    sampled = dict(config.get("sampled", {}))
    if point.pop("baseline", False):
        seeds = {k: v for k, v in {**point, **sampled}.items() if k in _SEEDS}
        return {**BASELINE_VALUES, **seeds}, True
    values = {**point, **sampled}
    return {k: values[k] for k in plan_swept if k in values}, False
