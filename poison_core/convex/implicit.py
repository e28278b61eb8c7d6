"""Inverse-HVPs of a convex learner at its optimum and implicit gradients (the solvers: convex.linalg).

At the learner's optimum theta*(X), grad_theta F(theta*, X) = 0. The implicit function theorem
gives d theta* / d X = -H^{-1} d^2 F / (d theta d X), with H the Hessian of F at theta*. For an
outer (attacker) objective O(theta*) the chain rule then reads (Mei & Zhu, AAAI 2015, Eq. 8-9;
Koh & Liang, ICML 2017, Eq. 2 and the perturbation influence I_pert,loss of Sec. 2.2):

    v = H^{-1} grad_theta O,        dO / dX = -d/dX [ v . grad_theta F(theta*, X) ]   (v held fixed)

so one inverse-HVP and one mixed backward pass give the gradient with respect to every training
row at once. Removing sample i changes O by about +(1/n) v . grad_theta l_i (Koh & Liang, Eq. 2,
with epsilon = -1/n): :func:`removal_influence`.
"""

from __future__ import annotations


import torch

from poison_core.convex.learners import ConvexLearner
from poison_core.convex.linalg import conjugate_gradient, hvp, lissa, power_bound


def loss_gradient(learner: ConvexLearner, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_theta of the mean (unregularised) loss of `learner` on (x, y): the attacker's outer objective."""
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(learner.sample_losses(theta, x, y).mean(), theta)
    return grad


def inverse_hvp(learner: ConvexLearner, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, *,
                weights: torch.Tensor | None = None, solver: str = "cg", tol: float = 1e-10,
                max_iter: int | None = None, lissa_scale: float | None = None, lissa_depth: int = 2000) -> torch.Tensor:
    """H^{-1} b, H the Hessian of the training objective of `learner` at theta, by CG or LiSSA."""
    x, y = x.detach(), y.detach()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hvp(lambda t: learner.objective(t, x, y, weights), theta, v)

    if solver == "cg":
        return conjugate_gradient(matvec, b, tol=tol, max_iter=max_iter or 4 * learner.size)
    if solver == "lissa":
        scale = lissa_scale or power_bound(matvec, b)
        return lissa(matvec, b, scale=scale, depth=lissa_depth)
    raise ValueError(f"solver must be 'cg' or 'lissa', got {solver!r}")


def implicit_gradient(learner: ConvexLearner, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      v: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """-d/dX [v . grad_theta F(theta, X)]: with v = H^{-1} grad O, the gradient of O(theta*(X)) w.r.t. X."""
    theta = theta.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(learner.objective(theta, x, y, weights), theta, create_graph=True)
    (gx,) = torch.autograd.grad(grad.dot(v), x)
    return -gx


def removal_influence(learner: ConvexLearner, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """Predicted change of the outer objective when each training row is removed: (1/n) v . grad l_i."""
    theta = theta.detach().requires_grad_(True)
    losses = learner.sample_losses(theta, x.detach(), y)
    u = torch.zeros_like(losses, requires_grad=True)
    (jtu,) = torch.autograd.grad(losses, theta, grad_outputs=u, create_graph=True)
    (directional,) = torch.autograd.grad(jtu.dot(v), u)  # J v by the double-vjp trick
    return directional / len(x)
