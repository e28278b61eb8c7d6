"""Poison Frogs: Shafahi, Huang, Najibi, Suciu, Studer, Dumitras & Goldstein, 'Poison Frogs! Targeted
Clean-Label Poisoning Attacks on Neural Networks', NeurIPS 2018.

Feature collision, Eq. (1):

    x_p = argmin_x ||f(x) - f(x_t)||^2 + beta * ||x - b||^2,

solved by forward-backward splitting (Algorithm 1): a gradient step on the feature loss,
x_hat = x - lambda * grad_x ||f(x) - f(x_t)||^2, then the proximal step of the beta term,
x = (x_hat + lambda * beta * b) / (1 + lambda * beta). As in the reference code, lambda is halved
(`decay`) for a poison whose objective went up. Our threat model adds the L-inf bound: each
iterate is projected onto the eps-ball around the clean base and the pixel box.

beta = beta0 * D^2 / dim_b^2 (Sec. 4.1: beta0 = 0.25, D = 2048 Inception features, dim_b the input
dimension), with D the surrogate's feature dimension and images on the [0, 1] scale. Watermarking
(Sec. 4.2): the base is b = x_b + gamma * (x_t - x_b) with opacity gamma (the paper uses 0.3 for
end-to-end training; 0 here, the transfer-learning 'one-shot kill' setting), clipped to the eps-ball.
With several surrogates the feature loss is their mean; every poison collides with the same target
independently, all in one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from poison_core.attacks import targets as targeting
from poison_core.attacks._uint8 import project_images, radius
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack

logger = logging.getLogger(__name__)


class PoisonFrogsParams(AttackParams):
    """steps, beta0, watermark: Shafahi et al. Sec. 4. lr is the initial lambda on the [0, 1] pixel scale
    (0.1: the feature loss of our ConvNets settles within 200 steps; the halving keeps it stable)."""

    steps: int = Field(1000, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0, le=100)
    beta0: float = Field(0.25, ge=0, le=1e6)
    beta: float | None = Field(None, ge=0, le=1e6)
    watermark: float = Field(0.0, ge=0, le=1)
    decay: float = Field(0.5, gt=0, le=1)


def feature_dim(model: nn.Module, x: torch.Tensor) -> int:
    """The width D of `model.features` on inputs like `x`."""
    with torch.no_grad():
        return int(model.features(x[:1]).shape[1])


def feature_loss(models: Sequence[nn.Module], x: torch.Tensor, target_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per poison: ||f(x) - f(x_t)||^2 averaged over the surrogates, shape (P,)."""
    losses = [(m.features(x) - t).pow(2).sum(1) for m, t in zip(models, target_features)]
    return torch.stack(losses).mean(0)


def feature_collision(models: Sequence[nn.Module], bases: torch.Tensor, target: torch.Tensor, *, epsilon: int,
                      params: PoisonFrogsParams) -> torch.Tensor:
    """Algorithm 1 of Shafahi et al. with the eps-ball projection; float poisons (P, C, H, W) on [0, 1]."""
    models = [m.eval() for m in models]
    eps = radius(epsilon)
    with torch.no_grad():
        target_features = [m.features(target) for m in models]
    b = project_images(bases + params.watermark * (target - bases), bases, eps)
    dim_b = b[0].numel()
    beta = params.beta if params.beta is not None else params.beta0 * feature_dim(models[0], b) ** 2 / dim_b ** 2
    lam = torch.full((len(b),), params.lr, dtype=b.dtype, device=b.device)
    x, previous = b.clone(), None
    for step in range(params.steps):
        x.requires_grad_(True)
        collision = feature_loss(models, x, target_features)
        (grad,) = torch.autograd.grad(collision.sum(), x)
        with torch.no_grad():
            objective = collision + beta * (x - b).pow(2).flatten(1).sum(1)
            if previous is not None:
                lam = torch.where(objective > previous, lam * params.decay, lam)
            previous = objective
            scale = lam[:, None, None, None]
            x_hat = x - scale * grad
            x = (x_hat + scale * beta * b) / (1 + scale * beta)
            x = project_images(x, bases, eps)
        if step % 100 == 0:
            logger.debug("poison_frogs step %d feature loss %.4f", step, float(collision.detach().mean()))
    return x.detach()


@register_attack
class PoisonFrogs(Attack):
    """Feature-collision poisons (Shafahi et al., NeurIPS 2018, Eq. 1, Algorithm 1) within an eps-ball."""

    name = "poison_frogs"
    paper = "Shafahi et al., Poison Frogs! Targeted Clean-Label Poisoning Attacks on Neural Networks, NeurIPS 2018"
    summary = "clean-label targeted: collide the bases' features with the target's (transfer learning)"
    Params = PoisonFrogsParams
    label_policy = "clean"
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        def craft_key(bases: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return feature_collision(ctx.surrogates, bases, target, epsilon=ctx.threat.epsilon, params=self.params)

        return targeting.per_key_poisons(ctx, targeting.plan(ctx, n_poison, rng), craft_key)
