"""MetaPoison's inner problem: K differentiable SGD steps, then the adversarial loss on the target.

Huang, Geiping, Fowl, Taylor & Goldstein, 'MetaPoison: Practical General-purpose Clean-label Data
Poisoning', NeurIPS 2020, Eq. (1) and Algorithm 1: the bi-level problem

    min_Delta  L_adv(x_t, y_adv; theta_K(Delta)),
    theta_{k+1} = theta_k - alpha * grad_theta L_train(B_k(Delta); theta_k),

is approximated by unrolling K steps (K = 2 in the paper) of plain SGD on mini-batches B_k and
differentiating through them with respect to the perturbation (create_graph=True: second-order
terms included). As in the reference code, a batch holds the poisons that fall into it among clean
samples, so every poison weighs in the mean loss and in BatchNorm's batch statistics exactly as it
will in the victim's training: a :data:`Batch` is (clean images, clean labels, indices of the
poisons in the batch). BatchNorm runs in train mode on a copy of the buffers during the unroll
and in eval mode on the target. The parameters are a dict given to torch.func.functional_call,
so the model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def unrolled_target_loss(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                         poisons: torch.Tensor, poison_labels: torch.Tensor, batches: Sequence[Batch],
                         target: torch.Tensor, adversarial_class: int, lr: float) -> torch.Tensor:
    """CE(f(x_t; theta_K), y_adv) after one SGD step of size `lr` per batch (mean CE over its poisons
    poisons[idx] and its clean samples)."""
    was_training = model.training
    params = dict(params)
    running = {name: b.clone() for name, b in buffers.items()}
    try:
        model.train()
        for clean_x, clean_y, idx in batches:
            x = torch.cat([poisons[idx], clean_x.to(poisons.dtype)])
            y = torch.cat([poison_labels[idx], clean_y])
            loss = F.cross_entropy(functional_call(model, (params, running), (x,)), y)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
        model.eval()
        logits = functional_call(model, (params, dict(buffers)), (target,))
    finally:
        model.train(was_training)
    y_adv = torch.full((len(target),), int(adversarial_class), dtype=torch.long, device=target.device)
    return F.cross_entropy(logits, y_adv)


def unrolled_adversarial_grad(model: nn.Module, bases: torch.Tensor, delta: torch.Tensor, poison_labels: torch.Tensor,
                              batches: Sequence[Batch], target: torch.Tensor, adversarial_class: int,
                              lr: float) -> tuple[float, torch.Tensor]:
    """(adversarial loss, d loss / d delta) for poisons bases + delta, through K = len(batches) unrolled
    SGD steps from `model`'s current weights."""
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    delta = delta.detach().requires_grad_(True)
    loss = unrolled_target_loss(model, params, buffers, bases + delta, poison_labels, batches, target,
                                adversarial_class, lr)
    (grad,) = torch.autograd.grad(loss, delta, allow_unused=True)
    return float(loss.detach()), torch.zeros_like(delta) if grad is None else grad.detach()
