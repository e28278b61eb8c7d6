"""Poison Frogs: Shafahi, Huang, Najibi, Suciu, Studer, Dumitras & Goldstein, 'Poison Frogs! Targeted
Clean-Label Poisoning Attacks on Neural Networks', NeurIPS 2018.

Feature collision, Eq. (1):

    x_p = argmin_x ||f(x) - f(x_t)||^2 + beta * ||x - b||^2,

solved by forward-backward splitting (Algorithm 1): a gradient step on the feature loss,
x_hat = x - lambda * grad_x ||f(x) - f(x_t)||^2, then the proximal step of the beta term,
x = (x_hat + lambda * beta * b) / (1 + lambda * beta). Our threat model adds the L-inf bound: each
iterate is projected onto the eps-ball around the clean base and the pixel box.

Step-size control as in the reference (aks2203/poisoning-benchmark, poison_crafting/craft_poisons_fc.py,
the loop in `main`): a step whose objective is above the last accepted one is *rejected* (the poison
stays where it was) and lambda is multiplied by `decay` = 0.2; otherwise it is accepted. The objective
is evaluated at the proposed iterate (Algorithm 1's intent: the reference compares the loss at the
current point with the previous one, so after the first rise its x and objective never change again and
every later step only shrinks lambda; here a rejected step is retried with the smaller lambda). A poison
stops once an accepted step moves it by less than `tol` relative to its norm (the reference: 1e-5).

beta = beta0 * D^2 / dim_b^2 (Sec. 4.1: beta0 = 0.25, D = 2048 Inception features, dim_b the input
dimension), with D the surrogate's feature dimension and images on the [0, 1] scale. Watermarking
(Sec. 4.2): the base is b = x_b + gamma * (x_t - x_b) with opacity gamma = 0.3 (the paper's value for
end-to-end training and the reference's `--watermark_coeff` default), clipped to the eps-ball; the
optimisation starts from it. gamma = 0 is the paper's transfer-learning 'one-shot kill' setting.
Two rules (`rule`). 'paper': the above, Eq. (1) with its beta proximal step, then the eps-ball
projection (1000 steps, lambda 0.1 on our ConvNets). 'benchmark': what Schwarzschild et al.'s benchmark
runs under an L-inf threat (aks2203/poisoning-benchmark, poison_crafting/craft_poisons_fc.py without
--l2): no beta term, each step is plain gradient descent on the feature distance followed by the
projection onto the eps-ball and the pixel box, objective = the feature distance, 120 steps
(--crafting_iters) at lambda 0.001 (--step_size), with the same rejection and stopping rules. 'auto'
(default) takes 'benchmark' under an L-inf threat (epsilon < 255) and 'paper' without a bound
(epsilon 255). steps and lr left None take the chosen rule's values.
With several surrogates the feature loss is their mean; every poison collides with the same target
independently, all in one batch (the surrogates are in eval mode, so the poisons do not interact).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from poison_core.attacks import targets as targeting
from poison_core.perturbation import project_images, to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack

log = logging.getLogger(__name__)


class PoisonFrogsParams(AttackParams):
    """steps, beta0, watermark: Shafahi et al. Sec. 4 (watermark 0.3: Sec. 4.2 and the reference's
    `--watermark_coeff`). decay: the factor lambda is multiplied by on a rejected step (the reference's
    0.2); tol: the reference's stopping rule ||x - x_new|| / ||x|| < 1e-5. lr is the initial lambda on
    the [0, 1] pixel scale (the reference's 0.001 suits its ResNet-18 features; the gradient's scale is
    the model's, and 0.1 lets the feature loss of our ConvNets settle within 200 steps). rule: 'auto'
    (benchmark under L-inf, paper unbounded), 'benchmark' (craft_poisons_fc.py: no beta, 120 steps at
    0.001) or 'paper' (Algorithm 1 with beta, 1000 steps at 0.1); steps / lr None: the rule's."""

    rule: Literal["auto", "benchmark", "paper"] = "auto"
    steps: int | None = Field(None, ge=1, le=100_000)
    lr: float | None = Field(None, gt=0, le=100)
    beta0: float = Field(0.25, ge=0, le=1e6)
    beta: float | None = Field(None, ge=0, le=1e6)
    watermark: float = Field(0.3, ge=0, le=1)
    decay: float = Field(0.2, gt=0, lt=1)
    tol: float = Field(1e-5, ge=0, le=1)


RULE_DEFAULTS = {"benchmark": (120, 0.001), "paper": (1000, 0.1)}
"""(steps, lr) of each rule: craft_poisons_fc.py's --crafting_iters / --step_size; Sec. 4 / our ConvNets."""


def resolve_rule(params: PoisonFrogsParams, epsilon: int) -> tuple[str, int, float]:
    """(rule, steps, lr): 'auto' is 'benchmark' under an L-inf bound (epsilon < 255), else 'paper'."""
    rule = params.rule if params.rule != "auto" else ("benchmark" if epsilon < 255 else "paper")
    steps, lr = RULE_DEFAULTS[rule]
    return (rule, params.steps if params.steps is not None else steps,
            params.lr if params.lr is not None else lr)


def feature_dim(model: nn.Module, x: torch.Tensor) -> int:
    """The width D of `model.features` on inputs like `x`."""
    with torch.no_grad():
        return int(model.features(x[:1]).shape[1])


def feature_loss(models: Sequence[nn.Module], x: torch.Tensor, target_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per poison: ||f(x) - f(x_t)||^2 averaged over the surrogates, shape (P,)."""
    losses = [(m.features(x) - t).pow(2).sum(1) for m, t in zip(models, target_features)]
    return torch.stack(losses).mean(0)


def _objective(models: Sequence[nn.Module], x: torch.Tensor, target_features: Sequence[torch.Tensor],
               b: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per poison: Eq. (1)'s objective at `x` (no gradient) and the gradient of its feature term."""
    x = x.detach().requires_grad_(True)
    collision = feature_loss(models, x, target_features)
    (grad,) = torch.autograd.grad(collision.sum(), x)
    with torch.no_grad():
        return collision.detach() + beta * (x - b).pow(2).flatten(1).sum(1), grad


def feature_collision(models: Sequence[nn.Module], bases: torch.Tensor, target: torch.Tensor, *, epsilon: int,
                      params: PoisonFrogsParams) -> torch.Tensor:
    """Algorithm 1 of Shafahi et al. with the eps-ball projection and the reference's step rejection;
    float poisons (P, C, H, W) on [0, 1]."""
    models = [m.eval() for m in models]
    eps = to_unit(epsilon)
    with torch.no_grad():
        target_features = [m.features(target) for m in models]
    rule, steps, lr = resolve_rule(params, epsilon)
    b = project_images(bases + params.watermark * (target - bases), bases, eps)
    dim_b = b[0].numel()
    beta = params.beta if params.beta is not None else params.beta0 * feature_dim(models[0], b) ** 2 / dim_b ** 2
    if rule == "benchmark":
        beta = 0.0
    lam = torch.full((len(b),), lr, dtype=b.dtype, device=b.device)
    active = torch.ones(len(b), dtype=torch.bool, device=b.device)
    x = b.clone()
    objective, grad = _objective(models, x, target_features, b, beta)
    for step in range(steps):
        with torch.no_grad():
            scale = lam[:, None, None, None]
            proposal = project_images((x - scale * grad + scale * beta * b) / (1 + scale * beta), bases, eps)
        new_objective, new_grad = _objective(models, proposal, target_features, b, beta)
        with torch.no_grad():
            accept = active & (new_objective <= objective)
            moved = (proposal - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            lam = torch.where(active & ~accept, lam * params.decay, lam)
            mask = accept[:, None, None, None]
            x = torch.where(mask, proposal, x)
            grad = torch.where(mask, new_grad, grad)
            objective = torch.where(accept, new_objective, objective)
            active = active & ~(accept & (moved < params.tol))
        if step % 100 == 0:
            log.debug("poison_frogs step %d objective %.4f", step, float(objective.mean()))
        if not bool(active.any()):
            break
    return x.detach()


@register_attack
class PoisonFrogs(Attack):
    """Feature-collision poisons (Shafahi et al., NeurIPS 2018, Eq. 1, Algorithm 1) within an eps-ball."""

    name = "poison_frogs"
    paper = "Shafahi et al., Poison Frogs! Targeted Clean-Label Poisoning Attacks on Neural Networks, NeurIPS 2018"
    summary = "clean-label targeted: collide the bases' features with the target's (transfer learning)"
    Params = PoisonFrogsParams
    smoke = {"steps": 4, "lr": 0.05}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        def craft_key(bases: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return feature_collision(ctx.surrogates, bases, target, epsilon=ctx.threat.epsilon, params=self.params)

        return targeting.per_key_poisons(ctx, targeting.plan(ctx, n_poison, rng), craft_key)
