"""RobustBench zoo models (Croce et al., "RobustBench: a standardized adversarial robustness
benchmark", arXiv:2010.09670) as margin models and as models to evaluate.

A zoo model is named by a reference string, `robustbench:<model_dir>/<dataset>/<threat_model>/
<name>.pt`: the absolute path of its weights in robustbench's own layout, so the reference alone
says everything a Ray worker needs to load it, and it can stand wherever a checkpoint path does
(`load_checkpoint`, `read_checkpoint_meta` and `model_fingerprint` accept it). Weights are loaded
by robustbench's loader (`robustbench.utils.load_model`), which builds the zoo's architecture and
fits the file; it is only called once the file is there, so nothing is downloaded unless
`margin_model.robustbench.download` is set. Zoo models for CIFAR take 32x32 RGB pixels in [0, 1]
and normalise inside, as every model here does. The fingerprint is the sha256 of the weights
file, so scores are never reused across models.

robustbench 1.1.1 (PyPI) cannot be imported as a package where its `__init__` fails: it imports
`autoattack.state` (its dependency pyautoattack installs as `pyautoattack`) and `pkg_resources`
(gone from setuptools >= 82), both for its benchmark and ImageNet-data helpers only. The loader
and the zoo need neither, so on such an ImportError `_robustbench()` imports the package's
submodules under the package's own module object, not executed. No fork, no patched files.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from puma_ray import storage
from puma_ray.errors import CheckpointError, ConfigError

PREFIX = "robustbench:"
IMAGE_SHAPE = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}  # [H, W, C]
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_INSTALL = 'pip install -e ".[zoo]"'


def is_zoo_ref(ref: Any) -> bool:
    """True for a `robustbench:...` model reference (as opposed to a checkpoint path)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def is_zoo_arch(arch: Any) -> bool:
    """True for the arch a zoo model records, `robustbench:<name>` (no path: `build_zoo_classifier`
    builds it from robustbench's registry)."""
    return is_zoo_ref(arch) and "/" not in arch and not arch.endswith(".pt")


def weights_path(name: str, dataset: str, threat_model: str, model_dir: str) -> str:
    """Where robustbench's loader looks: `<model_dir>/<dataset>/<threat_model>/<name>.pt`,
    absolute (relative model_dir: from this process's working directory)."""
    root = os.path.abspath(os.path.expanduser(model_dir))
    return os.path.join(root, dataset, threat_model, f"{name}.pt")


def zoo_ref(spec) -> str:
    """The reference of a `margin_model.robustbench` section (a RobustBenchConfig)."""
    if not spec.name:
        raise ConfigError("margin_model.robustbench.name: no zoo model is set")
    if not storage.is_local(spec.model_dir) or spec.model_dir.startswith("file://"):
        raise ConfigError(
            f"margin_model.robustbench.model_dir: {spec.model_dir} must be a plain local path "
            "(robustbench reads the file itself); stage the weights on every node"
        )
    return PREFIX + weights_path(spec.name, spec.dataset, spec.threat_model, spec.model_dir)


def parse_ref(ref: str) -> dict[str, str]:
    """{name, dataset, threat_model, model_dir, path} of a zoo reference."""
    path = ref[len(PREFIX) :]
    threat_dir, file = os.path.split(path)
    dataset_dir, threat_model = os.path.split(threat_dir)
    model_dir, dataset = os.path.split(dataset_dir)
    if not file.endswith(".pt") or not threat_model or not dataset:
        raise ConfigError(
            f"{ref}: a zoo model is robustbench:<model_dir>/<dataset>/<threat_model>/<name>.pt"
        )
    if dataset not in NUM_CLASSES:
        raise ConfigError(f"{ref}: dataset {dataset!r} is not one of {', '.join(NUM_CLASSES)}")
    return {
        "name": file[: -len(".pt")],
        "dataset": dataset,
        "threat_model": threat_model,
        "model_dir": model_dir,
        "path": path,
    }


def resolve_model_arg(arg: str, robustbench_cfg) -> str:
    """A `puma-ray evaluate` model argument as a reference: `robustbench:NAME` takes dataset,
    threat model and model_dir from the config's `margin_model.robustbench` section;
    `robustbench:PATH.pt` is the weights file itself. Anything else is returned unchanged."""
    if not is_zoo_ref(arg):
        return arg
    rest = arg[len(PREFIX) :]
    if rest.endswith(".pt"):
        parse_ref(PREFIX + os.path.abspath(os.path.expanduser(rest)))
        return PREFIX + os.path.abspath(os.path.expanduser(rest))
    if not rest or "/" in rest:
        raise ConfigError(f"{arg}: expected robustbench:NAME or robustbench:PATH.pt")
    return zoo_ref(robustbench_cfg.model_copy(update={"name": rest}))


def margin_model_source(cfg, run_dir: str) -> str:
    """The margin model as a reference for `load_checkpoint`: the zoo model (its weights checked,
    and fetched when `download` is set), else `margin_model.checkpoint`, else the model the
    `margin_model` stage trains into `<run_dir>/margin_model/model.pt`."""
    mm = cfg.margin_model
    if mm.robustbench.name:
        ref = zoo_ref(mm.robustbench)
        fetch_weights(ref, download=mm.robustbench.download)
        return ref
    return mm.checkpoint or storage.join(run_dir, "margin_model", "model.pt")


def margin_model_stamp(cfg, run_dir: str) -> str | None:
    """sha256 of a given margin model's file (checkpoint or zoo weights; cached in the run dir
    by file stat), None when the margin model is trained by the pipeline."""
    mm = cfg.margin_model
    if not mm.given:
        return None
    from puma_ray.models import packaged

    source = margin_model_source(cfg, run_dir)
    path = parse_ref(source)["path"] if is_zoo_ref(source) else packaged.resolve(source)
    return storage.content_hash(path, cache_dir=run_dir)


def fetch_weights(ref: str, *, download: bool = False) -> str:
    """The local weights file of `ref`. Missing: downloaded by robustbench when `download`,
    else a one-line CheckpointError naming the file to place."""
    p = parse_ref(ref)
    if os.path.isfile(p["path"]):
        return p["path"]
    where = f"{p['name']} ({p['dataset']}, {p['threat_model']})"
    if not download:
        raise CheckpointError(
            f"{p['path']}: RobustBench weights of {where} not found; place the file there "
            "(fetch it where there is internet, docs/cluster.md) or set "
            "margin_model.robustbench.download: true"
        )
    _zoo_entry(p)
    try:
        _load_model(p)
    except Exception as e:
        raise CheckpointError(
            f"{p['path']}: could not download the weights of {where} ({_first_line(e)})"
        ) from e
    if not os.path.isfile(p["path"]):
        raise CheckpointError(f"{p['path']}: robustbench's download did not write this file")
    return p["path"]


def download_weights(
    name: str, dataset: str = "cifar10", threat_model: str = "Linf", model_dir: str = "models"
) -> str:
    """Fetch a zoo entry's weights into `<model_dir>/<dataset>/<threat_model>/<name>.pt` with
    robustbench's downloader (needs internet), to stage them before a run (docs/cluster.md);
    an existing file is kept. Returns the file's path."""
    ref = PREFIX + weights_path(name, dataset, threat_model, model_dir)
    return fetch_weights(ref, download=True)


def zoo_meta(ref: str) -> dict:
    """Checkpoint-style meta (see `read_checkpoint_meta`) of a zoo model, without loading it."""
    p = parse_ref(ref)
    if not os.path.isfile(p["path"]):
        fetch_weights(ref)  # raises the one-line error naming the file
    return {
        "path": ref,
        "format": "robustbench",
        "arch": f"robustbench:{p['name']}",
        "num_classes": NUM_CLASSES[p["dataset"]],
        "kwargs": {k: p[k] for k in ("dataset", "threat_model")},
        "image_shape": list(IMAGE_SHAPE[p["dataset"]]),
        "extra": {k: p[k] for k in ("name", "dataset", "threat_model")},
    }


def zoo_fingerprint(ref: str) -> str:
    """sha256 (64 hex chars) of the zoo model's weights file."""
    path = fetch_weights(ref)
    digest = storage.content_hash(path)
    if digest is None:
        raise CheckpointError(f"{path}: cannot read the RobustBench weights")
    return digest


def load_zoo_model(
    ref: str, map_location: str | torch.device | None = "cpu"
) -> tuple[nn.Module, dict]:
    """(model in eval mode on `map_location`, meta) of a zoo reference, through robustbench's
    loader; the file must be there (nothing is downloaded here)."""
    meta = zoo_meta(ref)
    p = parse_ref(ref)
    _zoo_entry(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = _load_model(p)
    except Exception as e:
        raise CheckpointError(
            f"{p['path']}: robustbench cannot load it as {p['name']} ({_first_line(e)})"
        ) from e
    model = RobustBenchClassifier(
        net, p["name"], NUM_CLASSES[p["dataset"]], p["dataset"], p["threat_model"]
    )
    if map_location is not None:
        model.to(map_location)
    return model.eval(), meta


def _load_model(p: dict) -> nn.Module:
    """robustbench's own loader for the parsed reference `p` (downloads only if the file is
    missing; the callers decide whether that may happen)."""
    return _robustbench().load_model(
        model_name=p["name"],
        model_dir=p["model_dir"],
        dataset=p["dataset"],
        threat_model=p["threat_model"],
    )


def build_zoo_architecture(name: str, dataset: str = "cifar10", threat_model: str = "Linf"):
    """The zoo entry's network with fresh (random) weights, from robustbench's model registry."""
    entry = _zoo_entry({"name": name, "dataset": dataset, "threat_model": threat_model})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return entry["model"]()


def build_zoo_classifier(
    arch: str, num_classes: int, dataset: str = "cifar10", threat_model: str = "Linf"
) -> nn.Module:
    """The zoo model of arch `robustbench:<name>` with fresh (random) weights, no file read:
    what `create_model` builds to rebuild a checkpoint of a fine-tuned zoo model."""
    if NUM_CLASSES.get(dataset) != num_classes:
        raise ConfigError(
            f"{arch}: a {dataset} zoo model has {NUM_CLASSES.get(dataset)} classes, "
            f"not {num_classes}"
        )
    name = arch[len(PREFIX) :]
    net = build_zoo_architecture(name, dataset, threat_model)
    return RobustBenchClassifier(net, name, num_classes, dataset, threat_model)


class RobustBenchClassifier(nn.Module):
    """A zoo network behind the interface scoring expects: `forward` is the network (pixels in
    [0, 1], its own normalisation inside), `forward_features` the input of its last linear layer
    (the embedding for k-NN score extrapolation). `arch` and `model_kwargs` (dataset, threat
    model) are what `save_checkpoint` records, so a fine-tuned zoo model is rebuilt by
    `create_model` (`build_zoo_classifier`)."""

    def __init__(
        self,
        net: nn.Module,
        name: str,
        num_classes: int,
        dataset: str = "cifar10",
        threat_model: str = "Linf",
    ):
        super().__init__()
        self.net = net
        self.arch = f"robustbench:{name}"
        self.num_classes = num_classes
        self.model_kwargs = {"dataset": dataset, "threat_model": threat_model}
        self.in_channels = 3
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self._head = linears[-1] if linears else None
        self.num_features = self._head.in_features if self._head is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            raise CheckpointError(f"{self.arch} has no linear head to take features from")
        seen: list[torch.Tensor] = []
        hook = self._head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.net(x)
        finally:
            hook.remove()
        return seen[-1].flatten(1)


# ----------------------------------------------------------------------------------------------


def _robustbench():
    """`robustbench.utils` (its loader), importable without the package's `__init__` when that
    fails (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm and torch deprecation notices on import
        try:
            return importlib.import_module("robustbench.utils")
        except ModuleNotFoundError as e:
            if e.name == "robustbench":
                raise ConfigError(
                    f"RobustBench zoo models need the robustbench package: {_INSTALL}"
                ) from None
            failure = e
        except ImportError as e:
            failure = e
        spec = importlib.util.find_spec("robustbench")
        if spec is None or spec.submodule_search_locations is None:
            raise ConfigError(f"robustbench cannot be imported ({_first_line(failure)})")
        sys.modules["robustbench"] = importlib.util.module_from_spec(spec)  # not executed
        return importlib.import_module("robustbench.utils")


def _zoo_entry(p: dict) -> dict:
    """robustbench's registry entry for p's name, dataset and threat model; one-line
    ConfigError for an unknown name or an entry this loader cannot serve."""
    _robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        models = model_dicts[BenchmarkDataset(p["dataset"])][ThreatModel(p["threat_model"])]
    except (ValueError, KeyError):
        raise ConfigError(
            f"robustbench has no {p['dataset']} models for threat model {p['threat_model']!r}"
        ) from None
    name = p["name"]
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"robustbench has no {p['dataset']} {p['threat_model']} model {name!r}{hint}"
        )
    import timm

    timm_name = f"{name.lower().replace('-', '_')}_{p['dataset']}_{p['threat_model'].lower()}"
    if timm.is_model(timm_name):
        # robustbench's loader would fetch these from the Hugging Face hub, not read model_dir
        raise ConfigError(f"{name} is served by timm from the Hugging Face hub; not supported")
    entry = models[name]
    if isinstance(entry.get("gdrive_id"), list):
        raise ConfigError(f"{name} is an ensemble of several files; not supported as one model")
    return entry


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"
