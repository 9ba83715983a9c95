"""Small fully-connected and convolutional models: `mlp` and `cnn4` (PFLlib's FedAvgCNN)."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from fl_core.models.registry import InputShape, ModelError, SplitModel, register_model


def cnn4_flat_dim(input_shape: InputShape) -> int:
    """Flat size after cnn4's two (conv5x5, max-pool 2) stages: 1024 for 28x28, 1600 for 32x32."""
    _, h, w = input_shape
    for _ in range(2):
        h, w = (h - 4) // 2, (w - 4) // 2
    return 64 * h * w


@register_model(
    "cnn4",
    description="PFLlib/HtFLlib FedAvgCNN: 2x(conv5x5, ReLU, max-pool) + Linear(dim, feature_dim)",
    min_input_size=16,
)
def cnn4(input_shape: InputShape, num_classes: int, feature_dim: int) -> SplitModel:
    """FedAvgCNN with the same shapes as PFLlib; 582,026 parameters for 1x28x28 and 10 classes.

    body: conv5x5(C, 32) + ReLU + max-pool 2, conv5x5(32, 64) + ReLU + max-pool 2, flatten,
    Linear(dim, feature_dim) + ReLU; head: Linear(feature_dim, num_classes).
    """
    body = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(input_shape[0], 32, kernel_size=5)),
                ("relu1", nn.ReLU(inplace=True)),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, kernel_size=5)),
                ("relu2", nn.ReLU(inplace=True)),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten(1)),
                ("fc", nn.Linear(cnn4_flat_dim(input_shape), feature_dim)),
                ("relu3", nn.ReLU(inplace=True)),
            ]
        )
    )
    return SplitModel(body, feature_dim, num_classes)


@register_model(
    "mlp",
    description="multilayer perceptron: flatten -> hidden ReLU layers (200, 200) -> feature_dim",
)
def mlp(
    input_shape: InputShape,
    num_classes: int,
    feature_dim: int,
    *,
    hidden: tuple[int, ...] = (200, 200),
) -> SplitModel:
    """Flatten, then Linear + ReLU through `hidden` and on to `feature_dim`.

    The default hidden sizes (200, 200) are the "2NN" of McMahan et al. (FedAvg, 2017); the last
    Linear(200, feature_dim) + ReLU gives the features, and the head is Linear(feature_dim, K).
    """
    sizes = list(hidden)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ModelError(f"hidden must be a sequence of positive integers, got {hidden!r}")
    layers: list[nn.Module] = [nn.Flatten(1)]
    width = math.prod(input_shape)
    for size in [*sizes, feature_dim]:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return SplitModel(nn.Sequential(*layers), feature_dim, num_classes)
