"""MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.

Wraps ``torchvision.models.MobileNetV2`` (random init, no pretrained weights). The stem conv takes
`in_channels`; for small images (side <= 64) the stem has stride 1 and the second bottleneck stage
stride 1 as in CIFAR ports, so the network downsamples 8x instead of 32x. The classifier's dropout
is dropped: the head is the bare linear layer. `width` is the stem width (32 in the paper); the
paper's width multiplier is ``width / 32``. torchvision is imported when a MobileNetV2 is built,
not when the model registry loads (it costs every process, Ray workers included, about a second).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poison_core.models.base import MODELS, Classifier

DEFAULT_WIDTH = 32
SMALL_IMAGE_SIDE = 64
# (expansion t, channels c, repeats n, first stride s): Table 2 of the paper ...
IMAGENET_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
# ... and its small-image form: the second stage keeps the resolution.
SMALL_IMAGE_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                       [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class MobileNetV2(Classifier):
    """torchvision's inverted-residual body -> global average pool -> linear head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int) -> None:
        from torchvision.models import MobileNetV2 as TorchvisionMobileNetV2

        super().__init__()
        small = min(image_size) <= SMALL_IMAGE_SIDE
        net = TorchvisionMobileNetV2(num_classes=num_classes, width_mult=width / DEFAULT_WIDTH,
                                     inverted_residual_setting=SMALL_IMAGE_SETTING if small else IMAGENET_SETTING)
        stem = net.features[0][0]
        new_stem = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1 if small else 2, padding=1, bias=False)
        nn.init.kaiming_normal_(new_stem.weight, mode="fan_out")
        net.features[0][0] = new_stem
        self.body = net.features
        self.head = net.classifier[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)


@MODELS.register("mobilenet_v2", paper="Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks (CVPR)",
                 summary="MobileNetV2 (torchvision body), stride-1 stem for small images, no dropout")
def mobilenet_v2(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    return MobileNetV2(in_channels, num_classes, image_size, width or DEFAULT_WIDTH)
