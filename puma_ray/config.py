"""One pydantic schema for the whole pipeline YAML.

The defaults *are* the embedded demo (builtin data, small CNN, PUMA); `tune_configs/demo.yaml`
spells them out and a test keeps the two equal. Every error names its YAML path
(`pruning.ratio: must be in [0, 1) (got 1.5)`), and `--set a.b=c` overrides go through the same
validation as the file.

Length: one module on purpose: every knob of the pipeline lives in this one schema, each with
its unit and default, so a user reads the whole configuration in one place.
"""

from __future__ import annotations

import copy
import os
import sys
from fractions import Fraction
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from puma_ray.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Value types with messages a user can act on.


def _in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    text = f"must be in {left}{_fmt(lo)}, {_fmt(hi)}{right}"

    def check(v: float) -> float:
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            raise ValueError(f"{text} (got {v})")
        return v

    return AfterValidator(check)


def _positive(v: float) -> float:
    if not v > 0:
        raise ValueError(f"must be > 0 (got {v})")
    return v


def _non_negative(v: float) -> float:
    if v < 0:
        raise ValueError(f"must be >= 0 (got {v})")
    return v


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _parse_number(v: Any) -> Any:
    """Accept '8/255' for epsilons, as papers write them."""
    if isinstance(v, str) and "/" in v:
        try:
            return float(Fraction(v.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like 8/255 (got {v!r})") from None
    return v


Number = Annotated[float, BeforeValidator(_parse_number)]
Fraction01 = Annotated[float, _in_range(0, 1)]  # [0, 1]
FractionOpen = Annotated[float, _in_range(0, 1, hi_open=True)]  # [0, 1)
PositiveFloat = Annotated[Number, AfterValidator(_positive)]
NonNegFloat = Annotated[Number, AfterValidator(_non_negative)]
PositiveInt = Annotated[int, AfterValidator(_positive)]
NonNegInt = Annotated[int, AfterValidator(_non_negative)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Data sources. Ids are `id_offset + row index within the source`; the default offset is the
# source's position in the list times 2**40, so ids stay stable as long as the list does.

ID_BLOCK = 2**40


class BuiltinSource(Strict):
    """Procedural 10-class 32x32x3 images, deterministic from (seed, id); see data/builtin.py."""

    type: Literal["builtin"] = "builtin"
    real_train: NonNegInt = 4000
    real_test: NonNegInt = 1000
    synthetic: NonNegInt = 12000
    ambiguous_fraction: Fraction01 = 0.1  # synthetic samples blended from two classes
    mislabeled_fraction: Fraction01 = 0.05  # synthetic samples carrying a wrong label
    noise: NonNegFloat = 0.12  # std of per-pixel Gaussian noise, in [0, 1] pixel units
    seed: int = 0
    id_offset: NonNegInt | None = None


class NpzSource(Strict):
    """A `.npz` with `image` uint8 NxHxWxC and `label` (the DM-Improves-AT synthetic format)."""

    type: Literal["npz"] = "npz"
    path: str
    source: Literal["real", "synthetic"] = "synthetic"
    # which split the rows go to: a user's own test set needs no torchvision (ids: docs/data.md)
    split: Literal["train", "test"] = "train"
    limit: PositiveInt | None = None  # take the first `limit` rows
    id_offset: NonNegInt | None = None


class TorchvisionSource(Strict):
    """CIFAR-10/100 or SVHN through torchvision. Never downloads unless `download: true`."""

    type: Literal["torchvision"] = "torchvision"
    name: Literal["cifar10", "cifar100", "svhn"] = "cifar10"
    root: str = "~/.cache/puma_ray/torchvision"
    download: bool = False
    limit_train: PositiveInt | None = None
    limit_test: PositiveInt | None = None
    id_offset: NonNegInt | None = None


Source = Annotated[BuiltinSource | NpzSource | TorchvisionSource, Field(discriminator="type")]


class DataConfig(Strict):
    name: str = "builtin"
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
    num_classes: PositiveInt | None = None  # default: what the sources say (10 for builtin)
    rows_per_shard: PositiveInt = 50_000  # ~150 MB of 32x32x3 images per Parquet file

    def source_id_offset(self, index: int) -> int:
        src = self.sources[index]
        return src.id_offset if src.id_offset is not None else index * ID_BLOCK


# --------------------------------------------------------------------------------------------
# Model, training, evaluation.


# The architectures puma_ray.models registers, listed here so that validating a config does not
# import torch (tests/test_bad_input.py keeps this equal to the registry). Models a library user
# registers are accepted too, once puma_ray.models is imported.
MODEL_NAMES = ("preact_resnet18", "small_cnn", "wide_resnet", "wrn28_10", "wrn34_10", "wrn70_16")


def _known_arch(name: str) -> str:
    """Refuse a typo at config load, not in a Ray Train worker after ingest and scoring."""
    known = set(MODEL_NAMES)
    registry = sys.modules.get("puma_ray.models.registry")
    if registry is not None:
        known.update(registry.list_models())
    if name not in known:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(known))})")
    return name


class ModelConfig(Strict):
    arch: Annotated[str, AfterValidator(_known_arch)] = "small_cnn"  # see MODEL_NAMES
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to create_model


class AttackConfig(Strict):
    """The threat model used for training and robust evaluation."""

    norm: Literal["linf", "l2"] = "linf"
    epsilon: PositiveFloat = 8 / 255  # radius in [0, 1] pixel units; '8/255' is accepted
    steps: PositiveInt = 10  # PGD steps during training
    step_ratio: PositiveFloat = 0.25  # step size = step_ratio * eps_i, per sample


class TrainingConfig(Strict):
    objective: Literal["pgd_at", "trades", "standard"] = "pgd_at"
    trades_beta: NonNegFloat = 5.0
    attack: AttackConfig = Field(default_factory=AttackConfig)
    epochs: PositiveInt = 8
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 0.1  # peak learning rate for batch_size
    momentum: Fraction01 = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 5e-4  # not applied to BatchNorm or bias parameters
    warmup_epochs: NonNegFloat = 1.0
    # ramp every sample's training eps linearly from ~0 over this many epochs (0: off); PGD-AT
    # from scratch at the full radius can stall at chance on hard data
    eps_warmup_epochs: NonNegFloat = 0.0
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    label_smoothing: Fraction01 = 0.1
    ema_decay: Annotated[float, _in_range(0, 1, hi_open=True)] = 0.0  # 0 disables EMA
    # share of real rows in every batch when both sources exist (Wang et al.: 0.3); null lets
    # batches follow the data's own mix (one stream over all rows)
    real_fraction: Fraction01 | None = 0.3
    augment: bool = True  # random crop (pad 4) + horizontal flip, on whole batches
    # "kept": an epoch is as many samples as the training set has (pruning saves compute);
    # "fixed": `samples_per_epoch` samples, whatever the set's size (Wang et al.: 50000)
    epoch_length: Literal["kept", "fixed"] = "kept"
    samples_per_epoch: PositiveInt | None = Field(default=None, validate_default=True)
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    checkpoints_to_keep: PositiveInt = 2
    max_failures: NonNegInt = 1
    seed: int = 0

    @field_validator("samples_per_epoch")
    @classmethod
    def _samples_need_fixed_length(cls, v: int | None, info: ValidationInfo) -> int | None:
        # epoch_length is declared first, so it is in info.data once it validated
        length = info.data.get("epoch_length")
        if length == "fixed" and v is None:
            raise ValueError("required when epoch_length is fixed (e.g. 50000)")
        if length == "kept" and v is not None:
            raise ValueError(f"only used with epoch_length: fixed (got {v}, epoch_length: kept)")
        return v


class MarginModelConfig(Strict):
    """The robust model whose DeepFool margins rank the samples: a given checkpoint, or trained."""

    checkpoint: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainingConfig = Field(default_factory=TrainingConfig)


class ScoringConfig(Strict):
    norm: Literal["l2", "linf"] = "l2"
    overshoot: NonNegFloat = 0.02
    max_iter: PositiveInt = 50
    candidates: PositiveInt | None = None  # top-k logits at the start; None = all classes
    clip: bool = False  # keep iterates inside the [0, 1] image box
    target: Literal["true", "predicted"] = "true"  # margin w.r.t. the true or predicted label
    batch_size: PositiveInt = 256
    embeddings: bool = False  # also write penultimate features (for `extrapolated`)
    pool_min: PositiveInt = 1
    pool_max: PositiveInt | None = None  # None = as many actors as the cluster's CPUs/GPUs allow
    cpus_per_actor: PositiveFloat = 1.0
    gpus_per_actor: NonNegFloat = 0.0
    max_retries: NonNegInt = 3  # per-task retries when a scorer actor dies


class ExtrapolationConfig(Strict):
    """Nieth et al.: score a random subset, extend by k-NN in an embedding space."""

    scored_fraction: Annotated[float, _in_range(0, 1, lo_open=True)] = 0.1
    k: PositiveInt = 12
    base_strategy: Literal["puma", "high_margin", "low_margin"] = "puma"


class PruningConfig(Strict):
    strategy: Literal["puma", "high_margin", "low_margin", "random", "extrapolated", "none"] = (
        "puma"
    )
    ratio: FractionOpen = 0.3  # fraction of in-scope samples dropped
    scope: Literal["synthetic", "all"] = "synthetic"
    per_class: bool = True
    seed: int = 0
    eps_rule: Literal["none", "scale_lowest", "margin_cap"] = "scale_lowest"
    eps_scale: PositiveFloat = 0.5  # scale_lowest: eps_i = eps * eps_scale for the lowest q
    eps_quantile: Fraction01 = 0.1  # scale_lowest: q, fraction of the kept set adjusted
    eps_alpha: PositiveFloat = 1.0  # margin_cap: eps_i = min(eps, alpha * margin_i)
    eps_floor: NonNegFloat = 0.0  # margin_cap: lower bound on eps_i
    extrapolation: ExtrapolationConfig = Field(default_factory=ExtrapolationConfig)


class EvaluationConfig(Strict):
    pgd_steps: PositiveInt = 20
    pgd_restarts: PositiveInt = 1
    subset: PositiveInt | None = 1000  # test rows used; None = the whole test split
    autoattack: bool = False  # needs the `eval` extra
    batch_size: PositiveInt = 500
    # the check after every training epoch (test_clean_acc / test_robust_acc, what ASHA
    # stops on): a progress signal on at most `epoch_subset` of the `subset` rows, with
    # PGD-`epoch_pgd_steps`; the `evaluate` stage is the measurement
    epoch_subset: PositiveInt = 1000
    epoch_pgd_steps: PositiveInt = 10


# --------------------------------------------------------------------------------------------
# Sweeps, tracking, Ray.

SWEEPABLE = (
    "pruning.ratio",
    "pruning.eps_scale",
    "pruning.strategy",
    "pruning.eps_quantile",
    "pruning.eps_alpha",
    "pruning.eps_rule",
    "pruning.seed",
    "training.seed",
)
# keys whose values are names or integers: only grid / choice can produce them
SWEEP_DISCRETE = ("pruning.strategy", "pruning.eps_rule", "pruning.seed", "training.seed")
# what a trial measures at its end (evaluate's numbers and the training compute)
SWEEP_METRICS = ("robust_acc", "clean_acc", "pgd_acc", "device_seconds")


class SearchDim(Strict):
    """One dimension: exactly one of grid (every value, crossed with the other grids) /
    choice (one sampled value per trial) / uniform or loguniform ([low, high] sampled)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    def model_post_init(self, _ctx: Any) -> None:
        given = [
            k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform")
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty (give at least one value)")
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} needs [low, high] with low < high (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {lo})")

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k))

    def values(self) -> list[Any]:
        """The values a trial can get: the list for grid/choice, the two bounds otherwise."""
        return list(getattr(self, self.kind))


def check_search_value(key: str, value: Any) -> Any:
    """Validate one value of search key `key` with the schema of the field it sets (so a sweep
    can never hand a trial a config the pipeline would refuse); return the parsed value."""
    section, name = key.split(".", 1)
    model = {"pruning": PruningConfig, "training": TrainingConfig}[section]
    try:
        return getattr(model.model_validate({name: value}), name)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and "(got" not in msg:
            msg += f" (got {value!r})"
        raise ValueError(f"{key}: {msg}") from None


class SweepConfig(Strict):
    """`puma-ray sweep`: Ray Tune over prune and epsilon settings, one trial = prune → train →
    evaluate (see puma_ray/sweep.py and docs/sweeps.md)."""

    space: dict[str, SearchDim] = Field(
        default_factory=lambda: {
            "pruning.ratio": SearchDim(grid=[0.3, 0.6]),
            "pruning.eps_scale": SearchDim(grid=[0.5, 1.0]),
        }
    )
    num_samples: PositiveInt = 1  # repeats of the grid; each draws its own choice/uniform values
    metric: str = "robust_acc"  # what "best" means in the report: one of SWEEP_METRICS
    mode: Literal["max", "min"] = "max"
    asha: bool = False  # stop weak trials early on their per-epoch test robust accuracy
    asha_grace_epochs: PositiveInt = 1  # ASHA never stops a trial before this many epochs
    asha_reduction_factor: Annotated[float, _in_range(1, 100, lo_open=True)] = 2.0
    max_concurrent_trials: PositiveInt = 1
    # CPUs held by the trial's own process for the whole trial. It only orchestrates (prune and
    # evaluation run as Ray tasks, training in its Train workers: ray.num_workers x
    # ray.cpus_per_worker), like Ray Train's own controller, so 0 by default; with in-process
    # training (ray.num_workers: 0) the trial holds ray.cpus_per_worker instead.
    trial_cpus: NonNegFloat = 0.0
    trial_max_failures: NonNegInt = 1  # Tune retries of a failed trial (training resumes)
    # add one unpruned trial (every sample at the full epsilon) unless the space has one
    baseline: bool = True

    @field_validator("space")
    @classmethod
    def _known_keys_and_values(cls, space: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for key, dim in space.items():
            if key not in SWEEPABLE:
                raise ValueError(f"unknown search key {key!r} (allowed: {', '.join(SWEEPABLE)})")
            if key in SWEEP_DISCRETE and dim.kind in ("uniform", "loguniform"):
                raise ValueError(f"{key}: use grid or choice ({dim.kind} samples real numbers)")
            for v in dim.values():
                check_search_value(key, v)
        return space

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in SWEEP_METRICS:
            raise ValueError(
                f"unknown metric {metric!r} (expected one of {', '.join(SWEEP_METRICS)})"
            )
        return metric


class TrackingConfig(Strict):
    tracking_uri: str | None = None  # default: sqlite:///<run_dir>/mlflow.db (absolute)
    experiment: str = "puma-ray"
    artifact_location: str | None = None  # default: <run_dir>/mlartifacts


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else a new local instance
    num_cpus: PositiveInt | None = None  # only for a new local instance
    object_store_memory: PositiveInt | None = None  # bytes; only for a new local instance
    num_workers: NonNegInt = 1  # Ray Train workers; 0 runs the loop in-process
    cpus_per_worker: PositiveFloat = 1.0
    use_gpu: bool = False


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def is_plain_name(name: str) -> bool:
    """One path component of letters, digits, '.', '_', '-' (not '.' or '..')."""
    return bool(name) and name not in (".", "..") and all(c in _NAME_CHARS for c in name)


def check_plain_name(name: str, field: str) -> str:
    """`name` if it is one plain folder name, else a ConfigError naming `field`."""
    if not is_plain_name(name):
        raise ConfigError(
            f"{field}: must be a plain folder name: letters, digits, '.', '_', '-' (got {name!r})"
        )
    return name


def _run_name(name: str) -> str:
    """The run dir is `runs/<name>` and stages clear folders under it: one plain path component,
    so a name cannot point the run dir (and what it clears) anywhere else."""
    if not is_plain_name(name):
        raise ValueError(
            f"must be a plain folder name: letters, digits, '.', '_', '-' (got {name!r})"
        )
    return name


class PipelineConfig(Strict):
    name: Annotated[str, AfterValidator(_run_name)] = "demo"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    margin_model: MarginModelConfig = Field(default_factory=MarginModelConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    # `puma-ray run` also trains these baselines with the same recipe and evaluates them side by
    # side: "full" (no pruning, uniform eps) and "random" (random sub-sampling at pruning.ratio)
    compare: list[Literal["full", "random"]] = Field(default_factory=list)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# --------------------------------------------------------------------------------------------
# Loading, overrides, error messages.


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = ""
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif part in ("builtin", "npz", "torchvision") and loc.endswith("]"):
            continue  # pydantic inserts the discriminator tag into the path
        else:
            loc += f".{part}" if loc else str(part)
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")  # our own messages already say what was given
    elif kind == "union_tag_invalid":
        msg = "unknown source type (expected builtin, npz or torchvision)"
    if kind not in ("extra_forbidden", "missing", "value_error") and "input" in err:
        msg += f" (got {err['input']!r})"
    where = f"{source}: " if source else ""
    return f"{where}{loc or '<root>'}: {msg}"


def validate(raw: dict[str, Any], source: str = "") -> PipelineConfig:
    """Validate a plain dict; raise ConfigError whose first line names the first bad field."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_format_error(err, source) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=3")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each 'a.b.c=value' applied (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise ConfigError(
                        f"--set {item}: {'.'.join(parts[: i + 1])} is not a list index"
                    ) from None
                continue
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict | list):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        if isinstance(node, list):
            try:
                node[int(parts[-1])] = value
            except (ValueError, IndexError):
                n = len(node)
                raise ConfigError(
                    f"--set {item}: {parts[-1]!r} is not an index of {'.'.join(parts[:-1])} "
                    f"(it has {n} item{'' if n == 1 else 's'})"
                ) from None
        else:
            node[parts[-1]] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give a pipeline YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte {e.start} is not UTF-8); give a pipeline YAML file"
        ) from None
    except OSError as e:  # permissions, a FIFO, an I/O error
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Sections merge key by key; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def default_raw() -> dict[str, Any]:
    """The schema defaults as a plain dict, in the same form a YAML file has."""
    return PipelineConfig().model_dump(mode="json")


def smoke_test_overrides() -> list[str]:
    """`--smoke-test`: tiny data and one short epoch, so any config runs in a minute on 2 CPUs."""
    return [
        "data.sources=[{type: builtin, real_train: 512, real_test: 256, synthetic: 1024}]",
        "data.rows_per_shard=512",
        "margin_model.train.epochs=1",
        "training.epochs=1",
        "training.batch_size=64",
        "margin_model.train.batch_size=64",
        "scoring.max_iter=10",
        "evaluation.subset=128",
        "evaluation.pgd_steps=5",
        "ray.num_workers=1",
        "ray.num_cpus=2",
    ]


# The embedded demo (`puma-ray run` with no config; tune_configs/demo.yaml is its resolved form):
# the schema's recipe defaults, shrunk to finish in under 10 minutes on 2 CPU cores. Short
# training wants fewer, larger PGD steps (3 x eps/2) than the full recipe's 10 x eps/4.
DEMO_OVERRIDES = [
    # less pixel noise than the generator's default (0.12), so a small CNN learns the robust
    # shape feature in the few epochs the demo can afford
    "data.sources=[{type: builtin, real_train: 1500, real_test: 1000, synthetic: 4500, "
    "noise: 0.05}]",
    "data.rows_per_shard=2000",
    "margin_model.train.epochs=8",
    "margin_model.train.attack.steps=3",
    "margin_model.train.attack.step_ratio=0.5",
    # PGD-AT from scratch at the full 8/255 stays at chance on this data; ramp eps in
    "margin_model.train.eps_warmup_epochs=3",
    # TRADES (beta 5, as in the paper-scale recipe): its clean term lets the model start
    # learning on a pruned set, whose easiest samples are gone; PGD-AT stalls there in 8 epochs
    "training.objective=trades",
    "training.trades_beta=5",
    "training.epochs=8",
    "training.attack.steps=3",
    "training.attack.step_ratio=0.5",
    "training.eps_warmup_epochs=3",
    # two 1-thread scorer actors use both cores and leave a CPU slot for Ray Data's reads
    "scoring.pool_max=2",
    "scoring.cpus_per_actor=0.5",
    "evaluation.subset=500",
    "evaluation.epoch_subset=200",
    "evaluation.epoch_pgd_steps=5",
    # two 1-thread DDP workers use both cores and leave a CPU slot for Ray Data's read tasks
    "ray.num_workers=2",
    "ray.cpus_per_worker=0.5",
]


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    smoke_test: bool = False,
) -> PipelineConfig:
    """Read a YAML config (or, with no path, the embedded demo), apply overrides, validate.
    A file's missing keys take the schema defaults (the full recipe), not the demo's sizes."""
    # Start from the defaults so `--set data.sources.0.noise=0.2` finds the list it indexes.
    raw = _merge(default_raw(), read_yaml(path) if path is not None else {})
    source = os.fspath(path) if path is not None else "<default>"
    # the demo, then smoke-test shrinking, then the user's --set values (which win)
    first = DEMO_OVERRIDES if path is None else []
    raw = apply_overrides(
        raw, first + (smoke_test_overrides() if smoke_test else []) + (overrides or [])
    )
    return validate(raw, source)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
