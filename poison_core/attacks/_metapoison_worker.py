"""One model of MetaPoison's staggered ensemble (Huang et al., NeurIPS 2020, Algorithm 1), as a worker.

The default craft step follows the reference's epoch sweep (github:wronnyhuang/metapoison, main.py
``craft`` with data.py ``feeddict_generator`` / ``batch_queuer``): the model walks one epoch of the
training set in a fresh random order; at every batch that holds poisons it unrolls K SGD steps from its
current weights (that batch, with its poisons carrying the gradient, then the next K - 1 batches, whose
poisons enter detached, as the reference's ``stop_gradient`` on stages > 0; a (K+1)-th batch scores the
target at theta_K) and adds the meta-gradient to a sum (``meta.accumop``); then it takes one plain SGD
step on that batch, clean by default (``-trajectory clean``: ``trainfeed`` holds no poisons). Every
poison thus gets, each craft step, the gradient of the batch it falls in, from every model. The learning
rate warms up linearly over the first epochs of a model's life (utils.py ``lr_schedule``, warmupperiod 5).

A mini-epoch (``epoch_batches``) is all the poisons plus random clean samples, epoch_batches batches in
all, so that every poison is still swept. 'mixed' and 'poisons' are the earlier unroll-at-current-weights
variants (random poison share among clean samples; the whole poison set, as Geiping et al.'s PyTorch
MetaPoison), followed by one (mini-)epoch of training.

Given colour parameters (the ReColorAdv option), every poison is recolor(base, theta) + delta wherever it
enters a batch, the craft step also returns the summed meta-gradient in theta, and each batch that holds
poisons adds the gradient of the smoothness term recolor_smoothness * R(theta) to it, as the reference's
objective (``cwT + smoothobj``) is accumulated once per such batch (``accumop``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poison_core.attacks._unroll import Batch, OuterLoss, unrolled_adversarial_grad, unrolled_recolor_grad
from poison_core.recolor import recolor, smoothness
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, to_tensor

if TYPE_CHECKING:
    from poison_core.attacks.metapoison import MetaPoisonParams


def fresh_model(architecture: nn.Module, seed: int) -> nn.Module:
    """A copy of `architecture` with every layer re-initialised from `seed` (global RNG untouched)."""
    model = copy.deepcopy(architecture).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


class MetaPoisonWorker:
    """One model of the staggered ensemble: its weights, its epoch, and the (clean) training data.

    `architecture` is re-initialised from the worker's seed at every restart, or, with
    params.warm_start, its own trained weights are the starting point of every restart.
    """

    def __init__(self, architecture: nn.Module, images: np.ndarray, labels: np.ndarray, positions: np.ndarray,
                 target: np.ndarray, adversarial_class: int, params: MetaPoisonParams, start_epoch: int,
                 seed: int, device: str = "cpu") -> None:
        self.architecture, self.params, self.seed, self.device = architecture, params, seed, torch.device(device)
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.slot = np.full(len(images), -1, dtype=np.int64)
        self.slot[self.positions] = np.arange(len(self.positions))
        self.clean = np.flatnonzero(self.slot < 0)
        self.target, self.adversarial_class = to_tensor(target, self.device), int(adversarial_class)
        self.outer = OuterLoss(objective=params.objective, stages=params.loss_stages,
                               target_in_batch=params.target_eval == "batch")
        self.generation, self.epoch = 0, 0
        self.model = self._start(0)
        for _ in range(start_epoch):
            self.advance(None)

    def _lr(self) -> float:
        """The SGD rate at this model's epoch: linear warm-up, lr * min(1, (epoch + 1) / warmup)."""
        warmup = self.params.lr_warmup_epochs
        return self.params.lr * (min(1.0, (self.epoch + 1) / warmup) if warmup else 1.0)

    def _batch(self, idx: np.ndarray, delta: torch.Tensor | None = None,
               shifted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples `idx` as float NCHW (poisoned where they are poisons: the colour-shifted
        bases `shifted`, if given, plus `delta`) and their labels."""
        x = to_tensor(self.images[idx], self.device)
        if delta is not None:
            rows = self.slot[idx]
            hit = np.flatnonzero(rows >= 0)
            if shifted is not None:
                x[hit] = shifted[rows[hit]]
            x[hit] = x[hit] + delta[rows[hit]]
        return x, torch.from_numpy(self.labels[idx]).to(self.device)

    def _shifted(self, color: np.ndarray | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(colour parameters on the device, the colour-shifted poison bases, detached), or (None, None)."""
        if color is None:
            return None, None
        theta = torch.from_numpy(color).to(self.device)
        with torch.no_grad():
            return theta, recolor(self._batch(self.positions)[0], theta)

    def _smoothness_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """d (recolor_smoothness * R(theta)) / d theta."""
        theta = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.params.recolor_smoothness * smoothness(theta), theta)
        return grad

    def craft_step(self, delta: np.ndarray, step: int, color: np.ndarray | None = None) -> tuple:
        """This model's part of craft step `step`: (adversarial loss, meta-gradient[, colour meta-gradient]),
        and one (mini-)epoch."""
        if self.params.unroll_batch == "epoch":
            result = self._sweep(self.model, delta, step, color)
            self._end_epoch()
            return result
        result = self.adversarial_grad(delta, step, color)
        self.advance(delta if self.params.trajectory == "poisoned" else None, color)
        return result

    def adversarial_grad(self, delta: np.ndarray, step: int, color: np.ndarray | None = None) -> tuple:
        """(adversarial loss, its gradient) from the current weights, the model left where it is. 'epoch':
        the sweep of :meth:`craft_step` on a copy of the model; 'mixed': K batches each holding
        round(batch_size * P / N) >= 1 random poisons, their share of the data; 'poisons': each step is on
        all P poisons and nothing else."""
        p = self.params
        if p.unroll_batch == "epoch":
            return self._sweep(copy.deepcopy(self.model), delta, step, color)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "unroll", step))
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        if p.unroll_batch == "poisons":
            nothing = self._batch(np.empty(0, dtype=np.int64))
            everything = (*nothing, torch.arange(len(self.positions), device=self.device))
            shifted = self._shifted(color)[1]
            tail = (*self._batch(self.positions, torch.from_numpy(delta).to(self.device), shifted), none)
            return self._unroll([everything] * p.unroll_steps, tail, delta, color)
        share = min(len(self.positions), max(1, round(p.batch_size * len(self.positions) / len(self.images))))
        batches = []
        for _ in range(p.unroll_steps):
            poison_idx = torch.randperm(len(self.positions), generator=gen)[:share]
            clean = self.clean[torch.randperm(len(self.clean), generator=gen)[:p.batch_size - share].numpy()]
            batches.append((*self._batch(clean), poison_idx.to(self.device)))
        tail = self.clean[torch.randperm(len(self.clean), generator=gen)[:p.batch_size].numpy()]
        return self._unroll(batches, (*self._batch(tail), none), delta, color)

    def _unroll(self, batches: list[Batch], tail: Batch, delta: np.ndarray, color: np.ndarray | None) -> tuple:
        """(adversarial loss, its gradient[, colour gradient]) through one SGD step per batch of `batches`."""
        bases, poison_labels = self._batch(self.positions)
        perturbation = torch.from_numpy(delta).to(self.device)
        if color is None:
            loss, grad = unrolled_adversarial_grad(self.model, bases, perturbation, poison_labels, batches,
                                                   self.target, self.adversarial_class, self._lr(), self.outer, tail)
            return loss, grad.cpu().numpy()
        theta = torch.from_numpy(color).to(self.device)
        loss, grad, grad_color = unrolled_recolor_grad(self.model, bases, perturbation, theta, poison_labels, batches,
                                                       self.target, self.adversarial_class, self._lr(), self.outer,
                                                       tail)
        return loss, grad.cpu().numpy(), (grad_color + self._smoothness_grad(theta)).cpu().numpy()

    def _sweep_order(self, gen: torch.Generator) -> list[np.ndarray]:
        """The batches of one sweep: the whole training set in random order, or a mini-epoch of
        epoch_batches batches holding every poison and random clean samples."""
        p, n = self.params, len(self.images)
        if p.epoch_batches is None or p.epoch_batches * p.batch_size >= n:
            order = torch.randperm(n, generator=gen).numpy()
        else:
            extra = max(p.epoch_batches * p.batch_size - len(self.positions), 0)
            chosen = np.concatenate([self.positions,
                                     self.clean[torch.randperm(len(self.clean), generator=gen)[:extra].numpy()]])
            order = chosen[torch.randperm(len(chosen), generator=gen).numpy()]
        return [order[s] for s in batch_slices(len(order), p.batch_size)]

    def _sweep(self, model: nn.Module, delta: np.ndarray, step: int, color: np.ndarray | None = None) -> tuple:
        """One epoch of `model` with the meta-gradient of every batch that holds poisons summed (reference
        ``accumop``); returns (mean adversarial loss over those batches, the summed meta-gradient[, the
        summed colour meta-gradient, smoothness term included])."""
        p, device = self.params, self.device
        order = self._sweep_order(torch.Generator().manual_seed(derive_seed(self.seed, "sweep", step)))
        perturbation = torch.from_numpy(delta).to(device)
        bases, poison_labels = self._batch(self.positions)
        theta, shifted = self._shifted(color)
        total_color = None if theta is None else torch.zeros_like(theta)
        none = torch.zeros(0, dtype=torch.long, device=device)
        lr, total, losses = self._lr(), torch.zeros_like(perturbation), []
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for i, idx in enumerate(order):
            rows = self.slot[idx]
            if (rows >= 0).any():
                first = (*self._batch(idx[rows < 0]), torch.from_numpy(rows[rows >= 0]).to(device))
                later = [(*self._batch(order[(i + k) % len(order)], perturbation, shifted), none)
                         for k in range(1, p.unroll_steps + 1)]
                if theta is None:
                    loss, grad = unrolled_adversarial_grad(model, bases, perturbation, poison_labels,
                                                           [first, *later[:-1]], self.target, self.adversarial_class,
                                                           lr, self.outer, later[-1])
                else:
                    loss, grad, grad_color = unrolled_recolor_grad(model, bases, perturbation, theta, poison_labels,
                                                                   [first, *later[:-1]], self.target,
                                                                   self.adversarial_class, lr, self.outer, later[-1])
                    total_color += grad_color + self._smoothness_grad(theta)
                total += grad
                losses.append(loss)
            x, y = self._batch(idx, perturbation if p.trajectory == "poisoned" else None, shifted)
            step_loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
        loss = float(np.mean(losses)) if losses else 0.0
        if total_color is None:
            return loss, total.cpu().numpy()
        return loss, total.cpu().numpy(), total_color.cpu().numpy()

    def advance(self, delta: np.ndarray | None, color: np.ndarray | None = None) -> int:
        """One (mini-)epoch of SGD on the clean data (with the poisons recolor(base, color) + delta if delta
        is given); restart after T epochs."""
        p = self.params
        perturbation = None if delta is None else torch.from_numpy(delta).to(self.device)
        shifted = self._shifted(color)[1] if delta is not None else None
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.generation, self.epoch))
        order = torch.randperm(len(self.images), generator=gen).numpy()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self._lr())
        self.model.train()
        for batch in batch_slices(len(order), p.batch_size)[:p.epoch_batches]:
            x, y = self._batch(order[batch], perturbation, shifted)
            loss = F.cross_entropy(self.model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return self._end_epoch()

    def _end_epoch(self) -> int:
        self.epoch += 1
        if self.epoch >= self.params.stagger_epochs:
            self.generation, self.epoch = self.generation + 1, 0
            self.model = self._start(self.generation)
        return self.epoch

    def state(self) -> tuple[dict[str, np.ndarray], int, int]:
        """(weights and buffers, generation, epoch): what a checkpoint keeps of this worker."""
        weights = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        return weights, self.generation, self.epoch

    def restore(self, weights: dict[str, np.ndarray], generation: int, epoch: int) -> None:
        """Put this worker back where :meth:`state` was taken."""
        self.generation, self.epoch = generation, epoch
        self.model = self._start(generation)
        self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})

    def _start(self, generation: int) -> nn.Module:
        if self.params.warm_start:
            model = copy.deepcopy(self.architecture)
            for p in model.parameters():
                p.requires_grad_(True)
            return model.to(self.device).train()
        return fresh_model(self.architecture, derive_seed(self.seed, "init", generation)).to(self.device)
