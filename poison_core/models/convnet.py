"""A small BatchNorm ConvNet: the fast CPU victim and surrogate.

Three 3x3 conv-BN-ReLU stages (width w, 2w, 4w) with 2x2 max-pooling between them, global average
pooling and a linear head: the classic convolutional network of LeCun et al., "Gradient-based
learning applied to document recognition" (Proc. IEEE 1998), with batch normalisation
(Ioffe & Szegedy, ICML 2015). Two pools take 8x8 inputs to 2x2, so the smallest images still work.
"""

from __future__ import annotations

import torch
from torch import nn

from poison_core.models.base import MODELS, Classifier

DEFAULT_WIDTH = 32


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ConvNet(Classifier):
    """conv(w) - pool - conv(2w) - pool - conv(4w) - global average pool - linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("convnet", paper="LeCun et al. 1998, Gradient-based learning applied to document recognition",
                 summary="3-stage BatchNorm ConvNet (width 32), fast on CPU")
def convnet(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    return ConvNet(in_channels, num_classes, width or DEFAULT_WIDTH)
