"""`checker_noise`: a clean-label availability poison that adds a class-wise +-epsilon checkerboard.

A fixed, easily learnt pattern per class is the simplest shortcut poison (the synthetic-noise family
of Yu et al., 'Availability Attacks Create Shortcuts', KDD 2022): the checkerboard's phase encodes the
class, so a victim can fit the poisoned samples by the pattern rather than the content.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from poison_core.plugin import Attack, AttackParams, CraftContext, Crafted


class CheckerParams(AttackParams):
    cell: int = Field(1, ge=1, le=16, description="side of one checkerboard square, in pixels")


class CheckerNoise(Attack):
    """Add +-epsilon in a checkerboard whose phase is the class (two phases, alternating by class)."""

    name = "checker_noise"
    paper = "Yu et al., KDD 2022 (synthetic shortcut noise), as an example plug-in"
    summary = "clean-label: a class-phased +-eps checkerboard on a budget of random samples"
    Params = CheckerParams
    label_policy = "clean"
    perturbation_only = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        train, eps, cell = ctx.train, ctx.threat.epsilon, self.params.cell
        positions = np.sort(rng.choice(len(train), size=n_poison, replace=False))
        height, width, _ = train.image_shape
        rows, cols = np.indices((height, width)) // cell
        board = np.where((rows + cols) % 2 == 0, 1, -1)[None, :, :, None]
        sign = np.where(train.labels[positions] % 2 == 0, 1, -1)[:, None, None, None]
        delta = eps * board * sign
        images = np.clip(train.images[positions].astype(np.int16) + delta, 0, 255).astype(np.uint8)
        return Crafted(positions=positions, images=images, poison_labels=train.labels[positions],
                       targets={"kind": "availability"})
