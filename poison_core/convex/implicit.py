"""Hessian-vector products, inverse-HVPs (conjugate gradient, LiSSA) and implicit gradients.

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

from collections.abc import Callable

import torch

from poison_core.convex.learners import ConvexLearner

MatVec = Callable[[torch.Tensor], torch.Tensor]


def hvp(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v for H the Hessian of the scalar fn at theta (Pearlmutter's double backward)."""
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(theta), theta, create_graph=True)
    (out,) = torch.autograd.grad(grad.dot(v), theta)
    return out.detach()


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, *, tol: float = 1e-10, max_iter: int = 1000) -> torch.Tensor:
    """Solve A x = b for symmetric positive definite A given as a matvec; stops at ||r|| <= tol ||b||."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r.dot(r))
    stop = (tol * float(b.norm())) ** 2
    for _ in range(max_iter):
        if rr <= stop:
            break
        ap = matvec(p)
        alpha = rr / float(p.dot(ap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(r.dot(r))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def lissa(matvec: MatVec, b: torch.Tensor, *, scale: float, depth: int = 1000, damping: float = 0.0) -> torch.Tensor:
    """LiSSA (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017, Sec. 3): the truncated Neumann series
    h_j = b + (1 - damping) h_{j-1} - H h_{j-1} / scale, returned as h_depth / scale.

    Converges to H^{-1} b when `scale` exceeds the largest eigenvalue of H. Full-batch HVPs here,
    so the estimate is deterministic.
    """
    h = b.clone()
    for _ in range(depth):
        h = b + (1.0 - damping) * h - matvec(h) / scale
    return h / scale


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
        scale = lissa_scale or _power_bound(matvec, b)
        return lissa(matvec, b, scale=scale, depth=lissa_depth)
    raise ValueError(f"solver must be 'cg' or 'lissa', got {solver!r}")


def _power_bound(matvec: MatVec, b: torch.Tensor, iters: int = 30) -> float:
    """1.1 x an estimate of the largest eigenvalue of H (power iteration from b): a safe LiSSA scale."""
    v = b / b.norm()
    top = 1.0
    for _ in range(iters):
        w = matvec(v)
        top = float(w.norm())
        v = w / top
    return 1.1 * top


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
