"""`median_filter`: train on median-filtered images (a classic input-purification baseline; Xu, Evans &
Qi, 'Feature Squeezing', NDSS 2018, Sec. 3.2 use a 2x2/3x3 median filter against small perturbations)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from poison_core.plugin import Defense, DefenseContext, DefenseParams, DefenseResult, train_victim


class MedianParams(DefenseParams):
    size: int = Field(3, ge=1, le=9, description="side of the median window (odd)")


def median_filter(images: np.ndarray, size: int) -> np.ndarray:
    """The per-channel median over a size x size window (edges replicated) of uint8 NHWC images."""
    pad = size // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    windows = [padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)]
    return np.median(np.stack(windows), axis=0).astype(np.uint8)


class MedianFilter(Defense):
    """Median-filter every training image once, then train the victim as usual."""

    name = "median_filter"
    paper = "Xu, Evans & Qi, NDSS 2018 (Feature Squeezing), as an example plug-in"
    summary = "train on median-filtered images"
    Params = MedianParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        return train_victim(ctx, ctx.train.replace(images=median_filter(ctx.train.images, self.params.size)))
