"""MobileNetV2 (Sandler et al., 2018), our own implementation with torchvision's layout.

With the ImageNet stem (stride-2 first convolution) the parameter count equals torchvision's
`mobilenet_v2().features`. For inputs of at most 64 px the default stem has stride 1, so the
network downsamples 16x instead of 32x (32x32 -> 2x2 before the global pool).
"""

from __future__ import annotations

import torch
from torch import nn

from fl_core.models.registry import (
    InputShape,
    SplitModel,
    aligned_body,
    register_model,
    use_small_stem,
)

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (none if t = 1), 3x3 depthwise, 1x1 projection; residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Backbone(nn.Module):
    """Stem, the 17 inverted-residual blocks, 1x1 conv to 1280 channels, global average pool."""

    out_dim = LAST_CHANNELS

    def __init__(self, in_channels: int, small_stem: bool) -> None:
        super().__init__()
        channels = 32
        layers: list[nn.Module] = [
            _conv_bn_relu6(in_channels, channels, 3, stride=1 if small_stem else 2)
        ]
        for expansion, out_channels, repeats, stride in INVERTED_RESIDUAL_SETTING:
            for i in range(repeats):
                layers.append(
                    InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion)
                )
                channels = out_channels
        layers.append(_conv_bn_relu6(channels, LAST_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


@register_model(
    "mobilenet_v2", description="MobileNetV2 (width 1.0), 1280-d features pooled to feature_dim"
)
def mobilenet_v2(
    input_shape: InputShape,
    num_classes: int,
    feature_dim: int,
    *,
    stem: str = "auto",
    feature_align: str = "pool",
) -> SplitModel:
    """MobileNetV2. Options: stem ('auto' | 'small' | 'imagenet'), feature_align ('pool' |
    'linear').

    As in HtFLlib, the classifier (dropout + Linear) is replaced: the body ends with the pooled
    1280-d features aligned to `feature_dim`, the head is Linear(feature_dim, num_classes).
    """
    backbone = MobileNetV2Backbone(input_shape[0], use_small_stem(input_shape, stem))
    body = aligned_body(backbone, backbone.out_dim, feature_dim, feature_align)
    return SplitModel(body, feature_dim, num_classes)
