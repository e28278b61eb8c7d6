"""uint8 NHWC images <-> float64 feature rows on [0, 1], and the way back onto the uint8 grid."""

from __future__ import annotations

import numpy as np
import torch


def to_features(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float64 (N, H*W*C) on [0, 1] (pixel order of the NHWC array)."""
    return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1).astype(np.float64) / 255.0)


def project_features(x: torch.Tensor, base: torch.Tensor, epsilon: int) -> torch.Tensor:
    """Clamp feature rows `x` into the L-inf ball of radius epsilon/255 around `base` and into [0, 1]."""
    radius = epsilon / 255.0
    return torch.minimum(torch.maximum(x, base - radius), base + radius).clamp(0.0, 1.0)


def from_features(x: torch.Tensor, base_images: np.ndarray, epsilon: int) -> np.ndarray:
    """Feature rows as uint8 NHWC images within `epsilon` of `base_images`: the integer perturbation
    round(255 * (x - base)) clipped to [-epsilon, epsilon], the image clipped to [0, 255] (as
    poison_core.attacks._uint8.quantize does for NCHW deltas)."""
    delta = (x.detach() - to_features(base_images)).numpy().reshape(base_images.shape)
    step = np.clip(np.rint(delta * 255.0), -epsilon, epsilon).astype(np.int16)
    return np.clip(base_images.astype(np.int16) + step, 0, 255).astype(np.uint8)
