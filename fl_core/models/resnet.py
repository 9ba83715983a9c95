"""ResNets with BasicBlock (resnet4 ... resnet34) and Bottleneck (resnet50 ... resnet152) blocks.

Our own implementation with torchvision's layout, so parameter counts match torchvision's
(and HtFLlib's, which uses torchvision for resnet18+ and a variable-depth copy for resnet4-10)
when the ImageNet stem is used. For inputs of at most 64 px the default stem is a 3x3 stride-1
convolution without max-pool, so 28x28 and 32x32 images keep enough resolution; pass
`stem="imagenet"` to reproduce HtFLlib exactly (7x7 stride-2 convolution + max-pool).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fl_core.models.registry import (
    InputShape,
    SplitModel,
    aligned_body,
    register_model,
    use_small_stem,
)

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Stem, one stage per entry of `stage_blocks` (widths 64, 128, 256, 512), global average pool.

    Output: (n, out_dim) with out_dim = width of the last stage x block expansion.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_blocks: Sequence[int],
        in_channels: int,
        small_stem: bool,
    ) -> None:
        super().__init__()
        if small_stem:
            stem: list[nn.Module] = [_conv3x3(in_channels, 64)]
        else:
            stem = [nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)]
        stem += [nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        if not small_stem:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)

        stages: list[nn.Module] = []
        channels = 64
        for index, (width, blocks) in enumerate(zip(STAGE_WIDTHS, stage_blocks, strict=False)):
            layers: list[nn.Module] = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                layers.append(block(channels, width, stride))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.out_dim = channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


def build_resnet(
    block: type[BasicBlock] | type[Bottleneck],
    stage_blocks: Sequence[int],
    input_shape: InputShape,
    num_classes: int,
    feature_dim: int,
    stem: str = "auto",
    feature_align: str = "pool",
) -> SplitModel:
    """A ResNet SplitModel; the backbone's native feature size is aligned to `feature_dim`."""
    backbone = ResNetBackbone(
        block, stage_blocks, input_shape[0], use_small_stem(input_shape, stem)
    )
    body = aligned_body(backbone, backbone.out_dim, feature_dim, feature_align)
    return SplitModel(body, feature_dim, num_classes)


_VARIANTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...], str]] = {
    "resnet4": (BasicBlock, (1,), "HtFLlib's ResNet-4: BasicBlock stages [1], 64-d features"),
    "resnet6": (BasicBlock, (1, 1), "HtFLlib's ResNet-6: BasicBlock stages [1, 1], 128-d features"),
    "resnet8": (BasicBlock, (1, 1, 1), "HtFLlib's ResNet-8: stages [1, 1, 1], 256-d features"),
    "resnet10": (BasicBlock, (1, 1, 1, 1), "HtFLlib's ResNet-10: stages [1, 1, 1, 1], 512-d"),
    "resnet18": (BasicBlock, (2, 2, 2, 2), "ResNet-18 (torchvision layout), 512-d features"),
    "resnet34": (BasicBlock, (3, 4, 6, 3), "ResNet-34 (torchvision layout), 512-d features"),
    "resnet50": (Bottleneck, (3, 4, 6, 3), "ResNet-50 (Bottleneck), 2048-d features"),
    "resnet101": (Bottleneck, (3, 4, 23, 3), "ResNet-101 (Bottleneck), 2048-d features"),
    "resnet152": (Bottleneck, (3, 8, 36, 3), "ResNet-152 (Bottleneck), 2048-d features"),
}


def _register_variant(
    name: str, block: type[BasicBlock] | type[Bottleneck], stage_blocks: tuple[int, ...], text: str
) -> None:
    def builder(
        input_shape: InputShape,
        num_classes: int,
        feature_dim: int,
        *,
        stem: str = "auto",
        feature_align: str = "pool",
    ) -> SplitModel:
        return build_resnet(
            block, stage_blocks, input_shape, num_classes, feature_dim, stem, feature_align
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{text}. Options: stem ('auto' | 'small' | 'imagenet'), feature_align ('pool' | 'linear')."
    )
    register_model(name, description=text)(builder)


for _name, (_block, _stages, _text) in _VARIANTS.items():
    _register_variant(_name, _block, _stages, _text)

__all__ = ["BasicBlock", "Bottleneck", "ResNetBackbone", "build_resnet", "STAGE_WIDTHS"]
