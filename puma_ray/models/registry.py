"""Models by name (the timm pattern), so configs and checkpoints say `arch: wrn28_10`.

A registered factory is a class or function `(num_classes, **options) -> ImageClassifier` whose
options are keyword parameters with defaults; `create_model` checks the options against that
signature so a typo in a config fails with one line instead of a TypeError deep in a constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from puma_ray.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: make a model factory available to `create_model(name, ...)`."""

    def add(factory):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """Sorted names accepted by `create_model`."""
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The keyword options a registered model accepts (besides num_classes)."""
    params = inspect.signature(_factory(name)).parameters
    return [p for p in params if p != "num_classes"]


def _factory(name: str):
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def model_defaults(name: str) -> dict:
    """The options of a registered model with their defaults filled in."""
    params = inspect.signature(_factory(name)).parameters
    return {
        p: v.default for p, v in params.items() if p != "num_classes" and v.default is not v.empty
    }


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the model registered as `name` for `num_classes` classes, in train mode.

    The model takes NCHW pixels in [0, 1] and records `arch`, `num_classes` and `model_kwargs`
    (the options as given) so `save_checkpoint` can rebuild it later. A RobustBench zoo arch,
    `robustbench:<name>` (options `dataset`, `threat_model`), is built by robustbench's registry
    with fresh weights (`zoo.build_zoo_classifier`): how a fine-tuned zoo model is rebuilt.
    """
    from puma_ray.models.zoo import build_zoo_classifier, is_zoo_arch

    if is_zoo_arch(name):
        unknown = sorted(set(kwargs) - {"dataset", "threat_model"})
        if unknown:
            raise ConfigError(f"model {name!r} has no option {unknown[0]!r}")
        return build_zoo_classifier(name, num_classes, **kwargs).train()
    factory = _factory(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}"
        )
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {unknown[0]!r}; options: {', '.join(options)}"
        )
    try:
        model = factory(num_classes, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    model.arch = name
    model.num_classes = num_classes
    model.model_kwargs = dict(kwargs)
    return model
