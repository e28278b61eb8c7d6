"""ResNet-18, CIFAR variant: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

The CIFAR form of the paper's Sec. 4.2: a 3x3 stride-1 stem and no max-pool, then four stages of
two BasicBlocks with widths w, 2w, 4w, 8w (w = 64 by default) and strides 1, 2, 2, 2, global average
pooling and a linear head. Projection shortcuts (1x1 conv + BN) where shape changes (option B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poison_core.models.base import MODELS, Classifier

DEFAULT_WIDTH = 64


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut: y = relu(F(x) + x)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    """Stem -> four stages of BasicBlocks -> global average pool -> linear."""

    def __init__(self, in_channels: int, num_classes: int, blocks: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        channels = width
        for i, n_blocks in enumerate(blocks):
            out_channels = width * 2**i
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


@MODELS.register("resnet18", paper="He et al. 2016, Deep Residual Learning for Image Recognition (CVPR)",
                 summary="ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), width 64")
def resnet18(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    return ResNet(in_channels, num_classes, (2, 2, 2, 2), width or DEFAULT_WIDTH)
