"""The contract every model keeps, so attacks, scoring and training never special-case one.

Input is NCHW float pixels in [0, 1]; the per-channel normalisation lives inside the model as
buffers, so epsilon balls, clipping and DeepFool margins are all measured in pixel space and a
checkpoint carries its own input statistics. `forward_features` exposes the penultimate features
(the embedding used for k-NN score extrapolation); `forward` is the linear classifier on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from puma_ray.errors import ConfigError

# CIFAR-10 training-set statistics, the usual defaults in the adversarial-training literature.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

ACTIVATIONS = ("relu", "swish", "silu")  # swish is SiLU (Gowal et al., arXiv:2010.03593)


def option_error(option: str, expected: str, got) -> ConfigError:
    """A one-line error naming a model option; `create_model` prefixes the model's name."""
    return ConfigError(f"option {option!r} must be {expected}, got {got!r}")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for `name` in ACTIVATIONS."""
    if name not in ACTIVATIONS:
        raise option_error("activation", f"one of {', '.join(ACTIVATIONS)}", name)
    return nn.ReLU(inplace=True) if name == "relu" else nn.SiLU(inplace=True)


class Normalize(nn.Module):
    """(x - mean) / std per channel, on NCHW pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _stats(name: str, value, in_channels: int, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        # No known statistics for other channel counts: map [0, 1] to [-1, 1].
        return default if in_channels == 3 else (0.5,) * in_channels
    try:
        stats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise option_error(name, f"a list of {in_channels} numbers", value) from None
    if len(stats) != in_channels or (name == "std" and min(stats) <= 0):
        expected = f"{in_channels} {'positive ' if name == 'std' else ''}numbers (one per channel)"
        raise option_error(name, expected, value)
    return stats


class ImageClassifier(nn.Module):
    """Base class: pixels in [0, 1] → normalise → `embed` → [N, num_features] → classifier.

    Subclasses build their layers, set `num_features`, and implement `embed` (normalised images
    to penultimate features). `create_model` sets `arch` and `model_kwargs` after construction.
    """

    arch: str
    model_kwargs: dict

    def __init__(self, num_classes: int, in_channels: int = 3, mean=None, std=None):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise option_error("in_channels", "a positive integer", in_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.normalize = Normalize(
            _stats("mean", mean, in_channels, CIFAR10_MEAN),
            _stats("std", std, in_channels, CIFAR10_STD),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, num_features] of pixels x [N, C, H, W] in [0, 1]."""
        return self.embed(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] of pixels x [N, C, H, W] in [0, 1]."""
        return self.classifier(self.forward_features(x))
