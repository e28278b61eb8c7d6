"""Error-maximizing (adversarial) poisons: Fowl et al., 'Adversarial Examples Make Strong Poisons',
NeurIPS 2021.

Each protected training image becomes an adversarial example of a surrogate trained on clean data
(Eq. 2 of the paper), found by PGD within ||delta||_inf <= eps:

    untargeted:      max_delta  CE(f(x + delta), y)
    class-targeted:  min_delta  CE(f(x + delta), (y + 1) mod K)     (the paper's stronger variant)

The label stays y (clean-label), so a victim trained on the poisons learns non-robust features of
the wrong class. The paper runs 250 PGD steps on CIFAR-10; our default is 50 (the loss has mostly
converged by then on small models) with step size eps/10 and a uniform random start. With several
surrogates the ensemble's mean logits are attacked. The budget is the coverage.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from poison_core.attacks._pgd import choose_positions, pgd_against
from poison_core.perturbation import to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack


class ErrorMaxParams(AttackParams):
    targeted: bool = True
    steps: int = Field(50, ge=1, le=10_000)
    step_fraction: float = Field(0.1, gt=0, le=1)
    random_start: bool = True
    batch_size: int = Field(256, ge=1, le=65_536)


@register_attack
class ErrorMaximizing(Attack):
    """Adversarial poisons: PGD against a clean surrogate, untargeted or class-targeted (y + 1)."""

    name = "error_max"
    paper = "Fowl et al., Adversarial Examples Make Strong Poisons, NeurIPS 2021 (Eq. 2)"
    summary = "clean-label availability: PGD adversarial examples of a clean surrogate, labels kept"
    Params = ErrorMaxParams
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        pos = choose_positions(len(train), n_poison, rng)
        labels = train.labels[pos]
        goal = (labels + 1) % train.num_classes if p.targeted else labels
        images = pgd_against(list(ctx.surrogates), train.images[pos], goal, epsilon=eps, steps=p.steps,
                             step_size=p.step_fraction * to_unit(eps), minimize=p.targeted,
                             random_start=p.random_start, rng=rng, device=ctx.device, batch_size=p.batch_size)
        return Crafted(positions=pos, images=images, poison_labels=labels,
                       targets={"kind": "availability", "targeted": p.targeted})
