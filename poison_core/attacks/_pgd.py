"""Shared helpers of the perturbation attacks: sign-gradient PGD against fixed models, position draws.

Projected gradient descent (Madry et al., 'Towards Deep Learning Models Resistant to Adversarial
Attacks', ICLR 2018, Eq. 2): x_{t+1} = Proj_{B_inf(x, eps) cap [0,1]}(x_t +/- alpha * sign(grad)).
Attacks optimise in float on [0, 1]; the result is put on the uint8 grid once, at the end, by
:func:`poison_core.perturbation.quantize` (the grid's rules and layout convention live there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poison_core.perturbation import project_linf, quantize, to_unit
from poison_core.training import batch_slices, to_tensor

Objective = Callable[[torch.Tensor], torch.Tensor]
Projection = Callable[[torch.Tensor], torch.Tensor]


def sign_descent(param: torch.Tensor, objective: Objective, *, steps: int, step_size: float,
                 project: Projection) -> torch.Tensor:
    """`steps` signed-gradient steps that DEcrease `objective(param)`, each followed by `project`.

    To maximise a loss, pass its negative. Model parameters get no gradient (torch.autograd.grad
    differentiates with respect to `param` only).
    """
    param = project(param.detach())
    for _ in range(steps):
        param.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(param), param)
        param = project(param.detach() - step_size * grad.sign())
    return param.detach()


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Mean logits of `models` (one model: its logits)."""
    out = models[0](x)
    for model in models[1:]:
        out = out + model(x)
    return out / len(models)


def torch_generator(rng: np.random.Generator, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the attack's numpy generator (deterministic per ctx.seed)."""
    return torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))


def pgd_against(models: Sequence[nn.Module], images: np.ndarray, labels: np.ndarray, *, epsilon: int,
                steps: int, step_size: float, minimize: bool, random_start: bool, rng: np.random.Generator,
                device: torch.device | str, batch_size: int = 256) -> np.ndarray:
    """PGD on cross-entropy against fixed (eval-mode) `models`, batch by batch; uint8 NHWC out.

    minimize=False: untargeted, ascend CE(f(x + delta), labels) (error-maximising noise);
    minimize=True: descend CE towards `labels` (class-targeted noise when labels are target classes).
    `step_size` is on the [0, 1] scale.
    """
    radius = to_unit(epsilon)
    gen = torch_generator(rng, device)
    sign = 1.0 if minimize else -1.0
    out = np.empty_like(images)
    with frozen(models):
        for batch in batch_slices(len(images), batch_size):
            out[batch] = _pgd_batch(models, images[batch], labels[batch], radius=radius, epsilon=epsilon,
                                    steps=steps, step_size=step_size, sign=sign, random_start=random_start,
                                    gen=gen, device=device)
    return out


def _pgd_batch(models: Sequence[nn.Module], images: np.ndarray, labels: np.ndarray, *, radius: float,
               epsilon: int, steps: int, step_size: float, sign: float, random_start: bool,
               gen: torch.Generator, device: torch.device | str) -> np.ndarray:
    x = to_tensor(images, device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    start = torch.zeros_like(x)
    if random_start:
        start = (torch.rand(x.shape, generator=gen, device=device) * 2 - 1) * radius

    def objective(delta: torch.Tensor) -> torch.Tensor:
        return sign * F.cross_entropy(ensemble_logits(models, x + delta), y, reduction="sum")

    delta = sign_descent(start, objective, steps=steps, step_size=step_size,
                         project=lambda d: project_linf(d, radius, x))
    return quantize(images, delta, epsilon)


@contextmanager
def frozen(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; the flags are restored after it."""
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    modes = [(m, m.training) for m in models]
    try:
        for m in models:
            m.eval()
            m.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)


def choose_positions(n: int, n_poison: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of the protected / poisoned samples: all of them at full budget, else a
    uniform draw without replacement (the budget is the coverage of availability attacks)."""
    if n_poison >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=n_poison, replace=False)).astype(np.int64)
