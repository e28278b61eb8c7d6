"""VGG-11 with BatchNorm: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015 (configuration A), with BN after every conv (Ioffe & Szegedy 2015).

Channels w, 2w, 4w, 4w, 8w, 8w, 8w, 8w (w = 64 by default). A 2x2 max-pool of the configuration
is skipped once it would take the feature map below 2x2, so 8x8 and 28x28 inputs work; global average
pooling and a single linear head replace the ImageNet classifier (and its dropout), as in CIFAR VGGs.
"""

from __future__ import annotations

import torch
from torch import nn

from poison_core.models.base import MODELS, Classifier

DEFAULT_WIDTH = 64
POOL = 0
VGG11_CONFIG: tuple[int, ...] = (1, POOL, 2, POOL, 4, 4, POOL, 8, 8, POOL, 8, 8, POOL)
"""Channel multiples of the width; POOL marks a 2x2 max-pool."""


class VGG(Classifier):
    """Conv-BN-ReLU stack with max-pools (while the map stays >= 2x2) -> global average pool -> linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 config: tuple[int, ...], width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        height, width_px = image_size
        for item in config:
            if item == POOL:
                if min(height, width_px) // 2 >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height, width_px = height // 2, width_px // 2
                continue
            out_channels = item * width
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("vgg11", paper="Simonyan & Zisserman 2015, Very Deep Convolutional Networks (ICLR)",
                 summary="VGG-11 with BatchNorm, pools stop at 2x2, global pool + linear head, width 64")
def vgg11(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    return VGG(in_channels, num_classes, image_size, VGG11_CONFIG, width or DEFAULT_WIDTH)
