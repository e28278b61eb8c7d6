"""Influence-function poisoning: Koh & Liang, 'Understanding Black-box Predictions via Influence
Functions', ICML 2017 (Sec. 2, Eq. 2 and Sec. 5.2), with the attacker of Koh, Steinhardt & Liang,
'Stronger Data Poisoning Attacks Break Data Sanitization Defenses', Machine Learning 2022 (Sec. 4).

For a convex learner at its optimum theta*, the influence of up-weighting a training point z on the
attacker's validation loss O is I_up,loss(z) = -grad O^T H^{-1} grad_theta l(z) (Eq. 2), and of
perturbing it, I_pert,loss(z) = -grad O^T H^{-1} grad_x grad_theta l(z) (Sec. 2.2); the inverse-HVP
v = H^{-1} grad O is found by conjugate gradient or LiSSA with exact Hessian-vector products.
The attack (Sec. 5.2) ranks every training point of the pool by the first-order gain of an L-inf
step, ||I_pert,loss(z)||_1, perturbs the `n_poison` most influential ones along sign(I_pert,loss)
and refits the learner only every `refit_every` steps: between refits theta* is held fixed, which
is what makes influence cheaper than the full bi-level attack (poison_core.attacks.bilevel).

`selection: random` perturbs a uniform draw of points instead (the random-point control).
Defaults: logistic regression, lam = 1e-2, 20 steps of 1/10 of epsilon, refit every 5 steps, CG.
Labels are kept (valid clean-label).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.convex.crafting import ascend, check_classes, class_pool, local_labels
from poison_core.convex.features import from_features, to_features
from poison_core.convex.implicit import implicit_gradient, inverse_hvp, loss_gradient
from poison_core.convex.learners import ConvexLearner, fit, make_learner
from poison_core.data.dataset import ImageDataset

ClassId = Annotated[int, Field(ge=0, le=100_000)]


class InfluenceParams(AttackParams):
    learner: Literal["logistic", "ridge", "svm"] = "logistic"
    lam: float = Field(1e-2, gt=0, le=100)
    solver: Literal["cg", "lissa"] = "cg"
    steps: int = Field(20, ge=1, le=1000)
    refit_every: int = Field(5, ge=1, le=1000)
    step_fraction: float = Field(0.1, gt=0, le=1)
    n_val: int = Field(500, ge=1, le=100_000)
    max_fit: int = Field(2000, ge=2, le=100_000)
    classes: tuple[ClassId, ...] | None = Field(None, min_length=2)
    selection: Literal["influence", "random"] = "influence"

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError("class ids must be distinct")
        return classes


def perturbation_influence(learner: ConvexLearner, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                           x_val: torch.Tensor, y_val: torch.Tensor, solver: str = "cg") -> torch.Tensor:
    """I_pert,loss of every training row on the validation loss (Koh & Liang, Sec. 2.2), shape of x."""
    v = inverse_hvp(learner, theta, x, y, loss_gradient(learner, theta, x_val, y_val), solver=solver)
    return implicit_gradient(learner, theta, x, y, v)


@register_attack
class Influence(Attack):
    """Koh & Liang's influence attack: poison the most influential points along I_pert,loss."""

    name = "influence"
    paper = "Koh & Liang, ICML 2017 (Eq. 2, Sec. 5.2); Koh, Steinhardt & Liang, Machine Learning 2022"
    summary = "availability: perturb the most influential training points along the influence gradient"
    Params = InfluenceParams
    smoke = {"steps": 2, "refit_every": 1, "n_val": 40, "max_fit": 120}
    label_policy = "any"
    perturbation_only = True

    def check_dataset(self, train: ImageDataset) -> None:
        check_classes(self.params.classes, train.num_classes)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        pool, classes = class_pool(train.labels, p.classes)
        fit_pos = np.sort(rng.choice(pool, size=min(p.max_fit, len(pool)), replace=False))
        val = np.sort(rng.choice(pool, size=min(p.n_val, len(pool)), replace=False))
        x, y = to_features(train.images[fit_pos]), local_labels(train.labels[fit_pos], classes)
        x_val, y_val = to_features(train.images[val]), local_labels(train.labels[val], classes)
        learner = make_learner(p.learner, len(classes), x.shape[1], p.lam)
        theta = fit(learner, x, y)
        count = min(n_poison, len(fit_pos))
        if p.selection == "influence":
            scores = perturbation_influence(learner, theta, x, y, x_val, y_val, p.solver).abs().sum(dim=1).numpy()
            rows = np.sort(np.argsort(-scores, kind="stable")[:count])
        else:
            rows = np.sort(rng.choice(len(fit_pos), size=count, replace=False))
        best, history = ascend(learner, x, y, rows, x_val, y_val, epsilon=eps, steps=p.steps,
                               step_size=p.step_fraction * eps / 255.0, refit_every=p.refit_every, solver=p.solver)
        positions = fit_pos[rows]
        images = from_features(best, train.images[positions], eps)
        return Crafted(positions=positions, images=images, poison_labels=train.labels[positions],
                       targets={"kind": "availability", "surrogate_val_loss": [history[0], max(history)]})
