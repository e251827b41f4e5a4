"""Image classifiers by name, and checkpoints that know how to rebuild them. Pure PyTorch.

Every model takes NCHW pixels in [0, 1] (normalisation is inside), exposes `forward_features`
→ [N, num_features], and records `arch`, `num_classes` and `model_kwargs` for `save_checkpoint`.
RobustBench zoo models (`models/zoo.py`, the `zoo` extra) load wherever a checkpoint path goes,
named `robustbench:<model_dir>/<dataset>/<threat_model>/<name>.pt`.
"""

# Importing the architecture modules registers their names.
from puma_ray.models import preact_resnet, small_cnn, wide_resnet  # noqa: F401
from puma_ray.models.base import ImageClassifier
from puma_ray.models.checkpoint import (
    check_compatible,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint_meta,
    save_checkpoint,
)
from puma_ray.models.registry import create_model, list_models, model_options, register_model
from puma_ray.models.zoo import is_zoo_ref, margin_model_source

__all__ = [
    "ImageClassifier",
    "check_compatible",
    "create_model",
    "is_zoo_ref",
    "list_models",
    "load_checkpoint",
    "margin_model_source",
    "model_fingerprint",
    "model_options",
    "read_checkpoint_meta",
    "register_model",
    "save_checkpoint",
]
