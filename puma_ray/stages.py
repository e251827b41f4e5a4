"""The stages of `puma-ray run` and what each one's result depends on: their names (one per
extra training seed and per baseline too), which stage reads which, and the input fingerprint of
each (the config sections it reads, the content of the files it reads from outside the run dir,
and the fingerprints of the stages it consumes). `pipeline` runs them; `dry_run` explains them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from puma_ray.config import PipelineConfig
from puma_ray.errors import ConfigError

STAGES = ("ingest", "margin_model", "score", "prune", "train", "evaluate")
BASELINES = ("random", "full")
# Stages repeated once per extra training seed (`seeds`): `train_s1`, `evaluate_s1`, ...
SEEDED = ("train", "evaluate", *(f"baseline_{b}" for b in BASELINES))


def seed_suffix(k: int) -> str:
    """The suffix of seed k's stage and folder names: '' for the first seed, else '_s<k>'."""
    return f"_s{k}" if k else ""


def split_seed(stage: str) -> tuple[str, int]:
    """('train', 2) for 'train_s2'; (stage, 0) for a stage without a seed suffix."""
    base, _, k = stage.rpartition("_s")
    return (base, int(k)) if base in SEEDED and k.isdigit() else (stage, 0)


def stages_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: the six of the mission, then one per baseline; with
    `seeds: N`, training and evaluation (and each baseline) once more per extra seed."""
    seeds = range(1, cfg.seeds)
    extra = tuple(f"{s}{seed_suffix(k)}" for k in seeds for s in ("train", "evaluate"))
    baselines = tuple(
        f"baseline_{b}{seed_suffix(k)}"
        for b in BASELINES
        if b in cfg.compare
        for k in range(cfg.seeds)
    )
    return STAGES + extra + baselines


def _reads(stage: str) -> str | None:
    """The stage whose output `stage` reads (None for ingest)."""
    base, k = split_seed(stage)
    if base.startswith("baseline_"):
        return "ingest"
    if base == "train":
        return "prune"
    if base == "evaluate":
        return f"train{seed_suffix(k)}"
    return {"margin_model": "ingest", "score": "margin_model", "prune": "score"}.get(stage)


def _downstream(stages: tuple[str, ...], name: str) -> tuple[str, ...]:
    """`name` and every stage that reads its output, directly or through another: the rest of
    the main chain; the baselines read only the ingested data."""
    out = [name]
    for stage in stages:  # in run order, so a stage's input is met before the stage
        if stage not in out and _reads(stage) in out:
            out.append(stage)
    return tuple(s for s in stages if s in out)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_dump(training: dict[str, Any]) -> dict[str, Any]:
    """A dumped training section as fingerprints take it: without `init_from` when it is unset,
    so a recipe keeps the fingerprint it had before the key existed."""
    return {k: v for k, v in training.items() if not (k == "init_from" and v is None)}


def input_stamps(cfg: PipelineConfig, run_dir: str, *, cache: bool = True) -> dict[str, Any]:
    """Content hashes of the files outside the run dir that stages read: npz and torchvision
    sources, `margin_model.checkpoint` or the RobustBench weights (fetched first when
    `download` is set; missing: a one-line error before any stage runs), and the initial
    weights of `training.init_from` (`model_fingerprint`, not cached). sha256, cached in the
    run dir by file stat (size, mtime, ctime, inode), so a large source is read again only when
    it changed (`cache=False`: hashed, nothing written)."""
    from puma_ray.ingest import source_stamps

    out: dict[str, Any] = {}
    sources = source_stamps(cfg.data, run_dir if cache else None)
    if any(s is not None for s in sources):
        out["data"] = sources
    if cfg.margin_model.given:
        from puma_ray.models.zoo import margin_model_stamp

        out["margin_checkpoint"] = margin_model_stamp(cfg, run_dir if cache else None)
    if cfg.training.init_from is not None:
        from puma_ray.train.init import init_stamp

        out["init_from"] = init_stamp(cfg)
    return out


def stage_fingerprints(cfg: PipelineConfig, inputs: dict[str, Any] | None = None) -> dict[str, str]:
    """What each stage's result depends on: the config sections it reads, the fingerprints of
    the stages it consumes and (`inputs`, from `input_stamps`) the content of the files it
    reads from outside the run dir, so a source or checkpoint replaced in place is noticed.
    Resources (Ray address, workers) are left out: they change how fast a stage runs, not
    what it produces."""
    inputs = inputs or {}
    d = cfg.model_dump(mode="json")
    fp: dict[str, str] = {}
    # without external files (builtin data) the fingerprints are those of earlier versions
    fp["ingest"] = _hash([d["data"], inputs["data"]] if "data" in inputs else d["data"])
    zoo = d["margin_model"]["robustbench"]
    margin_inputs = (
        {"checkpoint": d["margin_model"]["checkpoint"]}
        if cfg.margin_model.checkpoint
        # where the weights are staged (model_dir) and `download` do not change the model
        else {"robustbench": {k: zoo[k] for k in ("name", "dataset", "threat_model")}}
        if zoo["name"]
        else {"model": d["margin_model"]["model"], "train": recipe_dump(d["margin_model"]["train"])}
    )
    if "margin_checkpoint" in inputs:
        margin_inputs["sha256"] = inputs["margin_checkpoint"]
    fp["margin_model"] = _hash([fp["ingest"], margin_inputs, d["seed"]])
    fp["score"] = _hash([fp["margin_model"], d["scoring"]])
    fp["prune"] = _hash([fp["score"], d["pruning"], d["training"]["attack"]])
    for k in range(cfg.seeds):
        # seed k's stages: the first keeps the fingerprints it had before `seeds` existed
        dk = d if k == 0 else seeded_config(cfg, k).model_dump(mode="json")
        sfx = seed_suffix(k)
        recipe = [dk["model"], recipe_dump(dk["training"]), dk["seed"]]
        if "init_from" in inputs:  # the initial weights' content (training.init_from)
            recipe.append({"init_from": inputs["init_from"]})
        fp[f"train{sfx}"] = _hash([fp["prune"], *recipe])
        fp[f"evaluate{sfx}"] = _hash([fp[f"train{sfx}"], dk["evaluation"]])
        # The baselines read neither scores nor the PUMA kept set: only the data, the recipe
        # and the parameters a random subset shares with the pruned run (ratio, scope,
        # classes, seed).
        p = dk["pruning"]
        random_cut = {key: p[key] for key in ("ratio", "scope", "per_class", "seed")}
        fp[f"baseline_random{sfx}"] = _hash([fp["ingest"], random_cut, *recipe, dk["evaluation"]])
        fp[f"baseline_full{sfx}"] = _hash([fp["ingest"], *recipe, dk["evaluation"]])
    return fp


def seeded_config(cfg: PipelineConfig, k: int) -> PipelineConfig:
    """Seed k's copy of the config: training.seed + k and, for a random subset, pruning.seed
    + k (PUMA's kept set does not depend on pruning.seed, so it is shared by every seed)."""
    if k == 0:
        return cfg
    out = cfg.model_copy(deep=True)
    out.training.seed = cfg.training.seed + k
    out.pruning.seed = cfg.pruning.seed + k
    return out


def margin_model_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the margin model is trained with: the same pipeline, its own model/recipe."""
    out = cfg.model_copy(deep=True)
    out.model = cfg.margin_model.model.model_copy(deep=True)
    out.training = cfg.margin_model.train.model_copy(deep=True)
    return out


def random_baseline_config(cfg: PipelineConfig) -> PipelineConfig:
    """Random sub-sampling at the same ratio and scope, every kept sample at the base eps."""
    out = cfg.model_copy(deep=True)
    out.pruning.strategy = "random"
    out.pruning.eps_rule = "none"
    return out


# Stage folders of a run dir (those of `run` and of the single-stage commands): where a killed
# run may have left temp files, swept by the next run while it holds the lock.
def stage_dirs(seeds: int) -> tuple[str, ...]:
    """The run dir's stage folders for a run with `seeds` training seeds."""
    sfx = [seed_suffix(k) for k in range(seeds)]
    methods = [f"{m}{s}" for m in ("", "_random", "_full") for s in sfx]
    return (
        "data/train",
        "data/val",
        "data/test",
        "margin_model",
        "scores",
        "embeddings",
        "extrapolated",
        "kept",
        *(f"kept_random{s}" for s in sfx),
        *(f"{kind}{m}" for kind in ("train", "evaluate") for m in methods),
    )


def check_force(stages: tuple[str, ...], force: tuple[str, ...]) -> None:
    """`--force STAGE` names a stage of this run (or a seeded stage's base name)."""
    for stage in force:
        if stage not in stages and stage not in {split_seed(s)[0] for s in stages}:
            raise ConfigError(f"--force {stage}: unknown stage (stages: {', '.join(stages)})")


def forced_stages(stages: tuple[str, ...], force: tuple[str, ...]) -> set[str]:
    """`--force STAGE`: that stage and every stage that consumes its output (`_downstream`);
    a seeded stage's name (`train`, `baseline_full`) forces it for every seed."""
    named = {s for f in force for s in stages if f in (s, split_seed(s)[0])}
    return {s for f in named for s in _downstream(stages, f)}
