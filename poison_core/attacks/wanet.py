"""WaNet: Nguyen & Tran, 'WaNet - Imperceptible Warping-based Backdoor Attack', ICLR 2021 (the
warping field of :mod:`poison_core.triggers.warp`, and the noise mode).

Dirty-label, all-to-one: backdoor images are warped with one fixed, smooth field (k x k random
control grid, strength s, bicubic upsampling, grid_rescale, clipped to [-1, 1]) and relabelled
`target_class`. Noise mode (cross ratio rho_n / rho_a): further images are warped with the field
plus per-image random noise and keep their true labels, so that the victim learns this one warp,
not warping in general. Paper and release defaults: k = 4, s = 0.5, grid_rescale = 1, cross ratio 2.

Budget: the budget counts every modified image, backdoor and noise mode alike: of
floor(budget * n) poisons, n_a = floor(n_poison / (1 + cross_ratio)) (at least 1) are backdoor
images, drawn from classes other than the target, and n_n = min(floor(n_a * cross_ratio),
n_poison - n_a) noise-mode images, drawn from the remaining images of any class. The release's
rates pc = 0.1 with cross ratio 2 (30 % of each batch modified) are budget 0.3 here.

Static poisons: the release warps on the fly, drawing fresh noise-mode grids (and picking fresh
images) for every batch, and applies its augmentation after the warp. A PoisonSet is fixed data:
the images and the noise-mode grids are drawn once, from the crafting seed, and the victim trains on
those. The backdoor field is rebuilt from the spec (k, s, grid_rescale, grid_seed, size), so
`apply_trigger(poison_set.trigger, images)` warps test images exactly as the poisons were warped.
Each pixel's change is clipped to the threat epsilon (255: the paper's unbounded warp).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.triggers import apply_trigger
from poison_core.triggers.warp import apply_noise_warp


class WanetParams(AttackParams):
    target_class: int = Field(0, ge=0)
    k: int = Field(4, ge=2, le=64)
    s: float = Field(0.5, ge=0, le=64)
    grid_rescale: float = Field(1.0, gt=0, le=1)
    cross_ratio: float = Field(2.0, ge=0, le=16)
    grid_seed: int | None = Field(None, ge=0, le=2**32 - 1)


def split_budget(n_poison: int, cross_ratio: float) -> tuple[int, int]:
    """(backdoor count, noise-mode count) within `n_poison`, at the ratio 1 : cross_ratio."""
    n_backdoor = max(1, int(np.floor(n_poison / (1.0 + cross_ratio) + 1e-9)))
    return n_backdoor, min(int(np.floor(n_backdoor * cross_ratio + 1e-9)), n_poison - n_backdoor)


@register_attack
class Wanet(Attack):
    """Dirty-label warping backdoor, all-to-one, with the noise mode."""

    name = "wanet"
    paper = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"
    summary = "dirty-label backdoor: fixed smooth warping field, relabel to the target; noise-mode warps keep labels"
    Params = WanetParams
    label_policy = "dirty"

    def trigger_spec(self, epsilon: int, grid_seed: int, size: tuple[int, int]) -> dict[str, Any]:
        p = self.params
        return {"kind": "warp", "k": p.k, "s": p.s, "grid_rescale": p.grid_rescale, "grid_seed": grid_seed,
                "size": [int(size[0]), int(size[1])], "epsilon": epsilon, "target_class": p.target_class}

    def check_dataset(self, train: ImageDataset) -> None:
        p, (height, width) = self.params, train.image_shape[:2]
        if p.target_class >= train.num_classes:
            raise ConfigError(f"params.target_class: {p.target_class} is outside 0..{train.num_classes - 1}")
        if p.k > min(height, width):
            raise ConfigError(f"params.k: {p.k} control points exceed the {height}x{width} image "
                              f"(allowed: 2..{min(height, width)})")

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        if ctx.threat.epsilon < 1:
            raise ConfigError("threat.epsilon: the warp needs epsilon >= 1 (allowed: 1..255)")
        seed = p.grid_seed if p.grid_seed is not None else int(rng.integers(2**32))
        n_backdoor, n_noise = split_budget(n_poison, p.cross_ratio)
        pool = np.flatnonzero(train.labels != p.target_class)
        backdoor = rng.choice(pool, size=min(n_backdoor, len(pool)), replace=False)
        rest = np.setdiff1d(np.arange(len(train)), backdoor)
        noise = rng.choice(rest, size=min(n_noise, len(rest)), replace=False)
        spec = self.trigger_spec(ctx.threat.epsilon, seed, train.image_shape[:2])
        backdoor, noise = np.sort(backdoor), np.sort(noise)
        images = np.concatenate([apply_trigger(spec, train.images[backdoor]),
                                 apply_noise_warp(spec, train.images[noise], rng)])
        labels = np.concatenate([np.full(len(backdoor), p.target_class, dtype=np.int64), train.labels[noise]])
        return Crafted(positions=np.concatenate([backdoor, noise]), images=images, poison_labels=labels,
                       targets={"kind": "backdoor", "target_class": p.target_class}, trigger=spec,
                       provenance={"n_backdoor": int(len(backdoor)), "n_noise_mode": int(len(noise)),
                                   "noise_mode": "static: one noise grid per image, drawn from the seed"})
