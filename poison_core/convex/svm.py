"""Kernel SVMs (scikit-learn's SVC, exact dual) and Biggio et al.'s gradient of the validation hinge
loss with respect to one attack point, keeping the SVM at its optimum.

Biggio, Nelson & Laskov, 'Poisoning Attacks against Support Vector Machines', ICML 2012, Sec. 3:
while the attack point x_c moves, the margin support vectors S keep satisfying the KKT equalities
(Eq. 5-7 of the paper)

    sum_j Q_sj alpha_j + y_s b = 1  (s in S),     sum_j y_j alpha_j = 0,

with the error vectors (alpha = C) and the reserve points (alpha = 0) held fixed; when x_c is itself
a margin support vector its own equality is kept and alpha_c moves with it (the paper holds
alpha_c fixed, which is exact only while x_c is an error vector). Solving
these equalities for (alpha_S, b) as a function of x_c and differentiating the validation hinge loss
L(x_c) = sum_k max(0, 1 - y_k f_{x_c}(x_k)) gives the paper's Eq. 10; here torch differentiates
through the solve of the same linear system, which is that derivation done by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KernelSpec:
    kind: str = "linear"
    gamma: float = 0.05
    C: float = 1.0

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return a @ b.T
        return torch.exp(-self.gamma * torch.cdist(a, b).pow(2))


def fit_svc(x: np.ndarray, y: np.ndarray, spec: KernelSpec) -> tuple[np.ndarray, float]:
    """Dual coefficients alpha (n,) and bias b of the SVM on labels y in {-1, +1} (deterministic)."""
    from sklearn.svm import SVC  # here, not at module level: importing the attack registry stays light

    svc = SVC(C=spec.C, kernel=spec.kind, gamma=spec.gamma, tol=1e-6, shrinking=False)
    svc.fit(x, y)
    alpha = np.zeros(len(x))
    sign = 1.0 if svc.classes_[1] == 1 else -1.0
    alpha[svc.support_] = np.abs(svc.dual_coef_[0])
    return alpha, sign * float(svc.intercept_[0])


def decision(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor | float, spec: KernelSpec,
             points: torch.Tensor) -> torch.Tensor:
    """f(points) = sum_j alpha_j y_j K(x_j, points) + b."""
    return spec(points, x) @ (alpha * y) + b


def _as_tensor(a: np.ndarray | float) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def hinge_loss(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               spec: KernelSpec) -> tuple[float, float]:
    """Mean validation hinge loss and error of the SVM retrained on (x, y)."""
    alpha, b = fit_svc(x, y, spec)
    t = _as_tensor
    f = decision(t(x), t(y), t(alpha), b, spec, t(x_val)).numpy()
    return float(np.maximum(0.0, 1.0 - y_val * f).mean()), float(np.mean(np.sign(f) != y_val))


def attack_gradient(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, spec: KernelSpec,
                    alpha: np.ndarray, b: float, tol: float = 1e-6) -> np.ndarray:
    """d L / d x_c for the attack point x_c = x[-1] (label y[-1]) at the SVM (alpha, b) fitted on (x, y)."""
    t = _as_tensor
    xs, ys, a, xv, yv = t(x[:-1]), t(y), t(alpha), t(x_val), t(y_val)
    u = t(x[-1]).clone().requires_grad_(True)
    full = torch.cat([xs, u[None]])
    margin = (a > tol) & (a < spec.C - tol)
    S = torch.nonzero(margin).flatten()
    fixed = torch.nonzero(~margin & (a > tol)).flatten()
    coef_fixed = a[fixed] * ys[fixed]
    if len(S):
        k_ss = spec(full[S], full[S]) * ys[S][None, :] + 1e-10 * torch.eye(len(S), dtype=torch.float64)
        top = torch.cat([k_ss, torch.ones(len(S), 1, dtype=torch.float64)], dim=1)
        bottom = torch.cat([ys[S], torch.zeros(1, dtype=torch.float64)])[None, :]
        rhs = torch.cat([ys[S] - spec(full[S], full[fixed]) @ coef_fixed, -coef_fixed.sum()[None]])
        solved = torch.linalg.solve(torch.cat([top, bottom]), rhs)
        alpha_s, bias = solved[:-1], solved[-1]
        f = spec(xv, full[S]) @ (alpha_s * ys[S]) + spec(xv, full[fixed]) @ coef_fixed + bias
    else:
        f = spec(xv, full[fixed]) @ coef_fixed + b
    loss = torch.relu(1.0 - yv * f).mean()
    (grad,) = torch.autograd.grad(loss, u)
    return grad.numpy()
