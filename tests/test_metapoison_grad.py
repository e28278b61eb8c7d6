"""MetaPoison's unrolled meta-gradient (Huang et al., NeurIPS 2020, Eq. 1 unrolled as in Algorithm 1)
against central finite differences, in float64 on tiny models: K = 2 unrolled SGD steps, then the
adversarial loss, for the reference's outer loss (CW margin over stages 1..K, target in the train-mode
batch) and the earlier one (cross-entropy at stage K, target in eval mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poison_core.attacks._unroll import OuterLoss, unrolled_adversarial_grad, unrolled_target_loss

OUTERS = {"reference": OuterLoss(), "earlier": OuterLoss(objective="xent", stages="last", target_in_batch=False)}


class TinyMLP(nn.Module):
    """4x4 grey images -> 6 hidden (tanh, smooth so finite differences are exact to O(h^2)) -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyBN(nn.Module):
    """Conv + BatchNorm: the unroll differentiates through train-mode batch statistics (poisons and clean
    samples share them, as in training); the target is scored with the (random) running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def setup(model_cls: type[nn.Module], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model_cls().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    bases = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    delta = (torch.rand(bases.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.1
    labels = torch.tensor([2, 2, 2])
    batches = [(torch.rand(5, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen),
                torch.tensor(rows)) for rows in ([0, 2], [1, 2])]  # K = 2 unrolled steps, poisons 0, 2 then 1, 2
    target = torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    return model, bases, delta, labels, batches, target


def loss_at(model: nn.Module, bases, delta, labels, batches, target, lr: float, outer: OuterLoss) -> float:
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    loss = unrolled_target_loss(model, params, buffers, bases + delta, labels, batches, target, 2, lr, outer)
    return float(loss.detach())


@pytest.mark.parametrize("outer", sorted(OUTERS))
@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBN])
def test_unrolled_gradient_matches_central_differences(model_cls, outer):
    model, bases, delta, labels, batches, target = setup(model_cls)
    lr, h, outer = 0.5, 1e-5, OUTERS[outer]
    loss, grad = unrolled_adversarial_grad(model, bases, delta, labels, batches, target, 2, lr, outer)
    assert abs(loss - loss_at(model, bases, delta, labels, batches, target, lr, outer)) < 1e-12
    numeric = torch.zeros_like(delta)
    flat = numeric.view(-1)
    for i in range(delta.numel()):
        step = torch.zeros_like(delta).view(-1)
        step[i] = h
        step = step.view_as(delta)
        plus = loss_at(model, bases, delta + step, labels, batches, target, lr, outer)
        minus = loss_at(model, bases, delta - step, labels, batches, target, lr, outer)
        flat[i] = (plus - minus) / (2 * h)
    rel = float(torch.linalg.vector_norm(grad - numeric) / torch.linalg.vector_norm(numeric))
    assert rel < 1e-6, f"relative error {rel:.2e}"
    assert float(torch.linalg.vector_norm(numeric)) > 1e-6  # the check is not vacuous


def test_second_order_terms_matter():
    """The meta-gradient is not the first-order one: without create_graph the poisons get no gradient."""
    model, bases, delta, labels, batches, target = setup(TinyMLP, seed=1)
    outer = OUTERS["earlier"]
    _, grad_k2 = unrolled_adversarial_grad(model, bases, delta, labels, batches, target, 2, 0.5, outer)
    _, grad_k1 = unrolled_adversarial_grad(model, bases, delta, labels, batches[:1], target, 2, 0.5, outer)
    assert not torch.allclose(grad_k1, grad_k2)
    assert float(grad_k2.abs().sum()) > 0


def test_unroll_leaves_the_model_untouched():
    model, bases, delta, labels, batches, target = setup(TinyBN, seed=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unrolled_adversarial_grad(model, bases, delta, labels, batches, target, 2, 0.5)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_gradient_is_deterministic():
    model, bases, delta, labels, batches, target = setup(TinyMLP, seed=3)
    first = unrolled_adversarial_grad(model, bases, delta, labels, batches, target, 2, 0.5)[1]
    again = unrolled_adversarial_grad(model, bases, delta, labels, batches, target, 2, 0.5)[1]
    assert np.array_equal(first.numpy(), again.numpy())


def test_only_poisons_in_the_batches_get_gradient():
    model, bases, delta, labels, batches, target = setup(TinyMLP, seed=4)
    _, grad = unrolled_adversarial_grad(model, bases, delta, labels, batches[:1], target, 2, 0.5)
    assert float(grad[1].abs().sum()) == 0 and float(grad[0].abs().sum()) > 0
    empty = [(x, y, torch.zeros(0, dtype=torch.long)) for x, y, _ in batches]
    loss, grad = unrolled_adversarial_grad(model, bases, delta, labels, empty, target, 2, 0.5, OUTERS["earlier"])
    assert float(grad.abs().sum()) == 0 and loss > 0
