"""The projected gradient ascent shared by the bi-level and influence attacks, and the attacker's
view of the data (which rows it fits, which it poisons, which it validates on).

    max_{X_p in B_inf(X_p0, eps) cap [0,1]}  O(theta*(X)),   O = mean loss of theta* on a validation set

(Mei & Zhu, AAAI 2015, Eq. 2-3; Koh & Liang, ICML 2017, Sec. 5.2). Each step takes the implicit
gradient (:mod:`poison_core.convex.implicit`) of O with respect to the poison rows and moves them by
a signed step, the steepest ascent direction for an L-inf ball; the learner is refitted (warm start)
every `refit_every` steps, and the iterate with the highest validation loss after a refit is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from poison_core.convex.features import project_features
from poison_core.convex.implicit import implicit_gradient, inverse_hvp, loss_gradient
from poison_core.convex.learners import ConvexLearner, fit

log = logging.getLogger(__name__)


@dataclass
class AttackerView:
    """Positions (into the training set) the attacker fits, poisons (a subset of fit) and validates on."""

    fit: np.ndarray
    poison: np.ndarray
    val: np.ndarray
    classes: np.ndarray

    @property
    def poison_rows(self) -> np.ndarray:
        """Rows of the poisons inside the fit set."""
        return np.searchsorted(self.fit, self.poison)


def class_pool(labels: np.ndarray, classes: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions whose label is in `classes` (all when None) and the class ids used."""
    used = np.unique(labels) if classes is None else np.asarray(classes, dtype=np.int64)
    return np.flatnonzero(np.isin(labels, used)), used


def local_labels(labels: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """Dataset labels as indices 0..k-1 into `classes`."""
    lookup = {int(c): i for i, c in enumerate(classes)}
    return torch.tensor([lookup[int(label)] for label in labels], dtype=torch.int64)


def attacker_view(labels: np.ndarray, classes: tuple[int, ...] | None, n_poison: int, n_val: int, max_fit: int,
                  rng: np.random.Generator) -> AttackerView:
    """Poison positions drawn uniformly from the class pool; the fit set is them plus a uniform draw of
    the rest up to `max_fit`; the validation set is a uniform draw of `n_val` clean pool samples."""
    pool, used = class_pool(labels, classes)
    poison = np.sort(rng.choice(pool, size=min(n_poison, len(pool)), replace=False))
    rest = np.setdiff1d(pool, poison)
    extra = rng.choice(rest, size=min(len(rest), max(0, max_fit - len(poison))), replace=False)
    val = np.sort(rng.choice(pool, size=min(n_val, len(pool)), replace=False))
    return AttackerView(fit=np.sort(np.concatenate([poison, extra])), poison=poison, val=val, classes=used)


def validation_loss(learner: ConvexLearner, theta: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    with torch.no_grad():
        return float(learner.sample_losses(theta, x_val, y_val).mean())


def ascend(learner: ConvexLearner, x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, x_val: torch.Tensor,
           y_val: torch.Tensor, *, epsilon: int, steps: int, step_size: float, refit_every: int = 1,
           solver: str = "cg") -> tuple[torch.Tensor, list[float]]:
    """Signed implicit-gradient ascent of the validation loss on rows `rows` of `x`; returns the best
    poison rows found and the validation loss after each refit (first entry: the clean start)."""
    x = x.clone()
    base = x[rows].clone()
    idx = torch.from_numpy(rows)
    theta = fit(learner, x, y)
    history = [validation_loss(learner, theta, x_val, y_val)]
    best, best_loss = x[idx].clone(), history[0]
    v = inverse_hvp(learner, theta, x, y, loss_gradient(learner, theta, x_val, y_val), solver=solver)
    for step in range(1, steps + 1):
        grad = implicit_gradient(learner, theta, x, y, v)[idx]
        x[idx] = project_features(x[idx] + step_size * grad.sign(), base, epsilon)
        if step % refit_every == 0 or step == steps:
            theta = fit(learner, x, y, theta0=theta)
            history.append(validation_loss(learner, theta, x_val, y_val))
            if history[-1] > best_loss:
                best, best_loss = x[idx].clone(), history[-1]
            v = inverse_hvp(learner, theta, x, y, loss_gradient(learner, theta, x_val, y_val), solver=solver)
    log.info("implicit-gradient ascent: validation loss %.4f -> %.4f (best %.4f) in %d steps",
             history[0], history[-1], best_loss, steps)
    return best, history


def check_classes(classes: tuple[int, ...] | None, num_classes: int, field: str = "classes") -> None:
    """One-line ConfigError when a class id of the params is not a class of the dataset."""
    from poison_core.errors import ConfigError

    for value in classes or ():
        if value >= num_classes:
            raise ConfigError(f"params.{field}: class {value} is outside 0..{num_classes - 1}")
