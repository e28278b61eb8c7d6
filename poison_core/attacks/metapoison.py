"""MetaPoison: Huang, Geiping, Fowl, Taylor & Goldstein, 'MetaPoison: Practical General-purpose
Clean-label Data Poisoning', NeurIPS 2020.

Algorithm 1 (ensembling and network re-initialisation): M surrogate models are trained from scratch
to staggered epochs floor(m * T / M), m = 0..M-1. Each craft step, every model unrolls K SGD steps
on batches holding the current poisons (:mod:`poison_core.attacks._unroll`) and returns the
gradient, with respect to the perturbation, of the adversarial loss on the target (cross-entropy
to the adversarial class at theta_K: the outer loss of the bi-level problem, Eq. 1); the driver
averages the M gradients, takes an Adam step (the reference's craft rate 200/255, x0.1 every 20
steps) and projects onto the eps-ball and the pixel box; then every model trains one more
(mini-)epoch on the clean data with the current poisons, and a model that reaches T epochs
restarts from a fresh initialisation at epoch 0.

The M models are stateful workers built with ctx.actors (one Ray actor each under orchestration)
from :class:`MetaPoisonWorker`; their architecture is the surrogate's (ctx.surrogates[0]), freshly
initialised. With `warm_start` the workers instead start (and restart) from the trained surrogates'
weights, cycling through ctx.surrogates: the fine-tuning regime of the paper's pretrained-model
experiments, and on CPU the cheap way to put the ensemble where the victim's training ends.
`unroll_batch` chooses the unrolled batches: 'mixed' (the reference TF code) holds the poisons'
share of a training batch among clean samples; 'poisons' unrolls every step on the whole poison set,
as the PyTorch re-implementation in Geiping et al.'s data-poisoning code does (its MetaPoison witch
steps on the poison batch), so each craft step gives every poison a gradient instead of a few.
The paper's ReColorAdv colour perturbation is left out: the threat model is L-inf only.

Given ctx.checkpoint, every `checkpoint.every` steps the driver saves the perturbation, its Adam
state and schedule, and every worker's weights, generation and epoch. A worker that dies
(:class:`WorkerLost`) makes the driver rebuild the whole ensemble from the last checkpoint (from
step 0 without one), at most ctx.retries times; every random draw is a function of (seed, step),
so the result is the same as an undisturbed run's.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks import targets as targeting
from poison_core.attacks._uint8 import project, quantize, radius
from poison_core.attacks._unroll import unrolled_adversarial_grad
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.checkpoint import Checkpointer, CraftState, LoopState, resume_loop, save_loop
from poison_core.errors import WorkerLost
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, to_tensor

logger = logging.getLogger(__name__)


class MetaPoisonParams(AttackParams):
    """Huang et al. Sec. 4 and reference code: M=24 models, T=24 epochs (stagger 1), K=2, 60 steps,
    craft rate 200/255 dropped x0.1 every 20 steps, SGD lr 0.1, batch 125. epoch_batches: batches per
    worker (mini-)epoch (None: a full pass); warm_start: start from the surrogates' weights; unroll_batch:
    'mixed' (poisons among clean samples, the reference) or 'poisons' (the whole poison set each step)."""

    n_models: int = Field(24, ge=1, le=1024)
    stagger_epochs: int = Field(24, ge=1, le=10_000)
    unroll_steps: int = Field(2, ge=1, le=100)
    steps: int = Field(60, ge=1, le=100_000)
    craft_rate: float = Field(200.0, gt=0, le=10_000)
    drop_period: int = Field(20, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0, le=10)
    batch_size: int = Field(125, ge=2, le=65_536)
    epoch_batches: int | None = Field(None, ge=1, le=1_000_000)
    warm_start: bool = False
    unroll_batch: Literal["mixed", "poisons"] = "mixed"


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
        self.generation, self.epoch = 0, 0
        self.model = self._start(0)
        for _ in range(start_epoch):
            self.advance(None)

    def _batch(self, idx: np.ndarray, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples `idx` as float NCHW (poisoned where they are poisons) and their labels."""
        x = to_tensor(self.images[idx], self.device)
        if delta is not None:
            rows = self.slot[idx]
            hit = np.flatnonzero(rows >= 0)
            x[hit] = x[hit] + delta[rows[hit]]
        return x, torch.from_numpy(self.labels[idx]).to(self.device)

    def adversarial_grad(self, delta: np.ndarray, step: int) -> tuple[float, np.ndarray]:
        """Unroll K SGD steps on batches of the poisoned training set and return (adversarial loss, its
        gradient). 'mixed': each batch holds round(batch_size * P / N) >= 1 random poisons, their share of
        the data; 'poisons': each step is on all P poisons and nothing else."""
        p = self.params
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "unroll", step))
        if p.unroll_batch == "poisons":
            nothing = self._batch(np.empty(0, dtype=np.int64))
            return self._unroll([(*nothing, torch.arange(len(self.positions), device=self.device))] * p.unroll_steps,
                                delta)
        share = min(len(self.positions), max(1, round(p.batch_size * len(self.positions) / len(self.images))))
        batches = []
        for _ in range(p.unroll_steps):
            poison_idx = torch.randperm(len(self.positions), generator=gen)[:share]
            clean = self.clean[torch.randperm(len(self.clean), generator=gen)[:p.batch_size - share].numpy()]
            batches.append((*self._batch(clean), poison_idx.to(self.device)))
        return self._unroll(batches, delta)

    def _unroll(self, batches: list, delta: np.ndarray) -> tuple[float, np.ndarray]:
        """(adversarial loss, its gradient) through one SGD step per batch of `batches`."""
        bases, poison_labels = self._batch(self.positions)
        loss, grad = unrolled_adversarial_grad(self.model, bases, torch.from_numpy(delta).to(self.device),
                                               poison_labels, batches, self.target, self.adversarial_class,
                                               self.params.lr)
        return loss, grad.cpu().numpy()

    def advance(self, delta: np.ndarray | None) -> int:
        """One (mini-)epoch of SGD on the clean data with the current poisons; restart after T epochs."""
        p = self.params
        perturbation = None if delta is None else torch.from_numpy(delta).to(self.device)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.generation, self.epoch))
        order = torch.randperm(len(self.images), generator=gen).numpy()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=p.lr)
        self.model.train()
        for batch in batch_slices(len(order), p.batch_size)[:p.epoch_batches]:
            x, y = self._batch(order[batch], perturbation)
            loss = F.cross_entropy(self.model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.epoch += 1
        if self.epoch >= p.stagger_epochs:
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


@register_attack
class MetaPoison(Attack):
    """Meta-learned poisons through unrolled training of a staggered ensemble (Huang et al., NeurIPS 2020)."""

    name = "metapoison"
    paper = "Huang et al., MetaPoison: Practical General-purpose Clean-label Data Poisoning, NeurIPS 2020"
    summary = "clean-label targeted: meta-gradients through K unrolled SGD steps of a staggered model ensemble"
    Params = MetaPoisonParams
    label_policy = "clean"
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        plans = targeting.plan(ctx, n_poison, rng)
        return targeting.pack(ctx.train, plans, [self._craft_key(ctx, kp, i) for i, kp in enumerate(plans)])

    def _architecture(self, ctx: CraftContext, worker: int) -> nn.Module:
        """Worker `worker`'s model: the first surrogate (re-initialised by the worker), or with warm_start
        the surrogates' trained weights in turn."""
        source = ctx.surrogates[worker % len(ctx.surrogates)] if self.params.warm_start else ctx.surrogates[0]
        return copy.deepcopy(source).cpu()

    def _craft_key(self, ctx: CraftContext, kp: targeting.KeyPlan, index: int) -> np.ndarray:
        """Brew one key's poisons; a lost worker restarts the ensemble from the last checkpoint."""
        checkpoint = ctx.checkpoint.child("key", index) if ctx.checkpoint is not None else None
        for attempt in range(ctx.retries + 1):
            try:
                return self._brew(ctx, kp, index, checkpoint)
            except WorkerLost as exc:
                if attempt == ctx.retries:
                    raise
                logger.warning("metapoison target %d: %s; rebuilding the ensemble from the last checkpoint "
                               "(retry %d of %d)", kp.key.target_id, exc, attempt + 1, ctx.retries)
        raise AssertionError("unreachable")

    def _brew(self, ctx: CraftContext, kp: targeting.KeyPlan, index: int,
              checkpoint: Checkpointer | None) -> np.ndarray:
        p, train, test = self.params, ctx.train, ctx.test
        assert test is not None
        saved: CraftState | None = checkpoint.load() if checkpoint is not None else None
        target = test.images[kp.key.target_position:kp.key.target_position + 1]
        group = ctx.actors(MetaPoisonWorker, [
            (self._architecture(ctx, m), train.images, train.labels, kp.positions, target, kp.key.adversarial_class,
             p, 0 if saved else m * p.stagger_epochs // p.n_models,
             derive_seed(ctx.seed, self.name, index, "worker", m), str(ctx.device))
            for m in range(p.n_models)])
        x0 = to_tensor(train.images[kp.positions], "cpu")
        eps = radius(ctx.threat.epsilon)
        delta = torch.zeros_like(x0, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=p.craft_rate / 255.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=p.drop_period, gamma=0.1)
        loop = LoopState(tensors={"delta": delta}, optimizers={"adam": optimizer}, schedulers={"lr": scheduler})
        done, extra = resume_loop(checkpoint, loop, saved)
        if done:
            group.call("restore", [({k[len(f"{m}."):]: v.numpy() for k, v in loop.payload.items()
                                     if k.startswith(f"{m}.")}, *extra["workers"][m]) for m in range(p.n_models)])
        for step in range(done, p.steps):
            current = delta.detach().numpy().copy()
            results = group.call("adversarial_grad", [(current, step)] * p.n_models)
            delta.grad = torch.from_numpy(np.mean([g for _, g in results], axis=0))
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                delta.copy_(project(delta, x0, eps))
            group.call("advance", [(delta.detach().numpy().copy(),)] * p.n_models)
            logger.debug("metapoison target %d step %d adversarial loss %.4f", kp.key.target_id, step,
                         float(np.mean([loss for loss, _ in results])))
            if checkpoint is not None and checkpoint.due(step + 1):
                states = group.call("state", [()] * p.n_models)
                loop.payload = {f"{m}.{k}": torch.from_numpy(np.asarray(v)) for m, (weights, _, _) in enumerate(states)
                                for k, v in weights.items()}
                save_loop(checkpoint, step + 1, loop, {"workers": [[g, e] for _, g, e in states]})
        return quantize(train.images[kp.positions], delta, ctx.threat.epsilon)
