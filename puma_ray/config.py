"""One pydantic schema for the whole pipeline YAML.

The defaults *are* the embedded demo (builtin data, small CNN, PUMA); `tune_configs/demo.yaml`
spells them out and a test keeps the two equal. Every error names its YAML path
(`pruning.ratio: must be in [0, 1) (got 1.5)`), and `--set a.b=c` overrides go through the same
validation as the file.

Every field carries a description; `puma-ray config --schema` turns the models into the
reference of every key (docs/config.md, kept equal to that output by tests/test_cli_polish.py).

Length: one module on purpose: every knob of the pipeline lives in this one schema, each with
its unit and default, so a user reads the whole configuration in one place.
"""

from __future__ import annotations

import copy
import os
import re
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
    model_validator,
)

from puma_ray.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Value types with messages a user can act on. Each check carries a `constraint` text, which the
# generated reference (`puma-ray config --schema`, docs/config.md) prints in its type column.


def _in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    interval = f"{left}{_fmt(lo)}, {_fmt(hi)}{right}"
    text = f"must be in {interval}"

    def check(v: float) -> float:
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            raise ValueError(f"{text} (got {v})")
        return v

    check.constraint = f"in {interval}"
    return AfterValidator(check)


def _positive(v: float) -> float:
    if not v > 0:
        raise ValueError(f"must be > 0 (got {v})")
    return v


def _non_negative(v: float) -> float:
    if v < 0:
        raise ValueError(f"must be >= 0 (got {v})")
    return v


_positive.constraint = "> 0"
_non_negative.constraint = ">= 0"


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


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a fraction in (0, 1) or a whole count of rows, not a bool")
    return v


def _validation_size(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and v >= 1:
        return int(v)
    if isinstance(v, float) and not 0 < v < 1:
        raise ValueError(f"a fraction must be in (0, 1), a count a whole number >= 0 (got {v})")
    if isinstance(v, int) and v < 0:
        raise ValueError(f"a count must be >= 0 (got {v})")
    return v


_validation_size.constraint = "a fraction in (0, 1) or a count >= 0"
ValidationSize = Annotated[
    int | float, BeforeValidator(_not_bool), AfterValidator(_validation_size)
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Data sources. Ids are `id_offset + row index within the source`; the default offset is the
# source's position in the list times 2**40, so ids stay stable as long as the list does.

ID_BLOCK = 2**40
_ID_OFFSET = (
    "first sample id of this source; null: its position in data.sources times 2^40, so ids "
    "stay stable as long as the list does (docs/data.md)"
)


class BuiltinSource(Strict):
    """Procedural 10-class 32x32x3 images, deterministic from (seed, id); see data/builtin.py."""

    type: Literal["builtin"] = Field("builtin", description="selects this kind of source")
    real_train: NonNegInt = Field(4000, description="training rows marked `real`")
    real_test: NonNegInt = Field(1000, description="test rows (the test split is never pruned)")
    synthetic: NonNegInt = Field(
        12000, description="training rows marked `synthetic` (the part pruning drops from)"
    )
    ambiguous_fraction: Fraction01 = Field(
        0.1, description="share of synthetic samples blended from two classes"
    )
    mislabeled_fraction: Fraction01 = Field(
        0.05, description="share of synthetic samples carrying a wrong label"
    )
    noise: NonNegFloat = Field(
        0.12, description="std of the per-pixel Gaussian noise, in [0, 1] pixel units"
    )
    seed: int = Field(0, description="generator seed: each sample is a function of (seed, id)")
    id_offset: NonNegInt | None = Field(None, description=_ID_OFFSET)


class NpzSource(Strict):
    """A `.npz` with `image` uint8 NxHxWxC and `label` (the DM-Improves-AT synthetic format)."""

    type: Literal["npz"] = Field("npz", description="selects this kind of source")
    path: str = Field(description="the .npz file: a local path or a URI (s3://, gs://)")
    source: Literal["real", "synthetic"] = Field(
        "synthetic", description="what its rows are marked (pruning.scope decides what may drop)"
    )
    split: Literal["train", "val", "test"] = Field(
        "train",
        description="which split the rows go to; `test` makes this file the test split, so "
        "your own data needs no torchvision; `val` makes it the validation split (then "
        "`data.validation` must be 0)",
    )
    limit: PositiveInt | None = Field(
        None, description="take only the first `limit` rows; null: all"
    )
    id_offset: NonNegInt | None = Field(None, description=_ID_OFFSET)


class TorchvisionSource(Strict):
    """CIFAR-10/100 or SVHN through torchvision. Never downloads unless `download: true`."""

    type: Literal["torchvision"] = Field("torchvision", description="selects this kind of source")
    name: Literal["cifar10", "cifar100", "svhn"] = Field("cifar10", description="the dataset")
    root: str = Field(
        "~/.cache/puma_ray/torchvision", description="folder torchvision reads the dataset from"
    )
    download: bool = Field(False, description="download into `root` if the files are missing")
    limit_train: PositiveInt | None = Field(
        None, description="take only the first `limit_train` training rows; null: all"
    )
    limit_test: PositiveInt | None = Field(
        None, description="take only the first `limit_test` test rows; null: all"
    )
    id_offset: NonNegInt | None = Field(None, description=_ID_OFFSET)


Source = Annotated[BuiltinSource | NpzSource | TorchvisionSource, Field(discriminator="type")]


class DataConfig(Strict):
    """Where the samples come from; `puma-ray ingest` turns them into Parquet shards."""

    name: str = Field(
        "builtin", description="the dataset's name, recorded in the shards' dataset.json"
    )
    sources: list[Source] = Field(
        default_factory=lambda: [BuiltinSource()],
        min_length=1,
        description="the sources, each a mapping with a `type` (below); a list written in a "
        "file replaces the default list",
    )
    num_classes: PositiveInt | None = Field(
        None, description="number of classes; null: what the sources say (10 for builtin)"
    )
    rows_per_shard: PositiveInt = Field(
        50_000, description="rows per Parquet shard (50,000 32x32x3 images are ~150 MB)"
    )
    validation: ValidationSize = Field(
        0.1,
        description="real training rows held out as the validation split (`data/val`), which "
        "per-epoch checks, ASHA and `sweep.metric` read, so that the test split is read only "
        "by the final evaluation: a fraction of each class's real rows (`0.1`) or a total "
        "count split across classes in proportion (`1000`); drawn per class by hash(seed, id); "
        "0: no validation split (then no per-epoch check, and `sweep` refuses to run). Never "
        "scored, pruned or trained on",
    )
    validation_seed: int = Field(
        0, description="seed of the hash that picks the validation rows (not the training seed)"
    )

    @property
    def has_validation(self) -> bool:
        """Whether ingest writes a validation split (carved, or a source with split: val)."""
        return bool(self.validation) or any(
            getattr(s, "split", None) == "val" for s in self.sources
        )

    @model_validator(mode="after")
    def _one_validation_source(self):
        explicit = [i for i, s in enumerate(self.sources) if getattr(s, "split", None) == "val"]
        if explicit and self.validation:
            raise ValueError(
                f"data.sources[{explicit[0]}] is the validation split (split: val), so "
                f"data.validation must be 0 (got {self.validation})"
            )
        return self

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


_known_arch.constraint = "(a registered model)"


class ModelConfig(Strict):
    """The network trained on the kept set."""

    arch: Annotated[str, AfterValidator(_known_arch)] = Field(
        "small_cnn", description=f"architecture: one of {', '.join(MODEL_NAMES)}"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the architecture (e.g. depth, width); a mapping "
        "written in a file replaces the default one",
    )


class AttackConfig(Strict):
    """The threat model used for training and robust evaluation."""

    norm: Literal["linf", "l2"] = Field("linf", description="the norm of the perturbation ball")
    epsilon: PositiveFloat = Field(
        8 / 255, description="radius in [0, 1] pixel units; a fraction like 8/255 is accepted"
    )
    steps: PositiveInt = Field(10, description="PGD steps during training")
    step_ratio: PositiveFloat = Field(
        0.25, description="PGD step size as a multiple of each sample's epsilon"
    )


class TrainingConfig(Strict):
    """The adversarial-training recipe (Ray Train, one run per kept set)."""

    objective: Literal["pgd_at", "trades", "standard"] = Field(
        "pgd_at", description="PGD adversarial training, TRADES, or plain (clean) training"
    )
    trades_beta: NonNegFloat = Field(5.0, description="TRADES: weight of the robustness term")
    trades_forward: Literal["separate", "concatenated"] = Field(
        "separate",
        description="TRADES: `separate` forwards the clean and then the adversarial batch, so "
        "BatchNorm normalises each with its own statistics and updates its running statistics "
        "twice (the code of Zhang et al. and Wang et al.); `concatenated` forwards both as one "
        "batch (same FLOPs, fewer and larger kernels; BatchNorm sees mixed statistics)",
    )
    trades_attack_bn: Literal["batch", "running"] = Field(
        "batch",
        description="TRADES: BatchNorm in the inner maximisation: `batch` normalises every "
        "attack forward with its own batch statistics and leaves the running statistics alone "
        "(train mode, Wang et al.'s code); `running` uses the running statistics (eval mode, "
        "Zhang et al.'s code)",
    )
    trades_start: Literal["auto", "uniform", "normal"] = Field(
        "auto",
        description="TRADES: the inner maximisation's start: `uniform` in each sample's ball, "
        "`normal` 0.001·N(0, 1) (Zhang et al.); `auto`: uniform for linf, normal for l2 "
        "(Wang et al.'s code)",
    )
    attack: AttackConfig = Field(
        default_factory=AttackConfig, description="the attack training uses and evaluation measures"
    )
    epochs: PositiveInt = Field(8, description="training epochs")
    batch_size: PositiveInt = Field(
        128, description="global batch size: split equally over ray.num_workers"
    )
    lr: PositiveFloat = Field(0.1, description="peak learning rate (SGD) for batch_size")
    momentum: Fraction01 = Field(0.9, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: NonNegFloat = Field(
        5e-4, description="weight decay; not applied to BatchNorm or bias parameters"
    )
    warmup_epochs: NonNegFloat = Field(
        1.0, description="epochs of linear learning-rate warm-up to `lr`"
    )
    eps_warmup_epochs: NonNegFloat = Field(
        0.0,
        description="ramp every sample's training epsilon linearly from ~0 over this many "
        "epochs (0: off); PGD-AT from scratch at the full radius can stall at chance on hard data",
    )
    schedule: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine", description="learning-rate schedule after the warm-up"
    )
    label_smoothing: Fraction01 = Field(0.1, description="label smoothing of the loss")
    ema_decay: FractionOpen = Field(
        0.0, description="decay of an exponential moving average of the weights; 0 disables EMA"
    )
    real_fraction: Fraction01 | None = Field(
        0.3,
        description="share of real rows in every batch when both real and synthetic rows exist "
        "(Wang et al.: 0.3); null: batches follow the data's own mix (one stream over all rows)",
    )
    augment: bool = Field(
        True, description="random crop (pad 4) and horizontal flip, on whole batches"
    )
    epoch_length: Literal["kept", "fixed"] = Field(
        "kept",
        description="`kept`: an epoch is as many samples as the training set has (pruning saves "
        "compute); `fixed`: `samples_per_epoch` samples, whatever the set's size",
    )
    samples_per_epoch: PositiveInt | None = Field(
        default=None,
        validate_default=True,
        description="samples per epoch with epoch_length: fixed (Wang et al.: 50000); must be "
        "null with epoch_length: kept",
    )
    amp: bool = Field(True, description="bf16 autocast on GPU; ignored on CPU")
    checkpoints_to_keep: PositiveInt = Field(
        2, description="epoch checkpoints Ray Train keeps (training resumes from the last)"
    )
    max_failures: NonNegInt = Field(
        1, description="Ray Train restarts after a worker failure, from the last checkpoint"
    )
    seed: int = Field(
        0,
        description="seeds the initial weights, the batch order, the augmentation and the PGD "
        "starts of training and of its per-epoch check",
    )
    init_from: str | None = Field(
        None,
        description="fine-tune: start from these weights instead of a random init. A puma_ray "
        "model.pt (local path, URI or `puma_ray:<file>`) of `model`'s arch and kwargs, or a "
        "RobustBench zoo model as `puma-ray evaluate` names one: `robustbench:NAME` (dataset, "
        "threat model, model_dir and download from `margin_model.robustbench`) or "
        "`robustbench:PATH.pt`; a zoo model is itself the network trained (`model` is not "
        "used). Its classes and image shape must be the dataset's; a resumed run continues from "
        "its checkpoint instead; its content is part of the training's fingerprint. null: "
        "random init. Not for margin_model.train (docs/training.md)",
    )
    deterministic: bool = Field(
        False,
        description="GPU runs: make every kernel deterministic (torch.use_deterministic_"
        "algorithms, cuDNN deterministic without autotuning, CUBLAS_WORKSPACE_CONFIG), so the "
        "same config and seed give the same weights; slower, and an op without a "
        "deterministic kernel raises. CPU training is deterministic without it "
        "(docs/training.md)",
    )

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


class RobustBenchConfig(Strict):
    """A published robust model from the RobustBench zoo (the `zoo` extra), loaded by
    robustbench's own loader from `model_dir`."""

    name: str | None = Field(
        None,
        description="the zoo entry, e.g. `Wang2023Better_WRN-28-10`; null: no zoo model",
    )
    dataset: Literal["cifar10", "cifar100"] = Field(
        "cifar10", description="the zoo's dataset (models take 32x32 RGB pixels in [0, 1])"
    )
    threat_model: Literal["Linf", "L2", "corruptions"] = Field(
        "Linf", description="the zoo's threat model the entry is listed under"
    )
    model_dir: str = Field(
        "models",
        description="where the weights are: `<model_dir>/<dataset>/<threat_model>/<name>.pt` "
        "(robustbench's layout). A local path that every node sees (a shared file system or "
        "the node image); relative paths are taken from the driver's working directory",
    )
    download: bool = Field(
        False,
        description="fetch missing weights with robustbench's downloader on the driver (needs "
        "internet); false: a missing file is an error that names the file to place",
    )


class MarginModelConfig(Strict):
    """The robust model whose DeepFool margins rank the samples: a given checkpoint, a RobustBench
    zoo model, or trained."""

    checkpoint: str | None = Field(
        None,
        description="a model.pt to score with (local path or URI); null (and no "
        "`robustbench.name`): train one on all the samples with `model` and `train` (the "
        "`margin_model` stage of `puma-ray run`)",
    )
    robustbench: RobustBenchConfig = Field(
        default_factory=RobustBenchConfig,
        description="a RobustBench zoo model to score with instead (set `name`; not with "
        "`checkpoint`)",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="the margin model's network"
    )
    train: TrainingConfig = Field(
        default_factory=TrainingConfig, description="the margin model's training recipe"
    )

    @model_validator(mode="after")
    def _one_given_model(self):
        if self.checkpoint is not None and self.robustbench.name is not None:
            raise ValueError(
                "set checkpoint or robustbench.name, not both (both name the model to score "
                "with; the demo sets checkpoint: add --set margin_model.checkpoint=null)"
            )
        return self

    @model_validator(mode="after")
    def _margin_model_from_scratch(self):
        if self.train.init_from is not None:
            raise ValueError(
                "train.init_from: the margin model is trained from a random init; to score "
                "with given weights set margin_model.checkpoint or margin_model.robustbench.name"
            )
        return self

    @property
    def given(self) -> bool:
        """A model is given (checkpoint or zoo), so none is trained."""
        return self.checkpoint is not None or self.robustbench.name is not None


class ScoringConfig(Strict):
    """`puma-ray score`: DeepFool margins on a Ray Data actor pool."""

    norm: Literal["l2", "linf"] = Field("l2", description="the norm DeepFool measures margins in")
    overshoot: NonNegFloat = Field(
        0.02, description="DeepFool overshoot: the step is (1 + overshoot) times the linear one"
    )
    max_iter: PositiveInt = Field(50, description="DeepFool iterations per sample at most")
    candidates: PositiveInt | None = Field(
        None, description="classes DeepFool considers: the top-k logits at the start; null: all"
    )
    clip: bool = Field(False, description="keep DeepFool's iterates inside the [0, 1] image box")
    target: Literal["true", "predicted"] = Field(
        "true",
        description="the margin with respect to the true or the predicted label (with "
        "'predicted' no sample is misclassified, so `signed` changes nothing)",
    )
    signed: bool = Field(
        True,
        description="signed margins: a sample the margin model misclassifies gets minus its "
        "DeepFool distance back into its true class instead of 0, so the lowest margins are "
        "ordered, not tied; the score state records it, and scores made under the other "
        "setting (or before it existed) are rescored, never mixed",
    )
    batch_size: PositiveInt = Field(
        256, description="rows per DeepFool batch; an actor's memory grows with it"
    )
    embeddings: bool = Field(
        False, description="also write penultimate-layer features (the extrapolated strategy)"
    )
    pool_min: PositiveInt = Field(1, description="scoring actors at least")
    pool_max: PositiveInt | None = Field(
        None,
        description="scoring actors at most; null: one per GPU, or as many CPU actors as fit in "
        "all CPUs but one (Ray Data's reads and writes need a free CPU)",
    )
    cpus_per_actor: PositiveFloat = Field(1.0, description="logical CPUs per scoring actor")
    gpus_per_actor: NonNegFloat = Field(0.0, description="GPUs per scoring actor")
    max_retries: NonNegInt = Field(
        3, description="restarts of a dead scoring actor, and retries of its batch"
    )


class ExtrapolationConfig(Strict):
    """Nieth et al.: score a random subset, extend by k-NN in an embedding space."""

    scored_fraction: Annotated[float, _in_range(0, 1, lo_open=True)] = Field(
        0.1, description="share of the rows DeepFool scores (chosen by a hash of the id)"
    )
    k: PositiveInt = Field(
        12, description="neighbours whose margins estimate an unscored row's margin"
    )
    base_strategy: Literal["puma", "high_margin", "low_margin"] = Field(
        "puma", description="the strategy applied to the scored and estimated margins"
    )
    same_class: bool = Field(
        True,
        description="neighbours only among the scored rows of the row's own label (the margin "
        "is measured towards the label); false: any class",
    )
    rank_scored: Literal["estimate", "exact"] = Field(
        "estimate",
        description="`estimate`: every row is ranked by its k-NN estimate, a scored row's "
        "leaving itself out, so scored and unscored rows are ranked alike; `exact`: scored rows "
        "keep their DeepFool margin (their larger spread puts them at both tails of the order)",
    )
    holdout_fraction: Fraction01 = Field(
        0.2,
        description="share of the scored rows (a third hash of the id) whose leave-one-out "
        "estimate is compared with their true margin (Spearman, Pearson, MAE in the manifest); "
        "they stay neighbours of every other row, so the selection does not depend on it",
    )


class PruningConfig(Strict):
    """`puma-ray prune`: which samples are kept, and each kept sample's training epsilon."""

    strategy: Literal["puma", "high_margin", "low_margin", "random", "extrapolated", "none"] = (
        Field(
            "puma",
            description="`puma`: drop the highest margins, then apply eps_rule; `high_margin`: "
            "drop the highest margins; `low_margin`: drop the lowest; `random`; `extrapolated`: "
            "score a subset and estimate the rest by k-NN; `none`: keep everything",
        )
    )
    ratio: FractionOpen = Field(0.3, description="fraction of the in-scope samples dropped")
    scope: Literal["synthetic", "all"] = Field(
        "synthetic",
        description="`synthetic`: only synthetic rows can be dropped (real rows keep the base "
        "epsilon); `all`: every row",
    )
    per_class: bool = Field(
        True, description="drop the same fraction of every class (else one global threshold)"
    )
    seed: int = Field(
        0,
        description="seeds the `random` strategy's choice of rows and the `extrapolated` "
        "strategy's scored subset",
    )
    eps_rule: Literal["none", "scale_lowest", "margin_cap"] = Field(
        "scale_lowest",
        description="the per-sample epsilon rule of `puma` (other strategies use none): "
        "`scale_lowest` or `margin_cap` (docs/pruning.md)",
    )
    eps_scale: PositiveFloat = Field(
        0.5, description="scale_lowest: `eps_i = epsilon * eps_scale` for the lowest-margin q"
    )
    eps_quantile: Fraction01 = Field(
        0.1, description="scale_lowest: q, the fraction of the kept set whose epsilon is scaled"
    )
    eps_alpha: PositiveFloat = Field(
        1.0, description="margin_cap: `eps_i = min(epsilon, eps_alpha * margin_i)`"
    )
    eps_floor: NonNegFloat = Field(0.0, description="margin_cap: lower bound on `eps_i`")
    misclassified: Literal["eps_rule", "drop", "base_eps"] = Field(
        "eps_rule",
        description="rows the margin model gets wrong (pred != label), margin strategies only: "
        "`eps_rule`: ranked by their margin like every row (the lowest: puma's eps rule takes "
        "them first); `drop`: always dropped, counted in the ratio; `base_eps`: always kept at "
        "the base epsilon, outside the eps rule (docs/pruning.md)",
    )
    nonconverged: Literal["rank_last", "rank_first", "exclude", "as_is"] = Field(
        "rank_last",
        description="rows whose DeepFool did not converge (their margin's size is only a lower "
        "bound), margin strategies only: `rank_last`: above every converged row (a misclassified "
        "one: below); `rank_first`: below every converged row; `exclude`: always kept at the "
        "base epsilon, outside the order; `as_is`: ranked by the recorded margin",
    )
    extrapolation: ExtrapolationConfig = Field(
        default_factory=ExtrapolationConfig, description="settings of the extrapolated strategy"
    )


class EvaluationConfig(Strict):
    """`puma-ray evaluate`, and the check after every training epoch."""

    pgd_steps: PositiveInt = Field(20, description="PGD steps of the robust evaluation")
    pgd_restarts: PositiveInt = Field(
        1, description="PGD random restarts; a row counts as robust only if it survives all"
    )
    subset: PositiveInt | None = Field(
        1000, description="test rows evaluated; null: the whole test split"
    )
    autoattack: bool = Field(
        False,
        description="also run AutoAttack with the reference implementation (`pyautoattack`, "
        "the `eval` extra), reporting the robust accuracy after each of its attacks",
    )
    autoattack_version: Literal["standard", "plus", "rand", "custom"] = Field(
        "standard",
        description="the reference's version: `standard` (APGD-CE, APGD-T, FAB-T, Square: "
        "what RobustBench reports), `plus`, `rand` (randomised defences), or `custom` "
        "(runs `autoattack_attacks`)",
    )
    autoattack_attacks: (
        list[Literal["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]] | None
    ) = Field(
        None,
        description="the attacks of `autoattack_version: custom`, in order, with the "
        "reference's default settings; null for the other versions",
    )
    batch_size: PositiveInt = Field(500, description="rows per evaluation batch")
    chunk_rows: PositiveInt = Field(
        1000,
        description="rows per evaluation chunk: each chunk is a Ray task (one GPU each with "
        "ray.use_gpu, else ray.cpus_per_worker CPUs) whose result is saved on its own, so an "
        "interrupted evaluation resumes at the first unfinished chunk",
    )
    epoch_subset: PositiveInt = Field(
        1000,
        description="the check after every training epoch on the validation split "
        "(val/epoch_clean_acc, val/epoch_robust_acc: what ASHA stops on) uses at most this many "
        "of its first `subset` rows; a progress signal, the `evaluate` stage is the measurement",
    )
    epoch_pgd_steps: PositiveInt = Field(
        10, description="PGD steps of the check after every training epoch"
    )

    @model_validator(mode="after")
    def _autoattack_list(self):
        custom = self.autoattack_version == "custom"
        if custom and not self.autoattack_attacks:
            raise ValueError("autoattack_version: custom needs a non-empty autoattack_attacks")
        if not custom and self.autoattack_attacks is not None:
            raise ValueError(
                f"autoattack_attacks is only used with autoattack_version: custom "
                f"(got version {self.autoattack_version})"
            )
        attacks = self.autoattack_attacks or []
        if len(set(attacks)) != len(attacks):
            raise ValueError("autoattack_attacks names an attack twice")
        return self


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
    "pruning.misclassified",
    "pruning.nonconverged",
    "training.seed",
)
# keys whose values are names or integers: only grid / choice can produce them
SWEEP_DISCRETE = (
    "pruning.strategy",
    "pruning.eps_rule",
    "pruning.seed",
    "pruning.misclassified",
    "pruning.nonconverged",
    "training.seed",
)
# what a trial measures at its end (evaluate's numbers and the training compute)
# "best" is chosen on the validation split (or on compute); test numbers are only reported
SWEEP_METRICS = ("val/robust_acc", "val/clean_acc", "device_seconds")
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "settings")
# what one setting of a `settings` dimension may set: the search keys but the seeds, which vary
# per repeat (sweep.num_samples) or in a grid of their own
SETTING_KEYS = tuple(k for k in SWEEPABLE if not k.endswith(".seed"))
# a setting's name: it goes into trial names, MLflow params and the report's Markdown table
_SETTING_NAME = re.compile(r"[\w.+-]+")


class SubPathError(ValueError):
    """A ValueError about one part of a field's value: `path` continues the field's location
    (`[2].pruning.eps_rule` after `sweep.space.method.settings`), so the one-line error names
    the exact spot."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _setting_label(values: dict[str, Any]) -> str:
    return "+".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values.values())


def _check_setting(index: int, setting: dict[str, Any]) -> dict[str, Any]:
    """One setting checked key by key as `--set` checks a value; returned as {"name": ...,
    key: parsed value, ...} (the name defaults to its values joined by '+')."""
    where = f"[{index}]"
    values = {}
    for key, value in setting.items():
        if key == "name":
            continue
        if key in SWEEPABLE and key not in SETTING_KEYS:
            raise SubPathError(
                f"{where}.{key}",
                "a seed is not part of a setting: it varies per repeat (sweep.num_samples) or "
                "in a grid dimension of its own",
            )
        if key not in SETTING_KEYS:
            raise SubPathError(
                f"{where}.{key}",
                f"not a key a setting can set (allowed: name, {', '.join(SETTING_KEYS)})",
            )
        values[key] = check_search_value(key, value, prefix=False, path=f"{where}.{key}")
    if not values:
        raise SubPathError(where, "sets no key (give e.g. {pruning.strategy: random})")
    name = setting.get("name", _setting_label(values))
    if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
        raise SubPathError(
            f"{where}.name", f"must be letters, digits, '_', '.', '+' or '-' (got {name!r})"
        )
    return {"name": name, **values}


class SearchDim(Strict):
    """One dimension: exactly one of grid (every value, crossed with the other grids) /
    choice (one sampled value per trial) / uniform or loguniform ([low, high] sampled) /
    settings (a list of settings, each a mapping of search keys to values, crossed with the
    other grids like one grid dimension; the dimension's own name is then a label, not a key)."""

    grid: list[Any] | None = Field(
        None, description="every value, crossed with the other grid dimensions"
    )
    choice: list[Any] | None = Field(None, description="one value drawn per trial")
    uniform: tuple[float, float] | None = Field(
        None, description="[low, high]: one value drawn uniformly per trial"
    )
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], low > 0: one value drawn log-uniformly per trial"
    )
    settings: list[dict[str, Any]] | None = Field(
        None,
        description="every setting, crossed with the grid dimensions: each a mapping of "
        f"search keys ({', '.join(SETTING_KEYS)}) to one value, and an optional `name` (its "
        "label in trial names and the report; default: its values joined by '+'). Under a "
        "dimension named by a word without dots (`method`), not by a key; a key a setting "
        "sets is swept by that dimension alone (docs/sweeps.md)",
    )

    @field_validator("settings")
    @classmethod
    def _each_setting(cls, settings: list[dict[str, Any]] | None):
        if settings is None:
            return None
        out: list[dict[str, Any]] = []
        for i, setting in enumerate(settings):
            checked = _check_setting(i, setting)
            values = {k: v for k, v in checked.items() if k != "name"}
            for j, other in enumerate(out):
                if {k: v for k, v in other.items() if k != "name"} == values:
                    raise SubPathError(f"[{i}]", f"sets the same values as settings[{j}]")
                if other["name"] == checked["name"]:
                    hint = "" if "name" in setting else " (give each a `name`)"
                    raise SubPathError(
                        f"[{i}].name", f"{checked['name']!r} also names settings[{j}]{hint}"
                    )
            out.append(checked)
        return out

    def model_post_init(self, _ctx: Any) -> None:
        given = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, settings")
        kind = given[0]
        if kind in ("grid", "choice", "settings") and not getattr(self, kind):
            what = "setting" if kind == "settings" else "value"
            raise ValueError(f"{kind} is empty (give at least one {what})")
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} needs [low, high] with low < high (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {lo})")

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_KINDS if getattr(self, k))

    def values(self) -> list[Any]:
        """The values a trial can get: the list for grid/choice/settings (a setting is a
        mapping), the two bounds otherwise."""
        return list(getattr(self, self.kind))


def check_search_value(key: str, value: Any, *, prefix: bool = True, path: str = "") -> Any:
    """Validate one value of search key `key` with the schema of the field it sets (so a sweep
    can never hand a trial a config the pipeline would refuse); return the parsed value. The
    error names `key` (`prefix`), or with `path` is a SubPathError at that path."""
    section, name = key.split(".", 1)
    model = {"pruning": PruningConfig, "training": TrainingConfig}[section]
    try:
        return getattr(model.model_validate({name: value}), name)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and "(got" not in msg:
            msg += f" (got {value!r})"
        if path:
            raise SubPathError(path, msg) from None
        raise ValueError(f"{key}: {msg}" if prefix else msg) from None


class SweepConfig(Strict):
    """`puma-ray sweep`: Ray Tune over prune and epsilon settings, one trial = prune → train →
    evaluate (see puma_ray/sweep/ and docs/sweeps.md)."""

    space: dict[str, SearchDim] = Field(
        default_factory=lambda: {
            "pruning.ratio": SearchDim(grid=[0.3, 0.6]),
            "pruning.eps_scale": SearchDim(grid=[0.5, 1.0]),
        },
        description="the search space: a mapping of search key to one dimension (below), or of "
        "a name without dots to a list of `settings`; a space written in a file replaces the "
        "default one, `--set sweep.space.KEY=...` edits one key (null removes it). Search "
        f"keys: {', '.join(SWEEPABLE)}",
    )
    num_samples: PositiveInt = Field(
        1,
        description="repeats of the grid: repeat r trains with training.seed + r (and draws a "
        "random subset with pruning.seed + r) unless the space sets those seeds, and the report "
        "gives each setting's mean with a 95% interval over its repeats; with choice / uniform "
        "dimensions, each repeat draws its own values instead (Tune's num_samples)",
    )
    metric: str = Field(
        "val/robust_acc",
        description=f'what "best" means in the report: one of {", ".join(SWEEP_METRICS)} '
        "(the final evaluation of each trial on the validation split; the test split is "
        "reported beside it, never chosen on)",
    )
    mode: Literal["max", "min"] = Field("max", description="whether the best metric is max or min")
    asha: bool = Field(
        False,
        description="stop weak trials early on their per-epoch validation robust accuracy "
        "(`val/epoch_robust_acc`)",
    )
    asha_grace_epochs: PositiveInt = Field(
        1, description="ASHA never stops a trial before this many epochs"
    )
    asha_reduction_factor: Annotated[float, _in_range(1, 100, lo_open=True)] = Field(
        2.0, description="ASHA's reduction factor: the share of trials each rung keeps is 1/this"
    )
    max_concurrent_trials: PositiveInt = Field(
        1, description="trials at once (on a local instance capped to what the CPUs fit)"
    )
    trial_cpus: NonNegFloat = Field(
        0.0,
        description="CPUs the trial's own process holds for the whole trial. It only "
        "orchestrates (prune and evaluation run as Ray tasks, training in its Train workers: "
        "ray.num_workers x ray.cpus_per_worker), so 0; with in-process training "
        "(ray.num_workers: 0) the trial holds the larger of this and ray.cpus_per_worker",
    )
    trial_max_failures: NonNegInt = Field(
        1, description="Tune retries of a failed trial (its training resumes)"
    )
    baseline: bool = Field(
        True,
        description="add one unpruned trial (every sample at the full epsilon) unless the "
        "space has one: the compute reference of the report",
    )

    @field_validator("space")
    @classmethod
    def _known_keys_and_values(cls, space: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for key, dim in space.items():
            if dim.kind == "settings":
                if not is_plain_name(key) or "." in key:
                    raise ValueError(
                        f"{key}: a settings dimension is named by a word without dots (e.g. "
                        "method): its settings name the keys they set"
                    )
                if key == "baseline":  # a trial's point marks the added baseline by this key
                    raise ValueError("baseline: a reserved name; call the dimension e.g. method")
                continue
            if key not in SWEEPABLE:
                hint = "; a name without dots takes a list of settings" if "." not in key else ""
                raise ValueError(
                    f"unknown search key {key!r} (allowed: {', '.join(SWEEPABLE)}{hint})"
                )
            if key in SWEEP_DISCRETE and dim.kind in ("uniform", "loguniform"):
                raise ValueError(f"{key}: use grid or choice ({dim.kind} samples real numbers)")
            for v in dim.values():
                check_search_value(key, v)
        # a key is swept by one dimension: its own, or the settings of one settings dimension
        owner = {k: k for k, d in space.items() if d.kind != "settings"}
        for key, dim in space.items():
            for i, setting in enumerate(dim.settings or []):
                for k in setting:
                    if k != "name" and owner.setdefault(k, key) != key:
                        raise SubPathError(
                            f"{key}.settings[{i}].{k}",
                            f"also swept by sweep.space.{owner[k]}: a key is set by the "
                            "settings of one dimension or by a dimension of its own, not both",
                        )
        return space

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in SWEEP_METRICS:
            hint = ""
            if metric in ("robust_acc", "clean_acc", "pgd_acc"):
                hint = f" ({metric} is measured on the test split; choose on val/{metric})"
            raise ValueError(
                f"unknown metric {metric!r} (expected one of {', '.join(SWEEP_METRICS)}){hint}"
            )
        return metric


DEFAULT_EXPERIMENT = "puma-ray"


def _experiment(name: str | None) -> str:
    """The MLflow experiment when the config names none (null, the default): the way MLflow
    itself resolves it, MLFLOW_EXPERIMENT_NAME if set, else "puma-ray". A name in the file or
    in --set wins over the variable. Resolved here, when the config is validated, so `sweep`,
    `run`, `report` and `puma-ray config` all see the same name."""
    if name is None:
        return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return name


class TrackingConfig(Strict):
    """MLflow: where runs are logged."""

    tracking_uri: str | None = Field(
        None,
        description="the MLflow store; null: MLFLOW_TRACKING_URI if set, else "
        "`sqlite:///<run_dir>/mlflow.db` (absolute); `none` switches tracking off",
    )
    experiment: Annotated[str | None, BeforeValidator(_experiment)] = Field(
        None,
        validate_default=True,
        description="the MLflow experiment; null: MLFLOW_EXPERIMENT_NAME if set, else "
        f"{DEFAULT_EXPERIMENT} (a name in the file or in --set wins over the variable)",
    )
    artifact_location: str | None = Field(
        None, description="artifact root of a new experiment; null: `<run_dir>/mlartifacts`"
    )


class RayConfig(Strict):
    """Where and with what the Ray parts run."""

    address: str | None = Field(
        None, description="a Ray cluster to join; null: RAY_ADDRESS if set, else a new local one"
    )
    num_cpus: PositiveInt | None = Field(
        None, description="CPUs of a new local instance (ignored when joining a cluster)"
    )
    object_store_memory: PositiveInt | None = Field(
        None, description="object store bytes of a new local instance (ignored on a cluster)"
    )
    num_workers: NonNegInt = Field(
        1, description="Ray Train workers; 0 runs the training loop in-process (debugging)"
    )
    cpus_per_worker: PositiveFloat = Field(1.0, description="logical CPUs per Ray Train worker")
    use_gpu: bool = Field(
        False,
        description="one GPU per Ray Train worker, and per scoring actor unless "
        "scoring.gpus_per_actor says otherwise",
    )


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


_run_name.constraint = "(a plain folder name)"


class PipelineConfig(Strict):
    """The whole pipeline."""

    name: Annotated[str, AfterValidator(_run_name)] = Field(
        "demo",
        description="the run's name: the run directory is `runs/<name>` unless `--run-dir` says "
        "otherwise",
    )
    seed: int = Field(
        0,
        description="seeds the PGD random starts of the `evaluate` stage (row i's start in "
        "restart r comes from (seed, i, r)), so robust accuracy is reproducible. It is part of "
        "the margin model's and the training recipe's fingerprints, so changing it retrains "
        "them on `puma-ray run`; training itself is seeded by training.seed (and "
        "margin_model.train.seed), pruning by pruning.seed, builtin data by its source's seed",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the samples")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="the network trained on the kept set"
    )
    margin_model: MarginModelConfig = Field(
        default_factory=MarginModelConfig, description="the model whose margins rank the samples"
    )
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="DeepFool scoring")
    pruning: PruningConfig = Field(
        default_factory=PruningConfig, description="the kept set and its epsilons"
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="the recipe trained on the kept set"
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="clean and robust accuracy"
    )
    sweep: SweepConfig = Field(
        default_factory=SweepConfig, description="Ray Tune sweeps (`puma-ray sweep`)"
    )
    compare: list[Literal["full", "random"]] = Field(
        default_factory=list,
        description="baselines `puma-ray run` also trains with the same recipe and evaluates "
        "beside PUMA: `full` (no pruning, uniform epsilon) and `random` (a random subset at "
        "pruning.ratio); `--compare` sets both",
    )
    seeds: PositiveInt = Field(
        1,
        description="training seeds per method on `puma-ray run` (`--seeds N`): PUMA and each "
        "baseline are trained N times on their kept set with training.seed + 0..N-1 (the "
        "random baseline also draws its subset with pruning.seed + k), and the end table "
        "reports mean and 95% interval over the seeds and the paired difference to full data; "
        "the margin model, scores and PUMA's kept set are computed once",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray resources")


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
        exc = (err.get("ctx") or {}).get("error")
        if isinstance(exc, SubPathError):
            loc += exc.path if exc.path.startswith("[") or not loc else f".{exc.path}"
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
    if parts[:2] == ["sweep", "space"] and len(parts) > 2:
        # search keys hold dots: sweep.space.pruning.ratio is the key "pruning.ratio", and
        # sweep.space.pruning.ratio.grid=[...] makes it that one dimension
        rest = parts[2:]
        if len(rest) > 1 and rest[-1] in SEARCH_KINDS:
            rest, parsed = rest[:-1], {rest[-1]: parsed}
        parts = ["sweep", "space", ".".join(rest)]
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
        elif value is None and parts[:2] == ["sweep", "space"] and len(parts) == 3:
            node.pop(parts[-1], None)  # --set sweep.space.KEY=null drops that dimension
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


# Mappings that are one value, not a section: written in a file, they replace the default
# whole (a file's search space must not also sweep the default space's keys). Lists always do.
WHOLE_MAPPINGS = ("sweep.space", "model.kwargs", "margin_model.model.kwargs")


def _merge(base: dict[str, Any], top: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Sections merge key by key; lists, scalars and the WHOLE_MAPPINGS in `top` replace
    those in `base`."""
    out = dict(base)
    for key, value in top.items():
        where = f"{path}.{key}" if path else key
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and where not in WHOLE_MAPPINGS
        ):
            out[key] = _merge(out[key], value, where)
        else:
            out[key] = value
    return out


def default_raw() -> dict[str, Any]:
    """The schema defaults as a plain dict, in the same form a YAML file has."""
    return PipelineConfig().model_dump(mode="json")


DEMO_OVERRIDES = [
    # less pixel noise than the generator's default (0.12), so a small CNN learns the robust
    # shape feature in the few epochs the demo can afford
    "data.sources=[{type: builtin, real_train: 2000, real_test: 1000, synthetic: 4500, "
    "noise: 0.05}]",
    # a quarter of the 2,000 real rows (~50 per class) is the validation split: ~6,000 train
    "data.validation=0.25",
    "data.rows_per_shard=2000",
    # the margin model ships with the package (a robust small CNN for exactly this data, made
    # by scripts/train_demo_margin_model.py), as a paper-scale run takes a published robust
    # model; `puma-ray run --train-margin-model` trains it instead (margin_model.train)
    "margin_model.checkpoint=puma_ray:demo_margin_model.pt",
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
    "evaluation.chunk_rows=250",  # two 1-thread evaluation tasks use both cores
    "evaluation.epoch_subset=200",
    "evaluation.epoch_pgd_steps=5",
    # two 1-thread DDP workers use both cores and leave a CPU slot for Ray Data's read tasks
    "ray.num_workers=2",
    "ray.cpus_per_worker=0.5",
]


def load_config(
    path: str | os.PathLike | PipelineConfig | None = None,
    overrides: list[str] | None = None,
    *,
    smoke_test: bool = False,
    log=None,
) -> PipelineConfig:
    """Read a YAML config (or, with no path, the embedded demo; or a PipelineConfig, to apply
    overrides to it), apply overrides, validate. A file's missing keys take the schema defaults
    (the full recipe), not the demo's sizes. `smoke_test` shrinks the result
    (`smoke_test_overrides`; its notes go to `log`, default stderr)."""
    if isinstance(path, PipelineConfig):
        raw, source, first = path.model_dump(mode="json"), "<config>", []
    else:
        # Start from the defaults so `--set data.sources.0.noise=0.2` finds the list it indexes.
        raw = _merge(default_raw(), read_yaml(path) if path is not None else {})
        source = os.fspath(path) if path is not None else "<default>"
        first = DEMO_OVERRIDES if path is None else []
    # the demo, then the user's --set values (which win)
    overrides = list(overrides or [])
    raw = apply_overrides(raw, first + overrides)
    if smoke_test:
        # shrink what that resolved config asks for; the --set values still win, and then the
        # smoke test's own run name and experiment always apply
        raw = validate(raw, source).model_dump(mode="json")  # a bad value: its one line first
        notes: list[str] = []
        # (not those inside data.sources: the shrunk list was made from them, and a stand-in
        # source has not the keys of the one it replaces)
        again = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("data.sources")]
        from puma_ray.smoke import smoke_test_names, smoke_test_overrides

        raw = apply_overrides(raw, smoke_test_overrides(raw, notes) + again)
        raw = apply_overrides(raw, smoke_test_names(raw))
        for note in notes:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(note)
    return validate(raw, source)


def dump_yaml(cfg: PipelineConfig) -> str:
    """The config as YAML; each search dimension shows only the kind it has."""
    raw = cfg.model_dump(mode="json")
    space = raw["sweep"]["space"]
    for key, dim in space.items():
        space[key] = {k: v for k, v in dim.items() if v is not None}
    return yaml.safe_dump(raw, sort_keys=False)
