"""Poisoning SVMs: Biggio, Nelson & Laskov, 'Poisoning Attacks against Support Vector Machines', ICML 2012.

The attacker adds points (x_c, y_c) to the training set of an SVM to maximise its hinge loss on a
validation set, L(x_c) = sum_k max(0, 1 - y_k f_{x_c}(x_k)) (Eq. 4). An attack point is
initialised by cloning a training point of one class of the pair and flipping its label (Sec. 4),
then moved by gradient ascent, u_{p+1} = u_p + t * grad L / ||grad L|| (Algorithm 1), where grad L
(Eq. 10) keeps the SVM at its optimum as the point moves (poison_core.convex.svm.attack_gradient);
the SVM is retrained after every step and the ascent stops when the validation loss changes by
less than `tol` or after `steps` steps. Several points are placed greedily: each one is optimised
with the previous ones already in the training set. Linear and RBF kernels.

Paper settings (Sec. 4, MNIST two-digit problems such as 7 vs 1): C = 1, 100 training and 500
validation points; pixels on [0, 1]. Here `classes` picks the pair (default 7 vs 1), `n_fit` and
`n_val` draw the attacker's sets from the training pool of that pair, and the step size t = 0.25
(in L2 on the flattened [0, 1] image) is our choice for 8x8 digits. On 64-pixel digits C = 1 caps a
point's dual weight so low that 10 points barely move the test error; C = 10 (used in the digits
config and the efficacy test) shows the paper's effect. Points stay within the threat
model's L-inf ball of their base image (set epsilon 255 for the paper's free movement).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.convex.crafting import check_classes
from poison_core.convex.features import from_features
from poison_core.convex.svm import KernelSpec, attack_gradient, fit_svc, hinge_loss
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError

log = logging.getLogger(__name__)
ClassId = Annotated[int, Field(ge=0, le=100_000)]


class SVMPoisonParams(AttackParams):
    classes: tuple[ClassId, ClassId] = (7, 1)
    kernel: Literal["linear", "rbf"] = "linear"
    C: float = Field(1.0, gt=0, le=1e6)
    gamma: float = Field(0.05, gt=0, le=1e3)
    n_fit: int = Field(100, ge=2, le=100_000)
    n_val: int = Field(500, ge=1, le=100_000)
    steps: int = Field(50, ge=1, le=10_000)
    step_size: float = Field(0.25, gt=0, le=100)
    tol: float = Field(1e-5, ge=0, le=1)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: tuple[int, int]) -> tuple[int, int]:
        if classes[0] == classes[1]:
            raise ValueError("the two classes must differ")
        return classes


def place_points(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, x_init: np.ndarray,
                 y_attack: np.ndarray, spec: KernelSpec, *, radius: float, steps: int, step_size: float,
                 tol: float) -> tuple[np.ndarray, list[float]]:
    """Greedy Algorithm 1: optimise each attack point in turn (labels +/-1, features on [0, 1]) within
    L-inf `radius` of its start; returns the points and the validation hinge loss after each one."""
    x, y = x_fit.copy(), y_fit.copy()
    points, losses = [], []
    for start, label in zip(x_init, y_attack):
        u, best, best_loss, previous = start.copy(), start.copy(), -np.inf, None
        for _ in range(steps):
            xa, ya = np.vstack([x, u]), np.append(y, label)
            alpha, b = fit_svc(xa, ya, spec)
            loss, _ = hinge_loss(xa, ya, x_val, y_val, spec)
            if loss > best_loss:
                best, best_loss = u.copy(), loss
            if previous is not None and abs(loss - previous) < tol:
                break
            previous = loss
            grad = attack_gradient(xa, ya, x_val, y_val, spec, alpha, b)
            norm = np.linalg.norm(grad)
            if norm == 0:
                break
            u = np.clip(np.clip(u + step_size * grad / norm, start - radius, start + radius), 0.0, 1.0)
        x, y = np.vstack([x, best]), np.append(y, label)
        points.append(best)
        losses.append(best_loss)
    log.info("svm poisoning: validation hinge loss after each point %s", np.round(losses, 4).tolist())
    return np.asarray(points).reshape(len(x_init), -1), losses


@register_attack
class SVMPoison(Attack):
    """Biggio et al.'s gradient-ascent poisoning of a linear or RBF SVM, points placed greedily."""

    name = "svm_poison"
    paper = "Biggio, Nelson & Laskov, Poisoning Attacks against Support Vector Machines, ICML 2012 (Eq. 4, 10; Alg. 1)"
    summary = "dirty-label: label-flipped clones moved by gradient ascent on an SVM's validation hinge loss"
    Params = SVMPoisonParams
    label_policy = "dirty"

    def check_dataset(self, train: ImageDataset) -> None:
        check_classes(self.params.classes, train.num_classes)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        neg, pos_class = p.classes
        pool = np.flatnonzero(np.isin(train.labels, p.classes))
        for value in p.classes:
            if not np.any(train.labels == value):
                raise ConfigError(f"params.classes: class {value} has no training samples")
        order = rng.permutation(pool)
        fit_pos = np.sort(order[: min(p.n_fit, len(pool) - 1)])
        rest = order[len(fit_pos):]
        bases = np.sort(rest[: min(n_poison, len(rest))])
        val = np.sort(rest[len(bases):][: p.n_val]) if len(rest) > len(bases) else fit_pos
        flat = train.images.reshape(len(train), -1).astype(np.float64) / 255.0
        sign = np.where(train.labels == pos_class, 1.0, -1.0)
        spec = KernelSpec(p.kernel, p.gamma, p.C)
        points, losses = place_points(flat[fit_pos], sign[fit_pos], flat[val], sign[val], flat[bases], -sign[bases],
                                      spec, radius=eps / 255.0, steps=p.steps, step_size=p.step_size, tol=p.tol)
        images = from_features(torch.from_numpy(points), train.images[bases], eps)
        labels = np.where(train.labels[bases] == pos_class, neg, pos_class).astype(np.int64)
        return Crafted(positions=bases, images=images, poison_labels=labels,
                       targets={"kind": "availability", "classes": list(p.classes), "val_hinge": losses})

