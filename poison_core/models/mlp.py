"""A two-hidden-layer perceptron (Rumelhart, Hinton & Williams, "Learning representations by
back-propagating errors", Nature 1986): flatten -> Linear(w) -> ReLU -> Linear(w) -> ReLU -> Linear.

The convex-ish baseline of the poisoning literature. Unlike the conv models it is built for one
input size (H * W * C inputs); `features` is the last hidden layer.
"""

from __future__ import annotations

import torch
from torch import nn

from poison_core.models.base import MODELS, Classifier

DEFAULT_WIDTH = 256


class MLP(Classifier):
    """Flatten -> two ReLU hidden layers of `width` units -> linear head."""

    def __init__(self, in_features: int, num_classes: int, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(inplace=True),
                                  nn.Linear(width, width), nn.ReLU(inplace=True))
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("mlp", paper="Rumelhart, Hinton & Williams 1986, Learning representations by back-propagating errors",
                 summary="MLP with two ReLU hidden layers of width 256 (fixed input size)")
def mlp(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    height, width_px = image_size
    return MLP(in_channels * height * width_px, num_classes, width or DEFAULT_WIDTH)
