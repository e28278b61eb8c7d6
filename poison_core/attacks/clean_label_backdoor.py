"""Label-consistent backdoor: Turner, Tsipras & Madry, 'Label-Consistent Backdoor Attacks', 2019
(adversarial-perturbation variant, Sec. 4.2).

Only images of the TARGET class are poisoned, and their labels stay correct (clean-label):

1. make them hard to learn from their content: an untargeted PGD perturbation against a surrogate
   trained on clean data, max_{||delta||_inf <= eps_adv} CE(f(x + delta), target) (their Eq. 1);
2. stamp the patch trigger (the registry's 'patch' kind, which moves each pixel by <= eps_patch).

The victim then leans on the trigger to fit these images, and at test time the trigger steers
images of other classes to the target class (success = attack success rate).

Epsilon budget: the two steps act on disjoint pixels. The adversarial perturbation is zeroed inside
the patch region and the patch is stamped on the clean pixels there, so the total L-inf is
max(eps_adv, eps_patch) <= threat epsilon; both default to the threat epsilon, and either may be
set lower. (Turner et al. paste an opaque patch over an eps = 8/255 or 16/255 perturbation; the
opaque patch needs threat epsilon 255 here.) The budget caps the count at the target class's size.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from poison_core.attacks._pgd import pgd_against
from poison_core.perturbation import to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError
from poison_core.triggers import apply_trigger


class CleanLabelBackdoorParams(AttackParams):
    target_class: int = Field(0, ge=0)
    adv_epsilon: int | None = Field(None, ge=0, le=255)
    patch_epsilon: int | None = Field(None, ge=1, le=255)
    steps: int = Field(20, ge=1, le=10_000)
    step_fraction: float = Field(0.2, gt=0, le=1)
    patch_size: int = Field(3, ge=1, le=64)
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    margin: int = Field(0, ge=0, le=64)
    pattern: Literal["checkerboard", "white"] = "checkerboard"
    batch_size: int = Field(256, ge=1, le=65_536)


def trigger_region(spec: dict[str, Any], shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean (H, W, C) mask of the pixels a trigger can move (probed on black and white images)."""
    black, white = np.zeros((1, *shape), np.uint8), np.full((1, *shape), 255, np.uint8)
    return (apply_trigger(spec, black)[0] != 0) | (apply_trigger(spec, white)[0] != 255)


@register_attack
class CleanLabelBackdoor(Attack):
    """Turner et al.'s label-consistent backdoor: adversarially hardened target images + patch."""

    name = "clean_label_backdoor"
    paper = "Turner, Tsipras & Madry, Label-Consistent Backdoor Attacks, 2019 (Sec. 4.2)"
    summary = "clean-label backdoor: PGD-hardened target-class images stamped with a patch trigger"
    Params = CleanLabelBackdoorParams
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def budgets(self, epsilon: int) -> tuple[int, int]:
        """(eps_adv, eps_patch): each defaults to the threat epsilon and may not exceed it."""
        p = self.params
        for field_name in ("adv_epsilon", "patch_epsilon"):
            value = getattr(p, field_name)
            if value is not None and value > epsilon:
                raise ConfigError(f"params.{field_name}: {value} exceeds threat.epsilon {epsilon} "
                                  f"(allowed: <= {epsilon})")
        return (epsilon if p.adv_epsilon is None else p.adv_epsilon,
                epsilon if p.patch_epsilon is None else p.patch_epsilon)

    def trigger_spec(self, patch_epsilon: int) -> dict[str, Any]:
        p = self.params
        return {"kind": "patch", "size": p.patch_size, "position": p.position, "margin": p.margin,
                "pattern": p.pattern, "epsilon": patch_epsilon, "target_class": p.target_class}

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        if p.target_class >= train.num_classes:
            raise ConfigError(f"params.target_class: {p.target_class} is outside 0..{train.num_classes - 1}")
        if ctx.threat.epsilon < 1:
            raise ConfigError("threat.epsilon: the patch trigger needs epsilon >= 1 (allowed: 1..255)")
        eps_adv, eps_patch = self.budgets(ctx.threat.epsilon)
        pool = np.flatnonzero(train.labels == p.target_class)
        pos = np.sort(rng.choice(pool, size=min(n_poison, len(pool)), replace=False))
        clean = train.images[pos]
        spec = self.trigger_spec(eps_patch)
        hard = clean
        if eps_adv > 0:
            hard = pgd_against(list(ctx.surrogates), clean, train.labels[pos], epsilon=eps_adv, steps=p.steps,
                               step_size=p.step_fraction * to_unit(eps_adv), minimize=False, random_start=True,
                               rng=rng, device=ctx.device, batch_size=p.batch_size)
        region = trigger_region(spec, train.image_shape)
        hard = np.where(region[None], clean, hard)
        images = apply_trigger(spec, hard)
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "backdoor", "target_class": p.target_class}, trigger=spec)
