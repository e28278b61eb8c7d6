"""pGAN: Muñoz-González, Pfitzner, Russo, Carnerero-Cano & Lupu, 'Poisoning Attacks with
Generative Adversarial Nets', arXiv:1906.07773, 2019.

Three players (Sec. 3, Eq. 1-3 of the paper): a generator G producing poisoning points labelled
with the attacked label, a discriminator D separating them from genuine points of that label, and
the target classifier C trained on the genuine training data plus the poisons. G minimises

    alpha * BCE(D(G), genuine) - (1 - alpha) * L_C(genuine data),   C trained on genuine + G,

so alpha trades detectability (alpha -> 1: poisons indistinguishable from genuine points of the
label) against damage (alpha -> 0: the error the poisons cause C on genuine data); D and C are
trained by their own losses in alternation with G.

Our G is conditioned on a base image of `classes[0]` (the poison keeps the base's position and
stays within the threat model's L-inf ball; set epsilon 255 for the paper's free generator) and the
poison label is `classes[1]`; D is compared with genuine `classes[1]` images; C is a linear softmax
classifier (L2 logistic regression) on the training samples of the two classes, refitted to its
optimum each round, and the damage gradient (its genuine-data loss, differentiated through its
optimality conditions as in poison_core.convex) replaces the paper's gradient through C's training:
with a jointly trained C and a damage term on the poisons' own loss, the generator pushed the poisons
to the pixel-box corners, where the victim isolated them and lost no accuracy. G and D are small
MLPs trained full-batch with Adam; G's last layer starts at zero, so training starts from plain
label flips of the base images. Defaults: alpha 0.5 (the middle of the paper's sweep over alpha
in [0, 1]), 200 rounds, width 64, lr 1e-3, lam 1e-2.
"""

from __future__ import annotations

import logging
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.convex.crafting import check_classes
from poison_core.convex.features import from_features, project_features, to_features
from poison_core.convex.implicit import implicit_gradient, inverse_hvp, loss_gradient
from poison_core.convex.learners import fit, make_learner
from poison_core.data.dataset import ImageDataset

log = logging.getLogger(__name__)
ClassId = Annotated[int, Field(ge=0, le=100_000)]


class PGANParams(AttackParams):
    classes: tuple[ClassId, ClassId] = (7, 1)
    alpha: float = Field(0.5, ge=0, le=1)
    iterations: int = Field(200, ge=1, le=100_000)
    width: int = Field(64, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1)
    lam: float = Field(1e-2, gt=0, le=100)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: tuple[int, int]) -> tuple[int, int]:
        if classes[0] == classes[1]:
            raise ValueError("the two classes must differ")
        return classes


def _mlp(dim: int, width: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, out)).double()


def _unit(g: torch.Tensor) -> torch.Tensor:
    norm = g.norm()
    return g / norm if norm > 0 else g


def train_pgan(x_base: torch.Tensor, x_genuine: torch.Tensor, x_clean: torch.Tensor, y_clean: torch.Tensor,
               poison_label: int, *, epsilon: int, alpha: float, iterations: int, width: int, lr: float,
               lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Alternate D, C and G updates; returns the poison feature rows and the final losses.

    C is L2 logistic regression refitted to its optimum on genuine + poison data every round, and the
    damage gradient d(genuine loss of C*)/d(poisons) is its implicit gradient (poison_core.convex).
    The detectability and damage gradients on the poisons are scaled to unit norm before the alpha
    mix, so alpha weighs directions rather than the two losses' raw scales.
    """
    dim = x_base.shape[1]
    radius = epsilon / 255.0
    gen, disc = _mlp(dim, width, dim), _mlp(dim, width, 1)
    nn.init.zeros_(gen[-1].weight)
    nn.init.zeros_(gen[-1].bias)
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), lr=lr), torch.optim.Adam(disc.parameters(), lr=lr)
    learner = make_learner("logistic", max(int(y_clean.max()), poison_label) + 1, dim, lam)
    y_all = torch.cat([y_clean, torch.full((len(x_base),), poison_label, dtype=torch.int64)])
    rows = torch.arange(len(x_clean), len(y_all))
    real, fake = torch.ones(len(x_genuine), 1, dtype=torch.float64), torch.zeros(len(x_base), 1, dtype=torch.float64)
    theta = None

    def poisons() -> torch.Tensor:
        return project_features(x_base + radius * torch.tanh(gen(x_base)), x_base, epsilon)

    stats: dict[str, float] = {}
    for _ in range(iterations):
        p = poisons().detach()
        d_loss = F.binary_cross_entropy_with_logits(disc(x_genuine), real) + \
            F.binary_cross_entropy_with_logits(disc(p), fake)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        x_all = torch.cat([x_clean, p])
        theta = fit(learner, x_all, y_all, theta0=theta)
        v = inverse_hvp(learner, theta, x_all, y_all, loss_gradient(learner, theta, x_clean, y_clean))
        damage_grad = implicit_gradient(learner, theta, x_all, y_all, v)[rows]
        p = poisons()
        fool = F.binary_cross_entropy_with_logits(disc(p), torch.ones(len(p), 1, dtype=torch.float64))
        (fool_grad,) = torch.autograd.grad(fool, p, retain_graph=True)
        opt_g.zero_grad()
        p.backward(alpha * _unit(fool_grad) - (1.0 - alpha) * _unit(damage_grad))
        opt_g.step()
        with torch.no_grad():
            damage = learner.sample_losses(theta, x_clean, y_clean).mean()
        stats = {"d_loss": float(d_loss.detach()), "fool": float(fool.detach()), "damage": float(damage)}
    log.info("pGAN (alpha=%.2f): %s", alpha, {k: round(v, 4) for k, v in stats.items()})
    return poisons().detach(), stats


@register_attack
class PGAN(Attack):
    """Muñoz-González et al.'s pGAN: generator, discriminator, classifier; alpha = detectability vs damage."""

    name = "pgan"
    paper = "Muñoz-González et al., Poisoning Attacks with Generative Adversarial Nets, arXiv:1906.07773 (Eq. 1-3)"
    summary = "dirty-label: GAN-generated poisons of one class labelled as the other, alpha = detectability vs damage"
    Params = PGANParams
    smoke = {"iterations": 5, "width": 8, "classes": (7, 1)}
    smoke_threat = {"epsilon": 64, "budget": 0.03}
    label_policy = "dirty"

    def check_dataset(self, train: ImageDataset) -> None:
        check_classes(self.params.classes, train.num_classes)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        source, target = p.classes
        bases = np.sort(rng.choice(np.flatnonzero(train.labels == source),
                                   size=min(n_poison, int(np.sum(train.labels == source))), replace=False))
        pool = np.setdiff1d(np.flatnonzero(np.isin(train.labels, p.classes)), bases)
        genuine = pool[train.labels[pool] == target]
        y_clean = torch.from_numpy((train.labels[pool] == target).astype(np.int64))
        x_poison, stats = train_pgan(to_features(train.images[bases]), to_features(train.images[genuine]),
                                     to_features(train.images[pool]), y_clean, 1, epsilon=eps, alpha=p.alpha,
                                     iterations=p.iterations, width=p.width, lr=p.lr,
                                     lam=p.lam)
        images = from_features(x_poison, train.images[bases], eps)
        return Crafted(positions=bases, images=images, poison_labels=np.full(len(bases), target, dtype=np.int64),
                       targets={"kind": "availability", "classes": list(p.classes), "alpha": p.alpha, **stats})
