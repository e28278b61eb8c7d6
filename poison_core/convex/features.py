"""uint8 NHWC images <-> float64 feature rows on [0, 1], and the way back onto the uint8 grid."""

from __future__ import annotations

import numpy as np
import torch

from poison_core.perturbation import apply_step


def to_features(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float64 (N, H*W*C) on [0, 1] (pixel order of the NHWC array)."""
    return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1).astype(np.float64) / 255.0)


def project_features(x: torch.Tensor, base: torch.Tensor, epsilon: int) -> torch.Tensor:
    """Clamp feature rows `x` into the L-inf ball of radius epsilon/255 around `base` and into [0, 1]."""
    radius = epsilon / 255.0
    return torch.minimum(torch.maximum(x, base - radius), base + radius).clamp(0.0, 1.0)


def from_features(x: torch.Tensor, base_images: np.ndarray, epsilon: int) -> np.ndarray:
    """Feature rows as uint8 NHWC images within `epsilon` of `base_images` (poison_core.perturbation's
    uint8 grid: round(255 * (x - base)) clipped to [-epsilon, epsilon], the image to [0, 255])."""
    delta = (x.detach() - to_features(base_images)).numpy().reshape(base_images.shape)
    return apply_step(base_images, np.rint(delta * 255.0), epsilon)
