"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, 'Towards Deep Learning Models
Resistant to Adversarial Attacks', ICLR 2018).

The saddle-point problem of the paper (Eq. 2.1)

    min_theta  E_{(x, y)}  max_{||delta||_inf <= eps}  L(theta, x + delta, y)

is trained by replacing each batch with its PGD adversarial examples (Eq. 2.2): from a uniform
random start in the eps-ball, `steps` signed-gradient ascent steps x <- Proj(x + a * sign(grad L)),
projected onto the eps-ball and onto the valid pixel range [0, 1]. The step size defaults to
2.5 * eps / steps, the rule of thumb of the Madry group's `robustness` library (Engstrom et al.
2019): enough to cross the ball from any start. The paper's CIFAR-10 setting is eps 8/255, 7 steps
of 2/255; the default here is 5 steps to keep CPU cost down. Adversarial training is a known partial
defense against poisons crafted to be imperceptible (Geiping et al., 'What Doesn't Kill You Makes
You Robust(er): How to Adversarially Train against Data Poisoning', 2021).

Mode during the attack: the model is put in eval mode while PGD runs (BatchNorm uses its running
statistics, so the attack's extra forward passes do not move them and each example is attacked
independently of its batch), then back in train mode for the update. Madry et al.'s TensorFlow code
ran the attack in train mode; eval mode is the common PyTorch practice (e.g. TRADES, Rice et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, ModelClassifier,
                                       register_defense)
from poison_core.training import TrainHooks, train_model


class AdversarialTrainingParams(DefenseParams):
    """epsilon: L-inf radius in /255 (8 as on CIFAR-10 in the paper); steps: PGD iterations;
    step_size: in /255 (None: 2.5 * epsilon / steps); random_start: uniform start in the ball."""

    epsilon: float = Field(8.0, ge=0, le=255)
    steps: int = Field(5, ge=1, le=100)
    step_size: float | None = Field(None, gt=0, le=255)
    random_start: bool = True


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, *, eps: float,
               steps: int, step_size: float, random_start: bool = True) -> torch.Tensor:
    """L-inf PGD on cross-entropy (Madry et al. 2018, Eq. 2.2): adversarial images in [0, 1] within eps of
    x (eps and step_size on the [0, 1] scale). y may be hard (N,) or soft (N, K) labels. The model's
    mode is left as it was; no parameter gradient is accumulated."""
    if eps == 0:
        return x
    was_training = model.training
    model.eval()
    target = y.float() if y.is_floating_point() else y
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=gen, device=gen.device, dtype=x.dtype) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), target)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    model.train(was_training)
    return (x + delta).detach()


@register_defense
class AdversarialTraining(Defense):
    """Train on PGD adversarial examples of every batch (Madry et al. 2018, Eqs. 2.1-2.2)."""

    name = "adversarial_training"
    paper = "Madry et al., ICLR 2018, Towards deep learning models resistant to adversarial attacks"
    summary = "training: replace each batch by its L-inf PGD adversarial examples"
    Params = AdversarialTrainingParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        from poison_core.protocols import build_victim

        p = self.params
        eps = p.epsilon / 255.0
        step = (p.step_size if p.step_size is not None else 2.5 * p.epsilon / p.steps) / 255.0
        data = ctx.train
        model = build_victim(ctx.victim, data, ctx.seed, ctx.device)

        def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return pgd_attack(model, x, y, gen, eps=eps, steps=p.steps, step_size=step,
                              random_start=p.random_start), y

        history = train_model(model, data, ctx.victim.train, device=ctx.device, seed=ctx.seed,
                              hooks=TrainHooks(augment=augment))
        return DefenseResult(ModelClassifier(model, ctx.device), history=list(history.epochs),
                             info={"epsilon": p.epsilon, "pgd_steps": float(p.steps)})
