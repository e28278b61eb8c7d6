"""Bi-level training-set attack on convex learners: Mei & Zhu, 'Using Machine Teaching to Identify
Optimal Training-Set Attacks on Machine Learners', AAAI 2015.

The attacker solves the bi-level problem (Eq. 2-3 of the paper)

    max_{X_p}  O(theta*)   s.t.  theta* = argmin_theta  (1/n) sum_i l(theta; x_i, y_i) + (lam/2) ||theta||^2,

with O the validation loss of the learner (an availability goal) and X_p the poison rows inside the
threat model's L-inf ball. The lower level is replaced by its optimality condition and the gradient
is taken through it by the implicit function theorem (Eq. 8-9): dO/dX_p = -d/dX_p [v . grad F] with
v = H^{-1} grad_theta O, v found by conjugate gradient. Signed ascent steps, the learner refitted
after every step (warm-started Newton-CG). Learners: logistic regression, ridge, smoothed linear
SVM (poison_core.convex.learners). Labels are kept, so the attack is valid clean-label too.

Defaults: 20 steps of 1/10 of epsilon, lam = 1e-2, a 500-sample validation draw of the clean
training pool and a fit set of at most 2000 samples (the paper's sets are of a few hundred points).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.convex.crafting import ascend, attacker_view, check_classes, local_labels
from poison_core.convex.features import from_features, to_features
from poison_core.convex.learners import make_learner
from poison_core.data.dataset import ImageDataset

ClassId = Annotated[int, Field(ge=0, le=100_000)]


class BilevelParams(AttackParams):
    learner: Literal["logistic", "ridge", "svm"] = "logistic"
    lam: float = Field(1e-2, gt=0, le=100)
    steps: int = Field(20, ge=1, le=1000)
    step_fraction: float = Field(0.1, gt=0, le=1)
    n_val: int = Field(500, ge=1, le=100_000)
    max_fit: int = Field(2000, ge=2, le=100_000)
    classes: tuple[ClassId, ...] | None = Field(None, min_length=2)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError("class ids must be distinct")
        return classes


@register_attack
class Bilevel(Attack):
    """Mei & Zhu's bi-level attack: implicit-gradient ascent of a convex learner's validation loss."""

    name = "bilevel"
    paper = "Mei & Zhu, Using Machine Teaching to Identify Optimal Training-Set Attacks, AAAI 2015 (Eq. 2-3, 8-9)"
    summary = "availability: poisons ascend a convex learner's validation loss through its KKT conditions"
    Params = BilevelParams
    smoke = {"steps": 2, "n_val": 40, "max_fit": 120}
    label_policy = "any"
    perturbation_only = True

    def check_dataset(self, train: ImageDataset) -> None:
        check_classes(self.params.classes, train.num_classes)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        view = attacker_view(train.labels, p.classes, n_poison, p.n_val, p.max_fit, rng)
        x, y = to_features(train.images[view.fit]), local_labels(train.labels[view.fit], view.classes)
        x_val, y_val = to_features(train.images[view.val]), local_labels(train.labels[view.val], view.classes)
        learner = make_learner(p.learner, len(view.classes), x.shape[1], p.lam)
        best, history = ascend(learner, x, y, view.poison_rows, x_val, y_val, epsilon=eps, steps=p.steps,
                               step_size=p.step_fraction * eps / 255.0)
        images = from_features(best, train.images[view.poison], eps)
        return Crafted(positions=view.poison, images=images, poison_labels=train.labels[view.poison],
                       targets={"kind": "availability", "surrogate_val_loss": [history[0], max(history)]})
