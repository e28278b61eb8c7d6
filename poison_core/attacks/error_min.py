"""Error-minimizing noise: Huang et al., 'Unlearnable Examples: Making Personal Data Unexploitable',
ICLR 2021.

The bi-level min-min problem of Eq. 2,

    min_theta  E_{(x, y)}  min_{||delta||_inf <= eps}  CE(f_theta(x + delta), y),

is solved by alternation, as in the paper's Algorithm: a model of our own (`model`, trained from
scratch here, so no surrogate is needed) takes `train_steps` SGD steps on the noisy protected
data, then the noise of every protected batch takes `steps` signed-gradient DEscent steps of size
`step_fraction * eps` (paper: 20 steps of eps/10) on that model; rounds repeat until the model's
accuracy on the noisy data reaches `stop_accuracy` (paper: 99 %) or `max_rounds` pass.
`noise_batches` (default: all, as in the paper) updates only that many batches per round, cycling
through the data, which makes a round cheaper on CPU; the stopping accuracy is always measured
on the whole noisy set.

mode 'sample': one noise per sample (Sec. 4.1). mode 'class': one noise per class, shared by every
protected sample of that class (Eq. 2 with delta = delta_y), updated with the class-summed gradient.
The noise starts uniform in [-eps, eps] (`random_start`, the reference code's --random_start flag)
or at zero (`random_start: false`, what the paper's sample-wise scripts run). On Fashion-MNIST one
run of each gave victim accuracy 0.31 (uniform) and 0.52 (zero), but uniform-start runs alone range
0.31-0.65 over crafting seeds (tests/test_efficacy_availability.py), so neither start is shown
better. Noise steps run with the model in eval mode, as in the reference code. Clean-label: labels
never change.
Given ctx.checkpoint, the search saves the noise, the crafting model and its optimizer, the data
order and the generator state after every `checkpoint.every` rounds and resumes from there.
Coverage is the threat model's budget: floor(budget * n) samples are protected (1.0 = all); see
:mod:`poison_core.coverage` for the 20-100 % curve.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks._pgd import (choose_positions, clip_unit, project_linf, quantize, sign_descent, to_unit,
                                      torch_generator)
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.checkpoint import Checkpointer, LoopState, resume_loop, save_loop
from poison_core.config import ModelConfig, ModelName
from poison_core.models import build_model
from poison_core.training import batch_slices, to_tensor

logger = logging.getLogger(__name__)


class ErrorMinParams(AttackParams):
    mode: Literal["sample", "class"] = "sample"
    model: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)
    stop_accuracy: float = Field(0.99, gt=0, le=1)
    train_steps: int = Field(10, ge=1, le=100_000)
    steps: int = Field(20, ge=1, le=10_000)
    step_fraction: float = Field(0.1, gt=0, le=1)
    max_rounds: int = Field(30, ge=1, le=10_000)
    noise_batches: int | None = Field(None, ge=1, le=1_000_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(0.1, gt=0, le=10)
    random_start: bool = True


class MinMinNoise:
    """The noise of a min-min search: per sample (N, C, H, W) or per class (K, C, H, W), on [0, 1]."""

    def __init__(self, mode: str, n: int, k: int, shape: tuple[int, int, int], radius: float,
                 gen: torch.Generator, device: torch.device, random_start: bool = True) -> None:
        rows = n if mode == "sample" else k
        self.mode, self.radius = mode, radius
        if random_start:
            self.values = (torch.rand((rows, *shape), generator=gen, device=device) * 2 - 1) * radius
        else:
            self.values = torch.zeros((rows, *shape), device=device)

    def perturb(self, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + delta of samples `idx` (labels `y`), clipped to [0, 1]."""
        return (x + self.deltas(idx, y)).clamp(0.0, 1.0)

    def minimise(self, model: nn.Module, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, *, steps: int,
                 step_size: float) -> None:
        """`steps` error-minimising sign steps on this batch's noise (Eq. 2, inner min).

        Sample-wise noise is projected so that x + delta stays in [0, 1] (as in the paper's code);
        class-wise noise cannot be, so the clip is straight-through (:func:`clip_unit`).
        """
        sample = self.mode == "sample"
        start = self.values[idx] if sample else self.values

        def objective(values: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(clip_unit(x + (values if sample else values[y]))), y, reduction="sum")

        new = sign_descent(start, objective, steps=steps, step_size=step_size,
                           project=lambda v: project_linf(v, self.radius, x if sample else None))
        if self.mode == "sample":
            self.values[idx] = new
        else:
            self.values = new

    def deltas(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The noise rows of samples `idx` (labels `y`); :func:`quantize` clips to the image range."""
        return self.values[idx] if self.mode == "sample" else self.values[y]


def noisy_accuracy(model: nn.Module, noise: MinMinNoise, images: np.ndarray, labels: torch.Tensor,
                   batches: list[slice], device: torch.device) -> float:
    """Accuracy of `model` on the noisy protected set, the paper's stopping statistic, with batch
    statistics (train-mode BatchNorm, no gradient). After only `train_steps` SGD steps per round the
    running statistics lag, and eval-mode accuracy swings between rounds (0.1 to 0.9 on Fashion-MNIST);
    this pass also refreshes the running statistics that the next round's eval-mode noise steps use."""
    correct = 0
    with torch.no_grad():
        for batch in batches:
            idx = torch.arange(batch.start, batch.stop, device=device)
            logits = model(noise.perturb(to_tensor(images[batch], device), idx, labels[idx]))
            correct += int((logits.argmax(1) == labels[idx]).sum())
    return correct / len(images)


def min_min_search(images: np.ndarray, labels: np.ndarray, model: nn.Module, params: ErrorMinParams, *,
                   epsilon: int, num_classes: int, rng: np.random.Generator, device: torch.device,
                   checkpoint: Checkpointer | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Alternate model steps and noise steps (Huang et al., Eq. 2) on `images`; returns uint8 images.

    Returns the perturbed images and a record of the search: rounds run and the final accuracy of
    the crafting model on the noisy data.
    """
    p, n = params, len(images)
    gen = torch_generator(rng, device)
    height, width, channels = images.shape[1:]
    noise = MinMinNoise(p.mode, n, num_classes, (channels, height, width), to_unit(epsilon), gen, device,
                        p.random_start)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=5e-4)
    batches = batch_slices(n, p.batch_size)
    order, cursor, next_batch, acc, rounds = torch.randperm(n, generator=gen, device=device), 0, 0, 0.0, 0

    def loop() -> LoopState:
        return LoopState(tensors={"noise": noise.values, "order": order}, optimizers={"sgd": optimizer},
                         generator=gen, modules={"model": model})

    done, extra = resume_loop(checkpoint, loop())
    if done:
        cursor, next_batch, acc, rounds = extra["cursor"], extra["next_batch"], extra["acc"], done
    last = done if extra.get("stopped") else p.max_rounds
    for rounds in range(done + 1, last + 1):
        model.train()
        for _ in range(p.train_steps):
            if n - cursor < 2:
                order, cursor = torch.randperm(n, generator=gen, device=device), 0
            idx = order[cursor:cursor + p.batch_size]
            cursor += p.batch_size
            x = to_tensor(images[idx.cpu().numpy()], device)
            loss = F.cross_entropy(model(noise.perturb(x, idx, y_all[idx])), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        for _ in range(p.noise_batches or len(batches)):
            batch, next_batch = batches[next_batch % len(batches)], next_batch + 1
            idx = torch.arange(batch.start, batch.stop, device=device)
            x = to_tensor(images[batch], device)
            noise.minimise(model, x, idx, y_all[idx], steps=p.steps, step_size=p.step_fraction * noise.radius)
        model.train()
        acc = noisy_accuracy(model, noise, images, y_all, batches, device)
        logger.info("error_min %s round %d: crafting-model accuracy on noisy data %.4f", p.mode, rounds, acc)
        stopped = acc >= p.stop_accuracy
        if checkpoint is not None and (checkpoint.due(rounds) or stopped):
            save_loop(checkpoint, rounds, loop(), {"cursor": cursor, "next_batch": next_batch, "acc": acc,
                                                   "stopped": stopped})
        if stopped:
            break
    out = np.empty_like(images)
    for batch in batches:
        idx = torch.arange(batch.start, batch.stop, device=device)
        out[batch] = quantize(images[batch], noise.deltas(idx, y_all[idx]), epsilon)
    return out, {"rounds": rounds, "crafting_train_acc": acc}


@register_attack
class ErrorMinimizing(Attack):
    """Unlearnable examples: error-minimising (min-min) noise, sample-wise or class-wise."""

    name = "error_min"
    paper = "Huang et al., Unlearnable Examples, ICLR 2021 (Eq. 2)"
    summary = "clean-label availability: min-min noise that makes samples 'already learnt'"
    Params = ErrorMinParams
    label_policy = "clean"

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        pos = choose_positions(len(train), n_poison, rng)
        model = build_model(ModelConfig(name=p.model, width=p.width), train.image_shape, train.num_classes,
                            seed=int(rng.integers(2**31)))
        images, record = min_min_search(train.images[pos], train.labels[pos], model, p, epsilon=ctx.threat.epsilon,
                                        num_classes=train.num_classes, rng=rng, device=ctx.device,
                                        checkpoint=ctx.checkpoint)
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "mode": p.mode, **record})
