"""`puma-ray run --dry-run`: what a run would do, stage by stage (run or skip, and why), and
whether the resources each stage asks for exist, without running, writing or locking anything.

Why a stage reruns: `pipeline.json` keeps, next to each finished stage's fingerprint, the config
keys and input-file hashes it was computed from (`stage_inputs`), so a plan names the keys that
changed (`pruning.ratio: 0.3 -> 0.5`) or the file that did; a stage whose own inputs are
unchanged reruns because a stage it reads reruns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from puma_ray.config import PipelineConfig

# The config sections (or single keys) each stage's output depends on, as in
# `stages.stage_fingerprints`; seeded stages (`train_s1`) read those of their base stage.
SECTIONS = {
    "ingest": ("data",),
    "margin_model": ("margin_model", "seed"),
    "score": ("scoring",),
    "prune": ("pruning", "training.attack"),
    "train": ("model", "training", "seed"),
    "evaluate": ("evaluation",),
    "baseline_random": (
        "pruning.ratio",
        "pruning.scope",
        "pruning.per_class",
        "pruning.seed",
        "model",
        "training",
        "seed",
        "evaluation",
    ),
    "baseline_full": ("model", "training", "seed", "evaluation"),
}
_FILES = {
    "ingest": "data",
    "margin_model": "margin_checkpoint",
    **{stage: "init_from" for stage in ("train", "baseline_random", "baseline_full")},
}


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = value


def _at(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def stage_inputs(cfg: PipelineConfig, stage: str, stamps: dict[str, Any]) -> dict[str, Any]:
    """The flat config keys (and input-file hashes, `files.*`) `stage`'s output depends on."""
    from puma_ray.stages import seeded_config, split_seed

    base, k = split_seed(stage)
    d = seeded_config(cfg, k).model_dump(mode="json")
    out: dict[str, Any] = {}
    for section in SECTIONS.get(base, ()):
        _flat(_at(d, section), section, out)
    if base in _FILES and _FILES[base] in stamps:
        _flat(stamps[_FILES[base]], f"files.{_FILES[base]}", out)
    return out


def _changes(old: dict[str, Any], new: dict[str, Any], most: int = 3) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:most]]
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return "; ".join(shown) + more


def _short(v: Any) -> str:
    text = "unset" if v is None else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StagePlan:
    stage: str
    action: str  # run | skip
    why: str


@dataclass
class RunPlan:
    run_dir: str
    stages: list[StagePlan] = field(default_factory=list)
    resources: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"run --dry-run: what `puma-ray run` would do in {self.run_dir} (nothing ran)"]
        lines.append(f"  {'stage':<22}{'':<6}why")
        lines += [f"  {s.stage:<22}{s.action:<6}{s.why}" for s in self.stages]
        if self.resources:
            lines.append("  resources")
            lines += [f"    {r}" for r in self.resources]
        return "\n".join(lines)


def _why(stage, fp, state, saved_inputs, current, forced, running) -> tuple[str, str]:
    from puma_ray.stages import _reads

    upstream = _reads(stage)
    if stage in forced:
        return "run", "--force"
    if state.is_current(stage, fp):
        return "skip", "up to date"
    if stage not in state.done:
        return "run", "not run yet (or interrupted)"
    if upstream in running:
        return "run", f"reads {upstream}'s new output"
    old = saved_inputs.get(stage)
    if old is None:
        return "run", "its inputs changed (recorded by an older puma-ray: no detail)"
    what = _changes(old, current)
    return "run", what or "its inputs changed (a puma-ray version with other fingerprints)"


def plan_run(cfg: PipelineConfig, run_dir: str, force: tuple[str, ...] = ()) -> RunPlan:
    """The plan of `puma-ray run` for `cfg` in `run_dir`: reads pipeline.json and the input
    files' hashes (cached), starts nothing."""
    from puma_ray.pipeline import PipelineState
    from puma_ray.stages import (
        check_force,
        forced_stages,
        input_stamps,
        stage_fingerprints,
        stages_of,
    )

    stages = stages_of(cfg)
    check_force(stages, force)
    stamps = input_stamps(cfg, run_dir, cache=False)
    fps = stage_fingerprints(cfg, stamps)
    state = PipelineState(run_dir)
    forced = forced_stages(stages, force)
    plan, running = RunPlan(run_dir), set()
    for stage in stages:
        current = stage_inputs(cfg, stage, stamps)
        action, why = _why(stage, fps[stage], state, state.inputs, current, forced, running)
        if stage == "margin_model" and cfg.margin_model.given and action == "run":
            given = (
                cfg.margin_model.checkpoint or f"robustbench:{cfg.margin_model.robustbench.name}"
            )
            why = f"given ({given}): nothing to train, its content hash is recorded"
        if action == "run":
            running.add(stage)
        plan.stages.append(StagePlan(stage, action, why))
    plan.resources = _resources(cfg, running)
    return plan


def _resources(cfg: PipelineConfig, running: set[str]) -> list[str]:
    """One line per Ray stage that will run: its request and whether the cluster can ever hold
    it (a local instance: this machine's CPUs and GPUs; joining a cluster: Ray is asked)."""
    import os

    from puma_ray import runtime
    from puma_ray.smoke import local_resources

    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    nodes = None
    if not joined:
        cpus, gpus = local_resources()
        nodes = [{"CPU": float(cfg.ray.num_cpus or cpus), "GPU": float(gpus)}]
    else:
        runtime.ensure_ray(cfg.ray)
    out = []
    requests = runtime.stage_requests(cfg)
    for stage, (bundle, count) in requests.items():
        names = [s for s in running if s == stage or s.startswith(f"{stage}_s")]
        if stage == "train":
            names += [s for s in running if s.startswith("baseline_")]
        if stage == "margin_model" and cfg.margin_model.given:
            names = []
        if not names:
            continue
        local = {} if joined else {"nodes": nodes, "node_types": []}
        problem = runtime.infeasibility(bundle, stage, count, **local)
        shown = ", ".join(f"{k}: {v:g}" for k, v in bundle.items() if v)
        verdict = "fits" if problem is None else f"NEVER FITS: {problem}"
        out.append(f"{stage}: {count} x {{{shown}}}: {verdict}")
    return out


def plan_sweep_run(cfg: PipelineConfig, run_dir: str) -> str:
    """`puma-ray sweep --dry-run`: the shared input stages (run or skip, why), every trial of
    the plan, and what one trial asks for. Checks the search space as a sweep would."""
    from puma_ray.sweep.driver import trial_resources
    from puma_ray.sweep.plan import _describe, plan_sweep

    plan = plan_sweep(cfg)  # a bad search space is refused here, as by `sweep`
    inputs = plan_run(cfg, run_dir)
    lines = [f"sweep --dry-run: {plan.trials} trials in {run_dir} (nothing ran)"]
    lines.append("  inputs, shared by every trial (the pipeline's stages):")
    for s in inputs.stages:
        if s.stage in ("ingest", "margin_model", "score"):
            lines.append(f"    {s.stage:<20}{s.action:<6}{s.why}")
    lines.append(
        f"  trials ({plan.num_samples} sample{'s' if plan.num_samples > 1 else ''} of each):"
    )
    lines += [f"    {i + 1:>3}. {_describe(p)}" for i, p in enumerate(plan.points)]
    for dim, d in cfg.sweep.space.items():
        for setting in d.settings or []:
            keys = {k: v for k, v in setting.items() if k != "name"}
            lines.append(f"    {dim}={setting['name']}: {_describe(keys)}")
    if plan.sampled:
        lines.append(f"    each crossed with draws of: {', '.join(plan.sampled)}")
    shown = ", ".join(f"{k}: {v:g}" for k, v in trial_resources(cfg).items() if k == "CPU")
    lines.append(
        f"  a trial: Tune holds {{{shown}}} for its process, then trains with "
        f"{cfg.ray.num_workers or 'in-process'} worker(s); up to "
        f"{cfg.sweep.max_concurrent_trials} at once (fewer if they do not fit)"
    )
    lines += [f"    {r}" for r in inputs.resources if r.startswith(("train", "score"))]
    return "\n".join(lines)
