"""Convex linear learners on feature rows, with a flat parameter vector theta = (W, b).

Each learner is a regularised empirical risk (Mei & Zhu, AAAI 2015, Eq. 1, the lower level):

    F(theta; X, y, w) = (1 / n) sum_i w_i l(theta; x_i, y_i) + (lam / 2) ||theta||^2,

with per-sample weights w (1 by default; Koh & Liang's up-weighting epsilon) and n = len(X) kept
fixed when weights change, so F is smooth and lam-strongly convex and its minimiser is unique:

* ``logistic``: multinomial cross-entropy of the scores s = W x + b.
* ``ridge``: 0.5 ||s - onehot(y)||^2 (least squares on one-hot targets).
* ``svm``: one-vs-rest hinge smoothed as softplus(beta (1 - t s)) / beta with t in {-1, +1}
  (a twice-differentiable surrogate of the hinge, so the implicit function theorem applies).

The bias is regularised too, which removes the softmax shift invariance. :func:`fit` is a
deterministic damped Newton method with conjugate-gradient directions (Newton-CG).
"""

from __future__ import annotations

import functools

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from poison_core.convex.linalg import conjugate_gradient, hvp
from poison_core.registry import Registry


class ConvexLearner(ABC):
    """A linear scoring model s = W x + b with a convex per-sample loss and an L2 penalty."""

    name: ClassVar[str]

    def __init__(self, num_classes: int, dim: int, lam: float = 1e-2) -> None:
        if num_classes < 2 or dim < 1 or lam <= 0:
            raise ValueError(f"need num_classes >= 2, dim >= 1, lam > 0; got {num_classes}, {dim}, {lam}")
        self.num_classes, self.dim, self.lam = num_classes, dim, lam

    @property
    def size(self) -> int:
        return self.num_classes * (self.dim + 1)

    def init_params(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64)

    def scores(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k, d = self.num_classes, self.dim
        return x @ theta[: k * d].reshape(k, d).T + theta[k * d:]

    @abstractmethod
    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses l(theta; x_i, y_i), shape (n,)."""

    def objective(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
        losses = self.sample_losses(theta, x, y)
        if weights is not None:
            losses = losses * weights
        return losses.sum() / len(x) + 0.5 * self.lam * theta.dot(theta)

    def error(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.scores(theta, x).argmax(dim=1) != y).double().mean())


LEARNERS: Registry[type[ConvexLearner]] = Registry("convex learner")


@LEARNERS.register("logistic", paper="Mei & Zhu, AAAI 2015 (logistic regression)", summary="multinomial L2 logistic")
class LogisticRegression(ConvexLearner):
    name = "logistic"

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scores(theta, x), y, reduction="none")


@LEARNERS.register("ridge", paper="Mei & Zhu, AAAI 2015 (ridge regression)", summary="least squares on one-hot")
class Ridge(ConvexLearner):
    name = "ridge"

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, self.num_classes).to(theta.dtype)
        return 0.5 * (self.scores(theta, x) - target).pow(2).sum(dim=1)


@LEARNERS.register("svm", paper="Mei & Zhu, AAAI 2015 (SVM)", summary="one-vs-rest smoothed-hinge linear SVM")
class SmoothSVM(ConvexLearner):
    name = "svm"
    beta: ClassVar[float] = 10.0

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sign = 2.0 * F.one_hot(y, self.num_classes).to(theta.dtype) - 1.0
        margins = 1.0 - sign * self.scores(theta, x)
        return (F.softplus(self.beta * margins) / self.beta).sum(dim=1)


def make_learner(name: str, num_classes: int, dim: int, lam: float = 1e-2) -> ConvexLearner:
    return LEARNERS.get(name)(num_classes, dim, lam)


def fit(learner: ConvexLearner, x: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None,
        theta0: torch.Tensor | None = None, tol: float = 1e-10, max_iter: int = 100) -> torch.Tensor:
    """The minimiser of F by damped Newton-CG (deterministic; warm-started from `theta0` when given).

    Stops when the gradient norm falls below `tol` (relative to max(1, ||grad at start||)).
    """
    x, y = x.detach(), y.detach()
    theta = (learner.init_params() if theta0 is None else theta0.detach().clone()).requires_grad_(True)

    def value(t: torch.Tensor) -> torch.Tensor:
        return learner.objective(t, x, y, weights)

    scale = None
    for _ in range(max_iter):
        f = value(theta)
        (grad,) = torch.autograd.grad(f, theta)
        norm = float(grad.norm())
        scale = scale or max(1.0, norm)
        if norm <= tol * scale:
            break
        direction = conjugate_gradient(functools.partial(hvp, value, theta), -grad, tol=min(0.1, norm ** 0.5) * 1e-2,
                                       max_iter=learner.size)
        step, slope = 1.0, float(grad.dot(direction))
        with torch.no_grad():
            while step > 1e-8 and float(value(theta + step * direction)) > float(f) + 1e-4 * step * slope:
                step *= 0.5
            theta = (theta + step * direction).detach().requires_grad_(True)
    return theta.detach()
