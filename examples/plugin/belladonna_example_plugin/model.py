"""`tiny_cnn`: two 3x3 convolutions and a linear head, in Belladonna's features/head convention."""

from __future__ import annotations

import torch
from torch import nn

from poison_core.plugin import Classifier


class TinyCNN(Classifier):
    """conv(3x3, w) -> ReLU -> conv(3x3, 2w) -> ReLU -> global average pool -> linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_cnn(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    """The registered builder: (in_channels, num_classes, image_size, width) -> Classifier."""
    return TinyCNN(in_channels, num_classes, width or 8)


tiny_cnn.paper = "an example plug-in (no paper)"  # type: ignore[attr-defined]  (what `belladonna models` lists)
tiny_cnn.summary = "two 3x3 convolutions, global average pooling, linear head"  # type: ignore[attr-defined]
