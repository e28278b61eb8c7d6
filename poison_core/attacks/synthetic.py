"""Synthetic linearly separable noise: Yu et al., 'Availability Attacks Create Shortcuts', KDD 2022.

The paper shows that availability poisons work because their perturbations are linearly separable
by class, and builds such a shortcut with no model at all (Sec. 5, 'synthetic noise'):

1. draw initial points in R^d, d = ceil(H/patch) * ceil(W/patch) * C, one Gaussian cluster per
   class with its centre on a vertex of a hypercube of side 2 * class_sep and within-class jitter
   z @ A_y (z ~ N(0, I), A_y ~ U(-1, 1)^{d x d}), as scikit-learn's ``make_classification``
   (n_clusters_per_class=1, class_sep=10) that the paper uses;
2. repeat every coordinate over a `patch` x `patch` block (nearest upsampling) and crop to H x W;
3. scale each sample to the L2 norm of a full-epsilon L-inf perturbation, eps * sqrt(H W C).

Step 3 alone can exceed the L-inf budget, so we then clip every pixel to [-eps, eps] (the PoisonSet
audit enforces L-inf); this is our one deviation from the paper, which bounds the L2 norm only.
No surrogate is used; labels are unchanged (clean-label); the budget is the coverage.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from poison_core.attacks._pgd import choose_positions
from poison_core.perturbation import quantize
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError

MAX_DIM = 4096


class SyntheticParams(AttackParams):
    patch: int = Field(8, ge=1, le=256)
    class_sep: float = Field(10.0, gt=0, le=1000)
    jitter: float = Field(1.0, ge=0, le=100)


def class_centres(num_classes: int, dim: int, class_sep: float, rng: np.random.Generator) -> np.ndarray:
    """(K, dim) distinct hypercube vertices scaled by class_sep (make_classification's centres)."""
    if dim < 63 and num_classes > 2 ** dim:
        raise ConfigError(f"params.patch: {num_classes} classes need more than {dim} noise dimensions; "
                          f"use a smaller patch")
    if dim < 63:
        codes = rng.choice(2 ** dim, size=num_classes, replace=False)
        bits = (codes[:, None] >> np.arange(dim)[None, :]) & 1
    else:
        bits = rng.integers(0, 2, size=(num_classes, dim))
    return (2.0 * bits - 1.0) * class_sep


def synthetic_noise(labels: np.ndarray, num_classes: int, image_shape: tuple[int, int, int], epsilon: int,
                    params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """Float NHWC perturbations on the [0, 1] scale, one per label (Yu et al., Sec. 5, steps 1-3)."""
    height, width, channels = image_shape
    rows, cols = -(-height // params.patch), -(-width // params.patch)
    dim = rows * cols * channels
    if dim > MAX_DIM:
        raise ConfigError(f"params.patch: {params.patch} gives {dim} noise dimensions; "
                          f"allowed at most {MAX_DIM} (use a larger patch)")
    centres = class_centres(num_classes, dim, params.class_sep, rng)
    z = rng.standard_normal(size=(len(labels), dim))
    points = centres[labels].copy()
    for k in range(num_classes):
        mixing = rng.uniform(-1.0, 1.0, size=(dim, dim))
        members = labels == k
        points[members] += params.jitter * z[members] @ mixing
    grid = points.reshape(len(labels), rows, cols, channels)
    grid = np.repeat(np.repeat(grid, params.patch, axis=1), params.patch, axis=2)[:, :height, :width, :]
    radius = epsilon / 255.0
    norms = np.linalg.norm(grid.reshape(len(labels), -1), axis=1).reshape(-1, 1, 1, 1)
    scaled = grid / np.maximum(norms, 1e-12) * radius * np.sqrt(height * width * channels)
    return np.clip(scaled, -radius, radius)


@register_attack
class SyntheticNoise(Attack):
    """Class-wise synthetic shortcut noise: separable Gaussian clusters upsampled to images."""

    name = "synthetic_noise"
    paper = "Yu et al., Availability Attacks Create Shortcuts, KDD 2022 (Sec. 5, synthetic noise)"
    summary = "clean-label availability: linearly separable class-wise synthetic noise, no surrogate"
    Params = SyntheticParams
    smoke = {"patch": 2}
    label_policy = "clean"
    perturbation_only = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        train = ctx.train
        pos = choose_positions(len(train), n_poison, rng)
        delta = synthetic_noise(train.labels[pos], train.num_classes, train.image_shape, ctx.threat.epsilon,
                                self.params, rng)
        images = quantize(train.images[pos], delta.transpose(0, 3, 1, 2), ctx.threat.epsilon)  # NHWC -> NCHW
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "availability"})
