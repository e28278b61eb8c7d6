"""The linear algebra of the convex learners: Hessian-vector products and inverse-HVP solvers.

Pearlmutter's double backward for H v; conjugate gradient (Hestenes & Stiefel 1952) for H x = b with H
symmetric positive definite; LiSSA (Agarwal, Bullins & Hazan 2017; Koh & Liang, ICML 2017, Sec. 3) and
a power-iteration bound on H's largest eigenvalue for its scale. Used by `learners.fit` (Newton-CG) and
`implicit` (inverse-HVPs at the optimum), which therefore both import downwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def power_bound(matvec: MatVec, b: torch.Tensor, iters: int = 30) -> float:
    """1.1 x an estimate of the largest eigenvalue of H (power iteration from b): a safe LiSSA scale."""
    v = b / b.norm()
    top = 1.0
    for _ in range(iters):
        w = matvec(v)
        top = float(w.norm())
        v = w / top
    return 1.1 * top
