"""Blend backdoor: Chen et al., 'Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning', 2017 (blended injection strategy, Eq. 3): x' = (1 - alpha) x + alpha k, relabelled.

Dirty-label, all-to-one: floor(budget * n) training images of classes other than `target_class`
get the blended key (a random-noise key from `pattern_seed`; alpha 0.2 as in the paper's poisoning
stage) and the target label. Each pixel moves by at most the threat model's epsilon: the blend's
delta is clipped, so at small epsilon the key is fainter than the paper's. The trigger spec
(kind 'blend', see :mod:`poison_core.triggers.blend`) is stored in the PoisonSet, so test-time
triggering is `apply_trigger(poison_set.trigger, images)`, and success is the attack success rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError
from poison_core.triggers import apply_trigger


class BlendParams(AttackParams):
    target_class: int = Field(0, ge=0)
    alpha: float = Field(0.2, gt=0, le=1)
    pattern_seed: int | None = Field(None, ge=0, le=2**32 - 1)


@register_attack
class Blend(Attack):
    """Dirty-label blended-key backdoor, all-to-one."""

    name = "blend"
    paper = "Chen et al., Targeted backdoor attacks on deep learning systems using data poisoning, 2017 (Eq. 3)"
    summary = "dirty-label backdoor: blend a random key into the image, relabel to the target class"
    Params = BlendParams
    label_policy = "dirty"

    def trigger_spec(self, epsilon: int, pattern_seed: int) -> dict[str, Any]:
        return {"kind": "blend", "alpha": self.params.alpha, "pattern_seed": pattern_seed, "epsilon": epsilon,
                "target_class": self.params.target_class}

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        if p.target_class >= train.num_classes:
            raise ConfigError(f"params.target_class: {p.target_class} is outside 0..{train.num_classes - 1}")
        seed = p.pattern_seed if p.pattern_seed is not None else int(rng.integers(2**32))
        pool = np.flatnonzero(train.labels != p.target_class)
        pos = np.sort(rng.choice(pool, size=min(n_poison, len(pool)), replace=False))
        spec = self.trigger_spec(ctx.threat.epsilon, seed)
        labels = np.full(len(pos), p.target_class, dtype=np.int64)
        return Crafted(positions=pos, images=apply_trigger(spec, train.images[pos]), poison_labels=labels,
                       targets={"kind": "backdoor", "target_class": p.target_class}, trigger=spec)
