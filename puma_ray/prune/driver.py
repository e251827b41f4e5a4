"""`run_prune`, the prune stage: check the config and its inputs (scores, embeddings), skip when
the kept set's fingerprint matches, find the cut keys with the selection passes, write every
shard's kept rows, then the margin histogram and, last, the manifest."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict

from puma_ray import outputs, selection, storage
from puma_ray.config import PipelineConfig
from puma_ray.errors import ConfigError, DataError
from puma_ray.prune.extrapolate import _extrapolate
from puma_ray.prune.layout import (
    _KEPT_LEGACY,
    FORMAT,
    MANIFEST,
    _fingerprint,
    _read_manifest,
    kept_dir,
)
from puma_ray.prune.passes import _map, _Totals, _use_ray, select_scalable
from puma_ray.prune.report import (
    PruneSummary,
    _describe,
    _group_report,
    _plot_hist,
    _threshold_lines,
)
from puma_ray.prune.shards import FLAGS, SOURCES, STATUSES, TREATMENTS, ShardInput, _write_task
from puma_ray.selection import SelectionParams


def _check_config(cfg: PipelineConfig, params: SelectionParams) -> None:
    rule = selection.EPS_RULES[params.eps_rule]
    if rule.compares_margin_with_eps and cfg.scoring.norm != cfg.training.attack.norm:
        raise ConfigError(
            f"pruning.eps_rule={params.eps_rule} compares margins with the training epsilon: "
            f"scoring.norm ({cfg.scoring.norm}) must equal training.attack.norm "
            f"({cfg.training.attack.norm})"
        )
    if params.eps_rule == "margin_cap" and params.eps_floor > params.eps:
        raise ConfigError(
            f"pruning.eps_floor ({params.eps_floor:g}) must not exceed training.attack.epsilon "
            f"({params.eps:g})"
        )


def _scores_input(cfg, run_dir, dataset, required: bool, log) -> dict | None:
    """The scores manifest if it belongs to this dataset; refuse (if required) otherwise."""
    path = storage.join(run_dir, "scores", MANIFEST)
    manifest = _read_manifest(path)
    problem = None
    if manifest is None:
        problem = f"{path}: no scores (run `puma-ray score` first)"
    elif manifest.get("state", {}).get("dataset_fingerprint") != dataset.info.fingerprint:
        problem = (
            f"{path}: the scores belong to a different dataset (fingerprint "
            f"{manifest.get('state', {}).get('dataset_fingerprint')}, data/train has "
            f"{dataset.info.fingerprint}); rerun `puma-ray score`"
        )
    if problem is None:
        return manifest
    if required:
        raise DataError(problem)
    if manifest is not None:
        log(f"prune: ignoring scores ({problem})")
    return None


def _embeddings_input(run_dir, dataset) -> dict:
    path = storage.join(run_dir, "embeddings", MANIFEST)
    manifest = _read_manifest(path)
    if manifest is None:
        raise DataError(
            f"{path}: no embeddings (pruning.strategy=extrapolated needs them: run "
            "`puma-ray score --embeddings` first)"
        )
    if manifest.get("state", {}).get("dataset_fingerprint") != dataset.info.fingerprint:
        raise DataError(f"{path}: embeddings belong to a different dataset; rerun scoring")
    return manifest


def run_prune(
    cfg: PipelineConfig,
    run_dir: str,
    *,
    force: bool = False,
    parallel: bool = True,
    out_dir: str | None = None,
    collect_limit: int = 1 << 16,
    log: Callable[[str], None] = print,
) -> PruneSummary:
    """Select the kept set of `cfg.pruning` and write it to `<run_dir>/kept` (or `out_dir`).

    Uses Ray tasks when Ray is initialised (and `parallel`), else runs the same passes here.
    Skips when the manifest's fingerprint (inputs + parameters) matches, unless `force`. Bad
    input raises ConfigError/DataError before anything is written."""
    start = time.perf_counter()
    from puma_ray.data import dataset_dirs, open_dataset

    p = cfg.pruning
    out_dir = out_dir or kept_dir(run_dir)
    # before any work: a kept set replaces only a directory that is ours (or empty / new)
    outputs.check_clearable(out_dir, "kept", legacy=_KEPT_LEGACY)
    try:
        params = SelectionParams.from_config(p, cfg.training.attack.epsilon)
    except ValueError as e:
        raise ConfigError(f"pruning: {e}") from None
    _check_config(cfg, params)
    dataset = open_dataset(dataset_dirs(run_dir)[0])
    info = dataset.info
    names = [os.path.basename(f).rsplit(".", 1)[0] for f in dataset.files]
    extrapolated = p.strategy == "extrapolated"
    scores = _scores_input(cfg, run_dir, dataset, params.needs_margins or extrapolated, log)
    embeddings = _embeddings_input(run_dir, dataset) if extrapolated else None
    scoring_norm = scores["state"].get("deepfool", {}).get("norm") if scores else None
    _check_scoring_norm(cfg, params, scoring_norm)
    fps, parameters, fingerprint = _fingerprints(
        cfg, params, info, scores, embeddings, scoring_norm
    )
    manifest_path = storage.join(out_dir, MANIFEST)
    old = _read_manifest(manifest_path) if not force else None
    if old is not None and old.get("fingerprint") == fingerprint:
        return PruneSummary(**{**old["summary"], "skipped_stage": True})

    use_ray = _use_ray(parallel)
    shards, extra = _shard_inputs(
        cfg,
        run_dir,
        dataset,
        names,
        fps,
        scored=scores is not None,
        use_ray=use_ray,
        force=force,
        log=log,
    )
    plans, cuts, passes = select_scalable(
        shards, params, info.num_classes, parallel=parallel, collect_limit=collect_limit, log=log
    )

    # Inputs are valid: replace the old kept set, manifest first so it never looks complete.
    outputs.clear(out_dir, "kept", legacy=_KEPT_LEGACY)
    totals, counts = _write_kept(shards, params, cuts, info, out_dir, use_ray)

    if totals.hist is not None:
        _plot_hist(storage.join(out_dir, "margin_hist.png"), totals.hist, _describe(params, cfg))
    groups = _group_report(plans, cuts, totals.counts, params, info.class_names)
    summary = PruneSummary(
        out_dir=out_dir,
        strategy=p.strategy,
        description=_describe(params, cfg),
        rows=counts["rows"],
        kept=counts["kept"],
        pruned=counts["pruned"],
        eps_adjusted=counts["eps_adjusted"],
        per_source=_per_source(totals),
        thresholds=_threshold_lines(groups, params),
        eps_base=params.eps,
        eps_min=counts["eps_min"],
        eps_mean=counts["eps_mean"],
        mode="ray tasks" if use_ray else "in-process",
        passes=passes,
        shards=len(shards),
        wall_s=time.perf_counter() - start,
        extrapolation=extra,
        policies=_policy_report(totals, params, extrapolated),
    )
    manifest = _manifest(
        summary,
        params,
        info,
        fingerprint=fingerprint,
        parameters=parameters,
        fps=fps,
        counts=counts,
        totals=totals,
        groups=groups,
        collect_limit=collect_limit,
    )
    storage.atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return summary


# ----------------------------------------------------------------------------------------------
# The steps of run_prune, in its order.


def _check_scoring_norm(cfg: PipelineConfig, params: SelectionParams, scoring_norm) -> None:
    """An eps rule that compares margins with the training eps needs scores in its norm."""
    if selection.EPS_RULES[params.eps_rule].compares_margin_with_eps:
        if scoring_norm != cfg.training.attack.norm:
            raise ConfigError(
                f"pruning.eps_rule={params.eps_rule}: the scores were measured in "
                f"{scoring_norm} (scoring.norm) but training.attack.norm is "
                f"{cfg.training.attack.norm}; rescore with scoring.norm="
                f"{cfg.training.attack.norm}"
            )


def _fingerprints(
    cfg: PipelineConfig, params: SelectionParams, info, scores, embeddings, scoring_norm
):
    """(input fingerprints, parameters, fingerprint of both): what the manifest records and a
    rerun compares to decide the kept set is up to date."""
    fps = {
        "dataset": info.fingerprint,
        "scores": scores.get("state_fingerprint") if scores else None,
        "embeddings": embeddings.get("state_fingerprint") if embeddings else None,
    }
    parameters = {
        "pruning": cfg.pruning.model_dump(mode="json"),
        "resolved": asdict(params),
        "training_attack": cfg.training.attack.model_dump(mode="json"),
        "scoring_norm": scoring_norm,
    }
    fingerprint = _fingerprint({"format": FORMAT, "inputs": fps, "parameters": parameters})
    return fps, parameters, fingerprint


def _shard_inputs(
    cfg: PipelineConfig,
    run_dir: str,
    dataset,
    names,
    fps: dict,
    *,
    scored: bool,
    use_ray,
    force,
    log,
) -> tuple[list[ShardInput], dict | None]:
    """What the selection reads per sample shard: the extrapolated margins (computed first
    unless cached), its score shard, or without scores the sample shard itself (no margins);
    and the extrapolation's summary (None unless extrapolated)."""
    if cfg.pruning.strategy == "extrapolated":
        return _extrapolate(
            cfg, run_dir, dataset, names, fps, use_ray=use_ray, force=force, log=log
        )
    if scored:
        shards = [
            ShardInput(n, storage.join(run_dir, "scores", f"shard={n}"), sample=f, flags="scores")
            for n, f in zip(names, dataset.files, strict=True)
        ]
    else:
        shards = [
            ShardInput(n, f, sample=f, has_margin=False, flags=None)
            for n, f in zip(names, dataset.files, strict=True)
        ]
    return shards, None


def _write_kept(shards, params: SelectionParams, cuts: dict, info, out_dir: str, use_ray: bool):
    """The write pass: every shard's kept rows into `out_dir`; returns the summed stats (shards
    sorted by file) and their counts, after checking every row of the dataset was seen."""
    totals = _Totals(info.num_classes)
    for stats in _map(_write_task, shards, (params, cuts, info.num_classes, out_dir), use_ray):
        totals.add(stats)
    counts = totals.as_dict()
    if counts["rows"] != info.num_rows:
        raise DataError(f"{out_dir}: saw {counts['rows']} rows, dataset has {info.num_rows}")
    totals.shards.sort(key=lambda s: s["file"])
    return totals, counts


def _per_source(totals: _Totals) -> dict[str, dict[str, int]]:
    """Rows, kept, pruned and eps-adjusted counts per source (real / synthetic)."""
    return {
        src: {
            "rows": int(totals.counts[:, s].sum()),
            "kept": int(totals.counts[:, s, :2].sum()),
            "pruned": int(totals.counts[:, s, 2].sum()),
            "eps_adjusted": int(totals.counts[:, s, 1].sum()),
        }
        for s, src in enumerate(SOURCES)
    }


def _policy_report(totals: _Totals, params: SelectionParams, extrapolated: bool) -> dict | None:
    """Per row flag (misclassified, non-converged): the policy, how many rows have the flag (in
    scope or not), how the policy treated the in-scope ones and what became of them. None when
    the rows carry no flags (no scores)."""
    if totals.flags is None:
        return None
    known = (
        "scored rows only: estimated rows count as correctly classified and converged"
        if extrapolated
        else "every row: pred != label and converged of its score"
    )
    policy = {"misclassified": params.misclassified, "nonconverged": params.nonconverged}
    out: dict = {"flags_known_for": known}
    for f, flag in enumerate(FLAGS):
        c = totals.flags[f]
        in_scope = c[1:]
        out[flag] = {
            "policy": policy[flag] if params.order == "margin" else f"none ({params.strategy})",
            "rows": int(c.sum()),
            "in_scope": int(in_scope.sum()),
            "treated": {t: int(in_scope[i].sum()) for i, t in enumerate(TREATMENTS)},
            "outcome": {
                ("kept_base_eps" if s == "kept" else s): int(in_scope[:, j].sum())
                for j, s in enumerate(STATUSES)
            },
        }
    return out


def _manifest(
    summary: PruneSummary,
    params: SelectionParams,
    info,
    *,
    fingerprint: str,
    parameters: dict,
    fps: dict,
    counts: dict,
    totals: _Totals,
    groups: list[dict],
    collect_limit: int,
) -> dict:
    """`manifest.json` of the kept set: written last, it is what makes the kept set finished."""
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "strategy": summary.strategy,
        "base_strategy": params.strategy,
        "order": (
            "(tier, margin, id) ascending" if params.order == "margin" else "(hash(seed, id), id)"
        ),
        "parameters": parameters,
        "inputs": fps,
        "counts": {
            **{k: counts[k] for k in ("rows", "kept", "pruned", "eps_adjusted")},
            "per_source": summary.per_source,
            "per_class": [
                {
                    "class": c,
                    "name": info.class_names[c] if c < len(info.class_names) else str(c),
                    **{
                        s: int(totals.counts[c, :, j].sum())
                        for j, s in enumerate(("kept_base_eps", "eps_adjusted", "pruned"))
                    },
                    "kept": int(totals.counts[c, :, :2].sum()),
                }
                for c in range(info.num_classes)
            ],
        },
        "groups": groups,
        "eps": {"base": params.eps, "min": counts["eps_min"], "mean": counts["eps_mean"]},
        "selection_digest": counts["digest"],
        "extrapolation": summary.extrapolation,
        "policies": summary.policies,
        "shards": totals.shards,
        "selection": {
            "mode": summary.mode,
            "passes": summary.passes,
            "collect_limit": collect_limit,
        },
        "summary": asdict(summary),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
