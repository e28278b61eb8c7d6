"""MetaPoison's inner problem: K differentiable SGD steps, then the adversarial loss on the target.

Huang, Geiping, Fowl, Taylor & Goldstein, 'MetaPoison: Practical General-purpose Clean-label Data
Poisoning', NeurIPS 2020, Eq. (1) and Algorithm 1: the bi-level problem

    min_Delta  L_adv(x_t, y_adv; theta(Delta)),
    theta_{k+1} = theta_k - alpha * grad_theta L_train(B_k(Delta); theta_k),

is approximated by unrolling K steps (K = 2 in the paper) of plain SGD on mini-batches B_k and
differentiating through them with respect to the perturbation (create_graph=True: second-order
terms included). A :data:`Batch` is (clean images, clean labels, indices of the poisons in the batch
that carry the perturbation's gradient); every poison weighs in the mean loss and in BatchNorm's batch
statistics as it will in the victim's training. The parameters are a dict given to
torch.func.functional_call, so the model itself is never modified.

The outer loss follows the reference (github:wronnyhuang/metapoison, meta.py ``Meta.build_metalearner_graph``):
the target is concatenated to every unrolled batch, so it is scored in train mode with that batch's
BatchNorm statistics ('targeter-i' reads the logits of the batch forward at stage i); the loss is the
Carlini-Wagner margin max_{j != adv} z_j - z_adv, clamped below at -100 (utils.py ``carlini``), averaged
over the unroll stages 1..K ('metaloss': ``add_n(cwTs[1:]) / K``). The stage-K forward needs one
batch beyond the K SGD batches (``tail``; the reference's queue holds K + 1 batches). Where the
reference writes the runner-up as max(z - z * onehot), which reads 0 for the adversarial class, we
take the true runner-up logit. :class:`OuterLoss` also offers cross-entropy ('xentT'), the last stage
only, and an eval-mode target scored with the running statistics (this module's earlier behaviour).

With the ReColorAdv option (:func:`unrolled_recolor_grad`) the poisons are f_theta(bases) + delta, the
colour function first and the additive part on top (reference meta.py ``poisoninputs_masked_recolored``
then ``poisoninputs_masked_perturbed``), and the meta-gradient is taken in both delta and theta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poison_core.recolor import recolor

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class OuterLoss:
    """How the unrolled trajectory is scored on the target. objective: 'cw' (reference default cwT) or
    'xent'; stages: 'mean' over stages 1..K (reference) or 'last' (stage K only); target_in_batch: the
    target rides in each unrolled batch in train mode (reference) or is scored alone in eval mode."""

    objective: Literal["cw", "xent"] = "cw"
    stages: Literal["mean", "last"] = "mean"
    target_in_batch: bool = True
    clamp: float = -100.0


def carlini_margin(logits: torch.Tensor, adversarial_class: int, clamp: float = -100.0) -> torch.Tensor:
    """Mean over rows of max(max_{j != adv} z_j - z_adv, clamp) (Carlini & Wagner's margin, reference
    utils.py ``carlini``): negative once the adversarial class leads."""
    adv = logits[:, adversarial_class]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, adversarial_class] = True
    runner_up = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return (runner_up - adv).clamp(min=clamp).mean()


def _score(logits: torch.Tensor, adversarial_class: int, outer: OuterLoss) -> torch.Tensor:
    if outer.objective == "cw":
        return carlini_margin(logits, adversarial_class, outer.clamp)
    y_adv = torch.full((len(logits),), int(adversarial_class), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, y_adv)


def _inputs(poisons: torch.Tensor, poison_labels: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    clean_x, clean_y, idx = batch
    return torch.cat([poisons[idx], clean_x.to(poisons.dtype)]), torch.cat([poison_labels[idx], clean_y])


def unrolled_target_loss(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                         poisons: torch.Tensor, poison_labels: torch.Tensor, batches: Sequence[Batch],
                         target: torch.Tensor, adversarial_class: int, lr: float, outer: OuterLoss = OuterLoss(),
                         tail: Batch | None = None) -> torch.Tensor:
    """The adversarial loss along K = len(batches) SGD steps of size `lr` (mean CE over each batch's
    poisons poisons[idx] and clean samples). With outer.target_in_batch the target at theta_k is read
    from the train-mode forward of batches[k] (k < K) and of `tail` (k = K; default batches[-1])."""
    was_training = model.training
    params = dict(params)
    running = {name: b.clone() for name, b in buffers.items()}
    target = target.to(poisons.dtype)
    K, stage_losses = len(batches), []

    def wanted(stage: int) -> bool:
        return stage >= 1 and (outer.stages == "mean" or stage == K)

    try:
        for k, batch in enumerate(batches):
            model.train()
            x, y = _inputs(poisons, poison_labels, batch)
            if outer.target_in_batch:
                logits = functional_call(model, (params, running), (torch.cat([x, target]),))
                if wanted(k):
                    stage_losses.append(_score(logits[len(x):], adversarial_class, outer))
                logits = logits[:len(x)]
            else:
                logits = functional_call(model, (params, running), (x,))
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
            if not outer.target_in_batch and wanted(k + 1):
                model.eval()
                target_logits = functional_call(model, (params, dict(buffers)), (target,))
                stage_losses.append(_score(target_logits, adversarial_class, outer))
        if outer.target_in_batch:
            model.train()
            x, _ = _inputs(poisons, poison_labels, tail if tail is not None else batches[-1])
            logits = functional_call(model, (params, running), (torch.cat([x, target]),))
            stage_losses.append(_score(logits[len(x):], adversarial_class, outer))
    finally:
        model.train(was_training)
    return torch.stack(stage_losses).mean()


def unrolled_adversarial_grad(model: nn.Module, bases: torch.Tensor, delta: torch.Tensor, poison_labels: torch.Tensor,
                              batches: Sequence[Batch], target: torch.Tensor, adversarial_class: int, lr: float,
                              outer: OuterLoss = OuterLoss(), tail: Batch | None = None) -> tuple[float, torch.Tensor]:
    """(adversarial loss, d loss / d delta) for poisons bases + delta, through K = len(batches) unrolled
    SGD steps from `model`'s current weights."""
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    delta = delta.detach().requires_grad_(True)
    loss = unrolled_target_loss(model, params, buffers, bases + delta, poison_labels, batches, target,
                                adversarial_class, lr, outer, tail)
    (grad,) = torch.autograd.grad(loss, delta, allow_unused=True)
    return float(loss.detach()), torch.zeros_like(delta) if grad is None else grad.detach()


def unrolled_recolor_grad(model: nn.Module, bases: torch.Tensor, delta: torch.Tensor, color: torch.Tensor,
                          poison_labels: torch.Tensor, batches: Sequence[Batch], target: torch.Tensor,
                          adversarial_class: int, lr: float, outer: OuterLoss = OuterLoss(),
                          tail: Batch | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(adversarial loss, d loss / d delta, d loss / d color) for poisons recolor(bases, color) + delta,
    through K = len(batches) unrolled SGD steps from `model`'s current weights."""
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    delta = delta.detach().requires_grad_(True)
    color = color.detach().requires_grad_(True)
    loss = unrolled_target_loss(model, params, buffers, recolor(bases, color) + delta, poison_labels, batches,
                                target, adversarial_class, lr, outer, tail)
    grad_delta, grad_color = torch.autograd.grad(loss, (delta, color), allow_unused=True)
    return (float(loss.detach()), torch.zeros_like(delta) if grad_delta is None else grad_delta.detach(),
            torch.zeros_like(color) if grad_color is None else grad_color.detach())
