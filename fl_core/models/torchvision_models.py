"""Architectures built from torchvision constructors (weights=None): GoogLeNet and ViT-B/16, B/32.

Each torchvision network keeps its own layers; only its classifier is removed (set to Identity)
so the network ends in features, and the input convolution is rebuilt when the input does not
have 3 channels. The body is then the network followed by the aligner to `feature_dim`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fl_core.models.registry import InputShape, SplitModel, aligned_body, register_model

GOOGLENET_DIM = 1024
VIT_HIDDEN_DIM = 768


@register_model(
    "googlenet",
    description="torchvision GoogLeNet (no aux heads), 1024-d features pooled to feature_dim",
    min_input_size=15,
)
def googlenet(
    input_shape: InputShape, num_classes: int, feature_dim: int, *, feature_align: str = "pool"
) -> SplitModel:
    """torchvision GoogLeNet(aux_logits=False, init_weights=True), as HtFLlib uses it.

    Its final dropout(0.2) stays in the body; its fc is replaced by the aligner 1024 ->
    feature_dim and a new head Linear(feature_dim, num_classes). Inputs need at least 15 px.
    """
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    if input_shape[0] != 3:
        conv = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.01, a=-2, b=2)  # torchvision's init
        net.conv1.conv = conv
    net.fc = nn.Identity()
    body = aligned_body(net, GOOGLENET_DIM, feature_dim, feature_align)
    return SplitModel(body, feature_dim, num_classes)


class ResizeTo(nn.Module):
    """Bilinear resize to a fixed square size (ViT needs a side that is a multiple of its patch)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ViTSplitModel(SplitModel):
    """A ViT split with HtFLlib's ViT head: Linear(feature_dim, 768) -> Tanh -> Linear(768, K)."""

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                [
                    ("pre_logits", nn.Linear(feature_dim, VIT_HIDDEN_DIM)),
                    ("act", nn.Tanh()),
                    ("fc", nn.Linear(VIT_HIDDEN_DIM, num_classes)),
                ]
            )
        )


def _build_vit(
    patch_size: int, input_shape: InputShape, num_classes: int, feature_dim: int, feature_align: str
) -> SplitModel:
    channels, height, width = input_shape
    # The image side, rounded up to a multiple of the patch: 32 for 28x28 and 32x32 inputs.
    image_size = math.ceil(max(height, width) / patch_size) * patch_size
    constructor = torchvision.models.vit_b_16 if patch_size == 16 else torchvision.models.vit_b_32
    net = constructor(weights=None, image_size=image_size)
    if channels != 3:
        conv = nn.Conv2d(channels, VIT_HIDDEN_DIM, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (channels * patch_size**2)))
        nn.init.zeros_(conv.bias)
        net.conv_proj = conv
    net.heads = nn.Identity()
    backbone = nn.Sequential(OrderedDict([("resize", ResizeTo(image_size)), ("vit", net)]))
    body = aligned_body(backbone, VIT_HIDDEN_DIM, feature_dim, feature_align)
    return ViTSplitModel(body, feature_dim, num_classes)


@register_model(
    "vit_b_16",
    description="torchvision ViT-B/16 (image_size = input side), 768-d CLS features, ViT head",
)
def vit_b_16(
    input_shape: InputShape, num_classes: int, feature_dim: int, *, feature_align: str = "pool"
) -> SplitModel:
    """ViT-B/16 built for the input's size; inputs whose side is not a multiple of 16 are resized
    bilinearly up to the next multiple (28 -> 32). Head: Linear(feature_dim, 768), Tanh, Linear."""
    return _build_vit(16, input_shape, num_classes, feature_dim, feature_align)


@register_model(
    "vit_b_32",
    description="torchvision ViT-B/32 (image_size = input side), 768-d CLS features, ViT head",
)
def vit_b_32(
    input_shape: InputShape, num_classes: int, feature_dim: int, *, feature_align: str = "pool"
) -> SplitModel:
    """ViT-B/32 built for the input's size; inputs whose side is not a multiple of 32 are resized
    bilinearly up to the next multiple (28 -> 32). Head: Linear(feature_dim, 768), Tanh, Linear."""
    return _build_vit(32, input_shape, num_classes, feature_dim, feature_align)
