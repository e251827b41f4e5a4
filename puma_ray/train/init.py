"""`training.init_from`: fine-tuning, i.e. training that starts from given weights instead of a
random init.

The value names a model the way `puma-ray evaluate` does (`zoo.resolve_model_arg`): a puma_ray
checkpoint (a path, a URI or `puma_ray:<file>`), or a RobustBench zoo model, `robustbench:NAME`
(dataset, threat model, model_dir and download from `margin_model.robustbench`) or
`robustbench:PATH.pt`.

- A checkpoint of a registered arch must be `model.arch` with the same options (defaults
  filled in) and fit the dataset's classes and image shape; its weights are loaded into the
  model built from `model`.
- A zoo model, or a checkpoint of a fine-tuned one (arch `robustbench:<name>`), is itself the
  network trained, with its own normalisation; `model` is not used. Its model.pt records that
  arch with its dataset and threat model, so `load_checkpoint` rebuilds it from robustbench's
  registry (nothing downloaded) and evaluation reads it like any other model.

The driver checks all of this once (`init_model`); every worker loads the weights
(`initial_model`) before DDP wraps the model, unless it resumes an epoch checkpoint (resume
wins). The weights' content (`init_stamp`: `model_fingerprint`, for a zoo model the sha256 of
its file) is part of the training's fingerprint, so other weights retrain.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from puma_ray.errors import ConfigError, PumaRayError

KEY = "training.init_from"


def _checked(fn, *args):
    """fn(*args), its user-caused error as one ConfigError line naming `training.init_from`."""
    try:
        return fn(*args)
    except PumaRayError as e:
        raise ConfigError(f"{KEY}: {e}") from None


def init_ref(cfg) -> str | None:
    """`training.init_from` as a reference `load_checkpoint` reads (None: random init); a zoo
    model's weights must be there (fetched when `margin_model.robustbench.download`)."""
    from puma_ray.models.zoo import fetch_weights, is_zoo_ref, resolve_model_arg

    given = cfg.training.init_from
    if given is None:
        return None
    zoo = cfg.margin_model.robustbench
    ref = _checked(resolve_model_arg, given, zoo)
    if is_zoo_ref(ref):
        _checked(lambda: fetch_weights(ref, download=zoo.download))
    return ref


def init_stamp(cfg) -> str | None:
    """The content fingerprint of the initial weights (None: random init)."""
    from puma_ray.models import model_fingerprint

    ref = init_ref(cfg)
    return None if ref is None else _checked(model_fingerprint, ref)


def init_model(cfg, num_classes: int, image_shape: Sequence[int]) -> dict:
    """{"arch", "model_kwargs", "init_from"} of the network training builds: `model` and a
    random init, or the checked initial weights (a zoo model's own arch)."""
    from puma_ray.models import check_compatible, read_checkpoint_meta
    from puma_ray.models.zoo import is_zoo_arch

    spec = {"arch": cfg.model.arch, "model_kwargs": dict(cfg.model.kwargs), "init_from": None}
    ref = init_ref(cfg)
    if ref is None:
        return spec
    meta = _checked(read_checkpoint_meta, ref)
    _checked(check_compatible, meta, num_classes, image_shape)
    if is_zoo_arch(meta["arch"]):
        return {"arch": meta["arch"], "model_kwargs": dict(meta["kwargs"]), "init_from": ref}
    _check_same_model(ref, meta, spec)
    return {**spec, "init_from": ref}


def _check_same_model(ref: str, meta: dict, spec: dict) -> None:
    from puma_ray.models.registry import model_defaults

    def options(arch: str, kwargs: dict) -> dict:
        return {**_checked(model_defaults, arch), **kwargs}

    ours, theirs = (spec["arch"], spec["model_kwargs"]), (meta["arch"], meta["kwargs"])
    if ours[0] != theirs[0] or options(*ours) != options(*theirs):
        raise ConfigError(
            f"{KEY}: {ref} is a {theirs[0]} with kwargs {theirs[1]} but model is {ours[0]} with "
            f"kwargs {ours[1]}; set model.arch and model.kwargs to the checkpoint's"
        )


def initial_model(arch: str, num_classes: int, model_kwargs: dict, init: str | None) -> nn.Module:
    """The model training starts from: built by `create_model`, with the weights of `init`
    (a reference from `init_model`; None: the random init of the current torch seed)."""
    from puma_ray.models import create_model, load_checkpoint
    from puma_ray.models.checkpoint import _state_mismatch

    model = create_model(arch, num_classes, **model_kwargs)
    if init is None:
        return model
    given, _ = _checked(load_checkpoint, init, None)
    state = given.state_dict()
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"{KEY}: {init}: its weights do not fit {arch} ({problem})")
    model.load_state_dict(state)
    return model.train()
