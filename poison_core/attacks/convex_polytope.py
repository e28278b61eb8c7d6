"""Convex Polytope: Zhu, Huang, Li, Taylor, Studer & Goldstein, 'Transferable Clean-Label Poisoning
Attacks on Deep Neural Nets', ICML 2019.

k poisons whose features, in each of m surrogate feature extractors phi^(i) (all of
ctx.surrogates), enclose the target's in their convex hull (the polytope objective that Algorithm 1 minimises):

    min_{c, x_p}  1/2 sum_i ||phi^(i)(x_t) - sum_j c_j^(i) phi^(i)(x_p^(j))||^2 / ||phi^(i)(x_t)||^2
    s.t.  sum_j c_j^(i) = 1,  c^(i) >= 0,  ||x_p^(j) - x_b^(j)||_inf <= eps.

Algorithm 1 alternates, as the reference code does (aks2203/poisoning-benchmark,
poison_crafting/ConvexPolytope/trainer.py: `least_squares_simplex`, `get_CP_loss`,
`make_convex_polytope_poisons`; the same in zhuchen03/ConvexPolytopePosioning/trainer.py):

1. for each network, the coefficients c^(i) solve the least-squares problem on the probability simplex
   by projected gradient descent, warm started from the previous c^(i): step t = 2 / L with L the
   largest eigenvalue of A^T A, halved whenever the gradient step raises the (unprojected) residual,
   else the step projected onto the simplex (Duchi et al., ICML 2008); stop when the relative change
   falls below `coef_tol` (the reference: 1e-6, at most 10,000 iterations). The reference estimates L
   by one power step from a random vector (a lower bound, so its first steps are longer and get
   halved); the exact eigenvalue here keeps the solver deterministic.
2. one Adam step (betas 0.9, 0.999) on the poisons, lr 0.04, 4000 iterations in the paper's transfer
   setting (the benchmark's script: 1200). The reference optimises the *normalised* tensor
   (x - mean) / std with the CIFAR-10 std (0.2023, 0.1994, 0.2010); our models take unnormalised [0, 1]
   inputs (poison_core/models: no normalisation layer), and an Adam step of size lr on x / std is a step
   of size lr * std on x (Adam's step is invariant to the gradient's scale), so the pixel-scale step is
   lr * `input_std` (0.04 * 0.2009 = 0.0080 per pixel, not 0.04).
3. projection onto the eps-ball around the bases and the pixel box [0, 1] (the reference clips
   (x - b) * std to [-eps, eps], then the image to [0, 1]: the same set on our scale).

The paper's dropout in the substitute networks during crafting is left out (our models have none).
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

log = logging.getLogger(__name__)


REFERENCE_STD = 0.2009  # mean of the reference's CIFAR-10 normalisation std (0.2023, 0.1994, 0.2010)


class ConvexPolytopeParams(AttackParams):
    """steps, lr: Zhu et al. Sec. 5 (4000 Adam iterations, lr 0.04), lr in the reference's units (Adam on
    the tensor normalised by std `input_std`, learning_module.data_mean_std_dict['cifar10']): the step
    on our [0, 1] pixel scale is lr * input_std. coef_iters / coef_tol: the inner simplex solver (the
    reference's `least_squares_simplex`: tol 1e-6, at most 10,000 iterations)."""

    steps: int = Field(4000, ge=1, le=100_000)
    lr: float = Field(0.04, gt=0, le=10)
    input_std: float = Field(REFERENCE_STD, gt=0, le=1)
    coef_iters: int = Field(10_000, ge=1, le=100_000)
    coef_tol: float = Field(1e-6, gt=0, le=1)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of the vector `v` onto the probability simplex (Duchi et al., ICML 2008)."""
    u, _ = torch.sort(v, descending=True)
    cssv = torch.cumsum(u, 0) - 1
    ind = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = (u - cssv / ind > 0).sum() - 1
    theta = cssv[rho] / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def simplex_least_squares(features: torch.Tensor, target: torch.Tensor, start: torch.Tensor, *, iters: int,
                          tol: float) -> torch.Tensor:
    """argmin_{c in simplex} ||target - c @ features||^2 by projected gradient descent (Algorithm 1, inner
    loop; the reference's `least_squares_simplex`): step 2 / L, halved when the gradient step raises the
    residual, otherwise the projected step is taken; stop at relative change < tol.

    features: (k, D) poison features; target: (D,); start: (k,) warm start on the simplex.
    """
    gram = features @ features.T
    rhs = features @ target

    def residual(c: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(target - c @ features))

    step = 2.0 / float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
    c, current = start, residual(start)
    for _ in range(iters):
        forward = c - step * (gram @ c - rhs)
        if residual(forward) > current:
            step /= 2
            continue
        new = project_simplex(forward)
        done = float(torch.linalg.vector_norm(new - c)) / max(float(torch.linalg.vector_norm(c)), 1e-8) < tol
        c, current = new, residual(new)
        if done:
            break
    return c


def polytope_loss(poison_features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor],
                  coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The convex-polytope objective (module docstring): per network, the residual of the target's features
    against the convex combination of the poisons' (k, D) features, relative to ||phi(x_t)||^2."""
    total = poison_features[0].new_zeros(())
    for features, t, c in zip(poison_features, target_features, coefficients):
        residual = t - c @ features
        total = total + 0.5 * residual.pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
    return total


def convex_polytope(models: Sequence[nn.Module], bases: torch.Tensor, target: torch.Tensor, *, epsilon: int,
                    params: ConvexPolytopeParams) -> torch.Tensor:
    """Algorithm 1 of Zhu et al.; float poisons (k, C, H, W) on [0, 1] within the eps-ball of `bases`."""
    models = [m.eval() for m in models]
    eps = to_unit(epsilon)
    with torch.no_grad():
        target_features = [m.features(target)[0] for m in models]
    k = len(bases)
    coefficients = [torch.full((k,), 1.0 / k, dtype=bases.dtype, device=bases.device) for _ in models]
    x = bases.clone().requires_grad_(True)
    # Adam(lr, eps) on x / std is exactly Adam(lr * std, eps / std) on x (module docstring, step 2).
    std = params.input_std
    optimizer = torch.optim.Adam([x], lr=params.lr * std, betas=(0.9, 0.999), eps=1e-8 / std)
    for step in range(params.steps):
        features = [m.features(x) for m in models]
        coefficients = [simplex_least_squares(f.detach(), t, c, iters=params.coef_iters, tol=params.coef_tol)
                        for f, t, c in zip(features, target_features, coefficients)]
        loss = polytope_loss(features, target_features, coefficients)
        (x.grad,) = torch.autograd.grad(loss, x)
        optimizer.step()
        with torch.no_grad():
            x.copy_(project_images(x, bases, eps))
        if step % 100 == 0:
            log.debug("convex_polytope step %d loss %.5f", step, float(loss.detach()))
    return x.detach()


@register_attack
class ConvexPolytope(Attack):
    """Convex-polytope poisons (Zhu et al., ICML 2019, polytope objective, Algorithm 1) against a surrogate ensemble."""

    name = "convex_polytope"
    paper = "Zhu et al., Transferable Clean-Label Poisoning Attacks on Deep Neural Nets, ICML 2019"
    summary = "clean-label targeted: poisons whose features enclose the target's in a convex polytope"
    Params = ConvexPolytopeParams
    smoke = {"steps": 3, "coef_iters": 20}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        def craft_key(bases: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return convex_polytope(ctx.surrogates, bases, target, epsilon=ctx.threat.epsilon, params=self.params)

        return targeting.per_key_poisons(ctx, targeting.plan(ctx, n_poison, rng), craft_key)
