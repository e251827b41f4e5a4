"""PreAct-ResNet-18, the standard mid-size model of adversarial-training papers.

He et al., "Identity Mappings in Deep Residual Networks", arXiv:1603.05027, in the CIFAR form
used by Rice et al., "Overfitting in adversarially robust deep learning", arXiv:2002.11569
(3x3 stem, no max-pool, widths 64-128-256-512, global average pool). ~11.2M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from puma_ray.models.base import ImageClassifier, make_activation
from puma_ray.models.registry import register_model


class PreActBlock(nn.Module):
    """BN → act → conv3x3 → BN → act → (dropout) → conv3x3, plus an identity or 1x1-conv
    shortcut. The unit of both PreAct-ResNet and WideResNet (which adds the dropout)."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: str, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = make_activation(act)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = make_activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # The projection sees the pre-activated input, as in the paper's full pre-activation unit.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


@register_model("preact_resnet18")
class PreActResNet18(ImageClassifier):
    """PreAct-ResNet-18; options: activation (relu | swish | silu), in_channels, mean, std."""

    def __init__(
        self,
        num_classes: int,
        *,
        activation: str = "relu",
        in_channels: int = 3,
        mean=None,
        std=None,
    ):
        super().__init__(num_classes, in_channels, mean, std)
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [
                PreActBlock(c_in, c_out, stride, activation),
                PreActBlock(c_out, c_out, 1, activation),
            ]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.act = make_activation(activation)
        self.num_features = 512
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.stem(x))))
        return out.mean(dim=(2, 3))
