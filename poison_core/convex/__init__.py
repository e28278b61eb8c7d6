"""Differentiable convex learners on flattened pixels and the implicit-differentiation machinery
of the classic poisoning attacks (Mei & Zhu 2015; Koh & Liang 2017).

    learner = make_learner("logistic", num_classes=2, dim=64, lam=1e-2)
    theta = fit(learner, X, y)                           # deterministic Newton-CG, float64
    v = inverse_hvp(learner, theta, X, y, grad_outer)    # H^{-1} g by conjugate gradient
    g_x = implicit_gradient(learner, theta, X, y, v)     # d outer / d X through the optimum

Everything is float64 torch on the CPU; features are uint8 pixels / 255, flattened (N, H*W*C).
"""

from poison_core.convex.features import from_features, to_features
from poison_core.convex.implicit import implicit_gradient, inverse_hvp, loss_gradient, removal_influence
from poison_core.convex.linalg import conjugate_gradient, hvp, lissa
from poison_core.convex.learners import LEARNERS, ConvexLearner, LogisticRegression, Ridge, SmoothSVM, fit, make_learner

__all__ = ["LEARNERS", "ConvexLearner", "LogisticRegression", "Ridge", "SmoothSVM", "conjugate_gradient", "fit",
           "from_features", "hvp", "implicit_gradient", "inverse_hvp", "lissa", "loss_gradient", "make_learner",
           "removal_influence", "to_features"]
