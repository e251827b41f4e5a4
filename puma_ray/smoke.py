"""`--smoke-test`: a smoke test of *this* config on this machine, in minutes, in a run dir and
MLflow experiment of its own: the overrides that shrink a resolved config (data, model width,
epochs, attacks, resources), the names it writes under, and what counts as "here" offline.
`puma_ray.config.load_config(..., smoke_test=True)` applies them."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ValidationError

from puma_ray.config import BuiltinSource, NpzSource, TorchvisionSource, _experiment

# `--smoke-test`: a few minutes of this config on this machine, in its own run dir and
# experiment. Rows at most per source (the test split is never pruned, so it stays small).
SMOKE_ROWS = {"real_train": 512, "real_test": 256, "synthetic": 1024, "val": 128}
SMOKE_SUFFIX = "-smoke"
# the WideResNet family becomes a WRN-10-1 (the same blocks, activation and options); these
# others the small CNN
SMOKE_WRN = ("wrn28_10", "wrn34_10", "wrn70_16", "wide_resnet")
SMOKE_CNN = ("preact_resnet18",)
# the files torchvision reads under `root` (one per split), to tell offline whether they are there
TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"),
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test"),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
}


def local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of this machine, without importing torch: the CPUs this process may run
    on, and the NVIDIA GPUs the driver lists in /proc/driver/nvidia/gpus (none elsewhere),
    narrowed by CUDA_VISIBLE_DEVICES."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    try:
        gpus = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        gpus = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return cpus, gpus


def _here(path: str, joined: bool) -> bool:
    """Whether a source file can be read here: a local path that exists; a remote URI only when
    joining a cluster (a smoke test on this machine is offline); a packaged checkpoint
    (`puma_ray:<file>`) is always here."""
    if path.startswith("puma_ray:"):
        return True
    if "://" in path and not path.startswith("file://"):
        return joined
    return os.path.exists(os.path.expanduser(path.removeprefix("file://")))


def _full(model: type[BaseModel], raw: dict) -> dict | None:
    """`raw` with its schema defaults filled in; None if invalid (validation reports it)."""
    try:
        return model.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return None


def _smoke_sources(sources: list, joined: bool, notes: list[str]) -> list[str]:
    """Each source capped to SMOKE_ROWS; one not here (a missing file, a remote URI offline,
    torchvision files absent) replaced in its place by builtin rows of the same role (so the
    indices stay), said in `notes`."""
    kinds = {"builtin": BuiltinSource, "npz": NpzSource, "torchvision": TorchvisionSource}
    cap, out, missing, more = SMOKE_ROWS, [], [], []
    for i, given in enumerate(sources):
        kind = given.get("type", "builtin") if isinstance(given, dict) else None
        src = _full(kinds[kind], given) if kind in kinds else None
        if src is None:
            out.append(given)  # validation names the problem
            continue
        stand_in = {"type": "builtin", "real_train": 0, "real_test": 0, "synthetic": 0}
        if kind == "builtin":
            out.append({**src, **{k: min(src[k], cap[k]) for k in stand_in if k != "type"}})
            continue
        if kind == "npz":
            role = {"test": "real_test", "val": "val"}.get(
                src["split"], "real_train" if src["source"] == "real" else "synthetic"
            )
            if _here(src["path"], joined):
                out.append({**src, "limit": min(src["limit"] or cap[role], cap[role])})
                continue
            why = "remote, not read offline" if "://" in src["path"] else "no such file"
            missing.append(f"data.sources[{i}] (npz {src['path']}: {why})")
            if role == "val":  # builtin rows have no val split: carve one from them
                stand_in["real_train"] = cap["val"]
                more.append("data.validation=0.1")
            else:
                stand_in[role] = cap[role]
        else:
            root = os.path.expanduser(src["root"])
            files = TORCHVISION_FILES.get(src["name"], ())
            if all(os.path.exists(os.path.join(root, f)) for f in files):
                limits = {"limit_train": cap["real_train"], "limit_test": cap["real_test"]}
                out.append({**src, **{k: min(src[k] or v, v) for k, v in limits.items()}})
                continue
            missing.append(f"data.sources[{i}] (torchvision {src['name']}: no files in {root})")
            stand_in.update(real_train=cap["real_train"], real_test=cap["real_test"])
        out.append({**stand_in, "id_offset": src["id_offset"]})
    if missing:
        notes.append(f"smoke test: builtin data stands in for {' and '.join(missing)}")
    return [f"data.sources={json.dumps(out)}", *more]


def _smoke_model(model: dict) -> dict:
    arch, kwargs = model.get("arch"), dict(model.get("kwargs") or {})
    if arch in SMOKE_WRN:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("depth", "width")}
        return {"arch": "wide_resnet", "kwargs": {**kwargs, "depth": 10, "width": 1}}
    if arch in SMOKE_CNN:
        keep = ("in_channels", "mean", "std")
        return {"arch": "small_cnn", "kwargs": {k: v for k, v in kwargs.items() if k in keep}}
    return model


def _given_model_here(mm: dict, joined: bool, notes: list[str]) -> list[str]:
    """A margin-model checkpoint or zoo weights not here: train a margin model instead."""
    ckpt, zoo = mm.get("checkpoint"), mm.get("robustbench") or {}
    if ckpt and not _here(ckpt, joined):
        notes.append(f"smoke test: margin_model.checkpoint {ckpt} is not here; training one")
        return ["margin_model.checkpoint=null"]
    if zoo.get("name"):
        weights = os.path.join(
            zoo.get("model_dir", "models"),
            zoo.get("dataset", "cifar10"),
            zoo.get("threat_model", "Linf"),
            f"{zoo['name']}.pt",
        )
        if not os.path.exists(os.path.expanduser(weights)):
            notes.append(f"smoke test: {weights} is not here; training a margin model instead")
            return ["margin_model.robustbench.name=null"]
    return []


def smoke_test_overrides(raw: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """`--smoke-test`: the overrides that shrink the resolved config `raw` to a few minutes on
    this machine: data (builtin sizes, npz `limit`, torchvision limits; offline, builtin data
    stands in for sources that are not here, said in `notes`), model width (`SMOKE_WRN`,
    `SMOKE_CNN`), one epoch, short attacks, and on a local instance the resources this machine
    has (`local_resources`: no GPU without one, CPUs per worker and actor at most half of
    them). Joining a cluster, the per-worker resources stay (the cluster has them) and only the
    counts shrink. The run dir and experiment get their own names (`smoke_test_names`)."""
    notes = [] if notes is None else notes
    joined = bool((raw.get("ray") or {}).get("address") or os.environ.get("RAY_ADDRESS"))
    data, ray_, sc = raw["data"], raw["ray"], raw["scoring"]
    ev, sw = raw["evaluation"], raw["sweep"]
    out = _smoke_sources(data["sources"], joined, notes)
    out += _given_model_here(raw["margin_model"], joined, notes)
    if raw["training"].get("init_from"):  # its weights do not fit the shrunk model
        notes.append("smoke test: training.init_from is not used; training from a random init")
        out.append("training.init_from=null")
    out.append("data.rows_per_shard=512")
    if isinstance(data.get("validation"), int) and data["validation"] >= 1:
        out.append(f"data.validation={min(data['validation'], 64)}")
    out.append(f"model={json.dumps(_smoke_model(raw['model']))}")
    out.append(f"margin_model.model={json.dumps(_smoke_model(raw['margin_model']['model']))}")
    recipes = {"training": raw["training"], "margin_model.train": raw["margin_model"]["train"]}
    for key, recipe in recipes.items():
        out += [f"{key}.epochs=1", f"{key}.batch_size={min(recipe['batch_size'], 64)}"]
        out.append(f"{key}.attack.steps={min(recipe['attack']['steps'], 2)}")
        if recipe.get("samples_per_epoch"):
            out.append(f"{key}.samples_per_epoch={min(recipe['samples_per_epoch'], 512)}")
    out += [
        f"scoring.max_iter={min(sc['max_iter'], 10)}",
        f"scoring.batch_size={min(sc['batch_size'], 256)}",
        "scoring.pool_min=1",
        "scoring.pool_max=1",
        f"evaluation.subset={min(ev['subset'] or 128, 128)}",
        f"evaluation.chunk_rows={min(ev['chunk_rows'], 64)}",
        f"evaluation.pgd_steps={min(ev['pgd_steps'], 5)}",
        f"evaluation.epoch_subset={min(ev['epoch_subset'], 128)}",
        f"evaluation.epoch_pgd_steps={min(ev['epoch_pgd_steps'], 5)}",
        f"ray.num_workers={min(ray_['num_workers'], 1)}",
        "sweep.max_concurrent_trials=1",
        "sweep.num_samples=1",
        "seeds=1",
    ]
    if not joined:
        cpus, gpus = local_resources()
        cpus = max(2, cpus)  # 2 logical CPUs at least: a worker and Ray Data's reads
        half = cpus / 2
        out += [
            f"ray.num_cpus={cpus}",
            f"ray.cpus_per_worker={min(ray_['cpus_per_worker'], half):g}",
            f"ray.use_gpu={'true' if ray_['use_gpu'] and gpus else 'false'}",
            f"scoring.cpus_per_actor={min(sc['cpus_per_actor'], half):g}",
            f"scoring.gpus_per_actor={min(sc['gpus_per_actor'], 1) if gpus else 0:g}",
            f"sweep.trial_cpus={min(sw['trial_cpus'], half):g}",
        ]
    return out


def smoke_test_names(raw: dict[str, Any]) -> list[str]:
    """`<name>-smoke` and the experiment `<experiment>-smoke` (applied after --set, so a smoke
    test never writes into the real run's directory or MLflow experiment)."""
    name = raw.get("name") or "demo"
    experiment = _experiment((raw.get("tracking") or {}).get("experiment"))
    return [
        f"name={name if name.endswith(SMOKE_SUFFIX) else name + SMOKE_SUFFIX}",
        "tracking.experiment="
        + json.dumps(
            experiment if experiment.endswith(SMOKE_SUFFIX) else experiment + SMOKE_SUFFIX
        ),
    ]


def smoke_run_dir(run_dir: str) -> str:
    """`--run-dir X --smoke-test` writes to `X-smoke` (a path or a URI), never to X itself."""
    base = run_dir.rstrip("/") or run_dir
    return base if base.endswith(SMOKE_SUFFIX) else base + SMOKE_SUFFIX


# The embedded demo (`puma-ray run` with no config; tune_configs/demo.yaml is its resolved form):
# the schema's recipe defaults, shrunk to finish in under 10 minutes on 2 CPU cores. Short
# training wants fewer, larger PGD steps (3 x eps/2) than the full recipe's 10 x eps/4.
