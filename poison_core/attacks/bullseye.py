"""Bullseye Polytope: Aghakhani, Meng, Wang, Kruegel & Vigna, 'Bullseye Polytope: A Scalable
Clean-Label Poisoning Attack with Improved Transferability', IEEE EuroS&P 2021.

Convex Polytope's objective (Zhu et al., ICML 2019; :mod:`poison_core.attacks.convex_polytope`) with
the coefficients *fixed* to c_j = 1/k, so the target's feature vector is pulled onto the centre
('bullseye') of the k poisons' polytope instead of anywhere inside it (the paper's Bullseye objective;
Convex Polytope's problem with c^(i) = 1/k for every network i):

    min_{x_p}  1/m sum_i ||phi^(i)(x_t) - 1/k sum_j phi^(i)(x_p^(j))|| / ||phi^(i)(x_t)||
    s.t.  ||x_p^(j) - x_b^(j)||_inf <= eps,

over the m surrogate feature extractors phi^(i) (all of ctx.surrogates). There is no inner
least-squares problem to solve, which is the paper's speed-up over Convex Polytope. As in the
reference (ucsb-seclab/BullseyePoison, trainer.py `loss_from_center`, mode 'mean'), each network's
term is the *unsquared* residual norm relative to the target's feature norm, averaged over the
networks; :func:`bullseye_loss` computes it from :func:`convex_polytope.polytope_loss` with c = 1/k
(whose value is 1/2 of that ratio squared).

Optimiser and projection as in the reference's `make_convex_polytope_poisons` and our Convex
Polytope: Adam (betas 0.9, 0.999) with lr 0.04 on the tensor normalised by the CIFAR-10 std, i.e.
lr * `input_std` on our [0, 1] pixel scale, 800 iterations (launch/attack-transfer-18.sh, linear
transfer learning; 1500 for end-to-end), each step followed by the projection onto the eps-ball of
the bases and the pixel box (the reference's eps is 0.1 = 25.5/255; here the threat model's).

Left out: the multi-draw variant (`--net-repeat`, features averaged over several dropout draws of
each surrogate; our models have no dropout, so every draw is the same) and the end-to-end variant
(the objective on every block's features; our models expose only their penultimate features).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from poison_core.attacks import targets as targeting
from poison_core.perturbation import project_images, to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.attacks.convex_polytope import REFERENCE_STD, polytope_loss

log = logging.getLogger(__name__)


class BullseyeParams(AttackParams):
    """steps, lr: the reference's linear-transfer setting (800 Adam iterations, lr 0.04 in its normalised
    units: the step on our [0, 1] pixel scale is lr * input_std, as for convex_polytope)."""

    steps: int = Field(800, ge=1, le=100_000)
    lr: float = Field(0.04, gt=0, le=10)
    input_std: float = Field(REFERENCE_STD, gt=0, le=1)


def bullseye_coefficients(k: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed convex coefficients of Bullseye Polytope: c_j = 1/k for each of the k poisons."""
    return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)


def bullseye_loss(poison_features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Bullseye objective (module docstring): per network ||phi(x_t) - mean_j phi(x_p^(j))|| /
    ||phi(x_t)||, averaged over the networks; poison_features[i] is (k, D), target_features[i] is (D,)."""
    terms = []
    for features, target in zip(poison_features, target_features):
        half_square = polytope_loss([features], [target], [bullseye_coefficients(len(features), features)])
        terms.append((2 * half_square).clamp_min(1e-24).sqrt())
    return torch.stack(terms).mean()


def bullseye_polytope(models: Sequence[nn.Module], bases: torch.Tensor, target: torch.Tensor, *, epsilon: int,
                      params: BullseyeParams) -> tuple[torch.Tensor, list[float]]:
    """Bullseye poisons (k, C, H, W) on [0, 1] within the eps-ball of `bases`, and the loss at every step."""
    models = [m.eval() for m in models]
    eps = to_unit(epsilon)
    with torch.no_grad():
        target_features = [m.features(target)[0] for m in models]
    x = bases.clone().requires_grad_(True)
    std = params.input_std  # Adam(lr, eps) on x / std is Adam(lr * std, eps / std) on x
    optimizer = torch.optim.Adam([x], lr=params.lr * std, betas=(0.9, 0.999), eps=1e-8 / std)
    losses = []
    for step in range(params.steps):
        loss = bullseye_loss([m.features(x) for m in models], target_features)
        (x.grad,) = torch.autograd.grad(loss, x)
        optimizer.step()
        with torch.no_grad():
            x.copy_(project_images(x, bases, eps))
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            log.debug("bullseye_polytope step %d loss %.5f", step, losses[-1])
    return x.detach(), losses


@register_attack
class BullseyePolytope(Attack):
    """Bullseye Polytope poisons (Aghakhani et al., EuroS&P 2021: the CP objective with c = 1/k) against a
    surrogate ensemble."""

    name = "bullseye_polytope"
    paper = ("Aghakhani et al., Bullseye Polytope: A Scalable Clean-Label Poisoning Attack with Improved "
             "Transferability, IEEE EuroS&P 2021")
    summary = "clean-label targeted: poisons whose mean feature sits on the target's (convex polytope, c = 1/k)"
    Params = BullseyeParams
    smoke = {"steps": 4}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        def craft_key(bases: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return bullseye_polytope(ctx.surrogates, bases, target, epsilon=ctx.threat.epsilon, params=self.params)[0]

        return targeting.per_key_poisons(ctx, targeting.plan(ctx, n_poison, rng), craft_key)
