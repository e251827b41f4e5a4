"""WideResNet-depth-width, the model family of paper-scale robust training on CIFAR.

Zagoruyko & Komodakis, "Wide Residual Networks", arXiv:1605.07146, in the pre-activation form of
the TRADES / Rice et al. code: WRN-28-10 and WRN-34-10 are the usual robust baselines, and
WRN-70-16 with swish is the large model of Gowal et al. (arXiv:2010.03593) and of the
synthetic-data papers (Wang et al., arXiv:2302.04638) whose setting PUMA prunes.
Parameters: WRN-28-10 36.5M, WRN-34-10 46.2M, WRN-70-16 267M.
"""

from __future__ import annotations

import torch
from torch import nn

from puma_ray.models.base import ACTIVATIONS, ImageClassifier, make_activation, option_error
from puma_ray.models.preact_resnet import PreActBlock
from puma_ray.models.registry import register_model


@register_model("wide_resnet")
class WideResNet(ImageClassifier):
    """WRN-depth-width; depth = 6n + 4 (n blocks per stage), stage widths 16w, 32w, 64w.

    Options: depth (28), width (10), activation (relu | swish | silu), dropout (0.0, between the
    two convs of a block), in_channels (3), mean / std (CIFAR-10).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int = 28,
        width: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        in_channels: int = 3,
        mean=None,
        std=None,
    ):
        _check_options(depth, width, activation, dropout)
        super().__init__(num_classes, in_channels, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for stage, stride in enumerate((1, 2, 2)):
            c_in, c_out = widths[stage], widths[stage + 1]
            for i in range(n):
                blocks.append(
                    PreActBlock(
                        c_in if i == 0 else c_out,
                        c_out,
                        stride if i == 0 else 1,
                        activation,
                        float(dropout),
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.act = make_activation(activation)
        self.num_features = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference implementation's init (He normal, fan-out), which its results rely on.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return out.mean(dim=(2, 3))


def _check_options(depth, width, activation, dropout) -> None:
    """Refuse impossible options before allocating what may be hundreds of millions of weights."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise option_error("depth", "6n + 4 with n >= 1 (e.g. 28, 34, 70)", depth)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise option_error("width", "a positive integer", width)
    if activation not in ACTIVATIONS:
        raise option_error("activation", f"one of {', '.join(ACTIVATIONS)}", activation)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise option_error("dropout", "a number in [0, 1)", dropout)


# Named presets: the sizes papers report, so configs say `arch: wrn28_10`.


@register_model("wrn28_10")
def wrn28_10(
    num_classes: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    in_channels: int = 3,
    mean=None,
    std=None,
) -> WideResNet:
    """WRN-28-10 (36.5M parameters), the standard robust CIFAR-10 baseline."""
    return WideResNet(
        num_classes,
        depth=28,
        width=10,
        activation=activation,
        dropout=dropout,
        in_channels=in_channels,
        mean=mean,
        std=std,
    )


@register_model("wrn34_10")
def wrn34_10(
    num_classes: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    in_channels: int = 3,
    mean=None,
    std=None,
) -> WideResNet:
    """WRN-34-10 (46.2M parameters), the model of TRADES (Zhang et al., arXiv:1901.08573)."""
    return WideResNet(
        num_classes,
        depth=34,
        width=10,
        activation=activation,
        dropout=dropout,
        in_channels=in_channels,
        mean=mean,
        std=std,
    )


@register_model("wrn70_16")
def wrn70_16(
    num_classes: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    in_channels: int = 3,
    mean=None,
    std=None,
) -> WideResNet:
    """WRN-70-16 (267M parameters); Gowal et al. train it with activation='swish'."""
    return WideResNet(
        num_classes,
        depth=70,
        width=16,
        activation=activation,
        dropout=dropout,
        in_channels=in_channels,
        mean=mean,
        std=std,
    )
