"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li & Ma, 'Anti-Backdoor Learning: Training Clean
Models on Poisoned Data', NeurIPS 2021).

ABL minimises  L_ABL = E_{D_c}[l(f(x), y)] - E_{D_b}[l(f(x), y)]  (the paper's ABL objective, Sec. 3),
where D_b is a small isolated set of likely backdoor samples and D_c the rest, in three phases:

1. Backdoor isolation: T_te epochs of local gradient ascent (LGA), minimising
       L_LGA = sign(L - gamma) * L,   L = the batch's mean cross-entropy,
   which descends while the loss is above gamma and ascends below it. Backdoor samples are learnt
   much faster than clean ones and sink far below gamma while the batch loss is held at gamma, so
   the lowest-loss fraction p of the training set (losses after T_te epochs) is isolated as D_b.
   As in the authors' code the sign is taken of the batch loss: taken per sample it holds *every*
   sample at gamma (measured on digits: mean loss 0.50 for poisons vs 0.51 for clean samples) and
   the ranking carries no signal. The learning rate is constant in this phase.
2. Training continues on D_c with the victim's recipe (`finetune_epochs`).
3. Backdoor unlearning, `unlearning` selects the procedure:
   * "ascent" (default, the authors' code: bboylyg/ABL backdoor_unlearning.py `train_step_unlearning`
     and quick_unlearning_demo.py): `unlearning_epochs` passes of pure gradient ascent on the mean
     cross-entropy of D_b alone (one step per batch of D_b), the model in train mode (BatchNorm
     statistics update), SGD lr 5e-4, momentum 0.9, Nesterov, weight decay 1e-4 (the reference's
     optimizer), no loss cap. The reference runs 5 such epochs (the demo; backdoor_unlearning.py
     evaluates before its first of 5 and so ascends 4).
   * "descent_ascent" (our earlier variant, kept for comparison): the full L_ABL per step, a batch of
     D_c (descent) and a batch of D_b (ascent) for every batch of D_c, so ~|D_c| / |D_b| times more
     ascent steps than the reference; each isolated sample's loss capped at ln K (chance level) inside
     the ascent term, BatchNorm in eval mode, SGD with momentum 0.9. It was introduced because pure
     ascent on a few target-class images once suppressed the target class everywhere on digits.
   The reference's isolation uses flooding |L - gamma| + gamma by default, whose gradient is LGA's.

Isolation follows the reference code (bboylyg/ABL backdoor_isolation.py with config.py): T_te = 10
epochs (`--tuning_epochs` 10; the paper's Sec. 4 says 20), SGD at lr 0.1 (`--lr`, momentum 0.9,
Nesterov; `isolation_lr`, None: the victim's lr) constant, on the training set walked in its stored
order (`isolation_shuffle: false`), without augmentation (its loader's transform is ToTensor only).
Phase 2 fine-tunes with the reference's augmentation (random crop with zero padding and horizontal
flip, `finetune_augment`) whether or not the victim's recipe has it.
Ground truth (ctx.is_poison), when given, is used only to report per-epoch mean losses of clean and
poisoned samples (`loss_clean`, `loss_poison` in the history) and the isolation precision/recall.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.config import TrainConfig
from poison_core.data.dataset import ImageDataset
from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, ModelClassifier,
                                       register_defense)
from poison_core.seeding import derive_seed
from poison_core.training import LossContext, LossFn, TrainHooks, batch_slices, to_tensor, train_model

log = logging.getLogger(__name__)

REFERENCE_WEIGHT_DECAY = 1e-4  # bboylyg/ABL config.py --weight_decay, the unlearning optimizer's


class ABLParams(DefenseParams):
    """isolation_epochs: T_te (reference code 10, paper 20), at `isolation_lr` (reference 0.1; None: the
    victim's) on the unshuffled training set (`isolation_shuffle`); gamma: the LGA loss floor (paper 0.5); isolation_fraction:
    p (paper 0.01); finetune_epochs: phase-2 epochs (None: the victim recipe's), with the reference's
    crop-and-flip augmentation when `finetune_augment`; unlearning,
    unlearning_epochs and unlearning_lr: phase 3 (the authors' code: pure ascent on D_b, 5 epochs,
    lr 5e-4, SGD with momentum 0.9, Nesterov, weight decay 1e-4; see the module docstring)."""

    isolation_epochs: int = Field(10, ge=1, le=1000)
    isolation_lr: float | None = Field(0.1, gt=0, le=10)
    isolation_shuffle: bool = False
    finetune_augment: bool = True
    gamma: float = Field(0.5, ge=0, le=10)
    isolation_fraction: float = Field(0.01, gt=0, lt=1)
    finetune_epochs: int | None = Field(None, ge=0, le=1000)
    unlearning_epochs: int = Field(5, ge=0, le=1000)
    unlearning_lr: float = Field(5e-4, gt=0, le=10)
    unlearning: Literal["ascent", "descent_ascent"] = "ascent"


def isolation_recipe(recipe: TrainConfig, p: ABLParams) -> TrainConfig:
    """Phase 1's recipe: `isolation_epochs` at a constant `isolation_lr` (None: the victim's), no augmentation."""
    update: dict[str, Any] = {"epochs": p.isolation_epochs, "schedule": "none", "augment": "none"}
    if p.isolation_lr is not None:
        update["lr"] = p.isolation_lr
    return recipe.model_copy(update=update)


def finetune_recipe(recipe: TrainConfig, p: ABLParams, epochs: int) -> TrainConfig:
    """Phase 2's recipe: the victim's for `epochs`, with crop-and-flip augmentation if `finetune_augment`."""
    update: dict[str, Any] = {"epochs": epochs}
    if p.finetune_augment:
        update["augment"] = "crop-flip"
    return recipe.model_copy(update=update)


def lga_loss(per_sample: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent on a batch: sign(L - gamma) * L with L the batch's mean loss (descent
    while the batch loss is above gamma, ascent below)."""
    mean = per_sample.mean()
    return torch.sign(mean - gamma).detach() * mean


def per_sample_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                    batch_size: int = 512) -> np.ndarray:
    """Cross-entropy of every sample under `model` in eval mode, without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(to_tensor(images[start:start + batch_size], device))
            target = torch.from_numpy(labels[start:start + batch_size]).to(device)
            out.append(F.cross_entropy(logits, target, reduction="none").float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class _LossRecorder:
    """Per-epoch mean losses of clean and poisoned samples (reporting only) and the history."""

    def __init__(self, is_poison: np.ndarray | None) -> None:
        self.is_poison = None if is_poison is None else np.asarray(is_poison, dtype=bool)
        self.history: list[dict[str, Any]] = []
        self.positions = np.zeros(0, dtype=np.int64)
        self.sums = np.zeros(2)
        self.counts = np.zeros(2)

    def start(self, positions: np.ndarray) -> None:
        """The next phase trains on ctx.train[positions]."""
        self.positions = positions

    def add(self, local: np.ndarray, losses: np.ndarray) -> None:
        if self.is_poison is None:
            return
        poison = self.is_poison[self.positions[local]].astype(np.int64)
        np.add.at(self.sums, poison, losses)
        np.add.at(self.counts, poison, 1)

    def hook(self, objective: Callable[[torch.Tensor], torch.Tensor]) -> LossFn:
        """A TrainHooks.loss that records the batch's losses, then returns `objective` of them."""
        def loss(per_sample: torch.Tensor, ctx: LossContext) -> torch.Tensor:
            self.add(ctx.indices.cpu().numpy(), per_sample.detach().cpu().numpy())
            return objective(per_sample)
        return loss

    def end_epoch(self, stage: str, record: dict[str, Any]) -> None:
        record = dict(record, stage=stage, epoch=len(self.history))
        for name, i in (("loss_clean", 0), ("loss_poison", 1)):
            if self.counts[i]:
                record[name] = float(self.sums[i] / self.counts[i])
        self.sums[:] = 0
        self.counts[:] = 0
        self.history.append(record)


@register_defense
class ABL(Defense):
    """LGA isolation of the lowest-loss fraction, training on the rest, gradient-ascent unlearning."""

    name = "abl"
    paper = "Li et al., NeurIPS 2021, Anti-Backdoor Learning: training clean models on poisoned data"
    summary = "training: isolate fast-learnt samples with local gradient ascent, then unlearn them"
    Params = ABLParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        from poison_core.protocols import build_victim

        p, train, recipe = self.params, ctx.train, ctx.victim.train
        model = build_victim(ctx.victim, train, ctx.seed, ctx.device)
        rec = _LossRecorder(ctx.is_poison)
        everything = np.arange(len(train))

        rec.start(everything)
        train_model(model, train, isolation_recipe(recipe, p), device=ctx.device,
                    seed=derive_seed(ctx.seed, "abl", "isolation"), shuffle=p.isolation_shuffle,
                    hooks=TrainHooks(loss=rec.hook(lambda losses: lga_loss(losses, p.gamma)),
                                     on_epoch_end=lambda e, m, r: rec.end_epoch("isolation", r)))
        losses = per_sample_loss(model, train.images, train.labels, ctx.device)
        n_isolated = min(len(train) - 1, max(1, math.floor(p.isolation_fraction * len(train) + 1e-9)))
        isolated = np.sort(np.argsort(losses, kind="stable")[:n_isolated])
        rest = np.setdiff1d(everything, isolated)

        finetune = recipe.epochs if p.finetune_epochs is None else p.finetune_epochs
        if finetune:
            rec.start(rest)
            hooks = TrainHooks(loss=rec.hook(lambda losses: losses.mean()),
                               on_epoch_end=lambda e, m, r: rec.end_epoch("finetune", r))
            train_model(model, train.subset(rest), finetune_recipe(recipe, p, finetune),
                        device=ctx.device, seed=derive_seed(ctx.seed, "abl", "finetune"), hooks=hooks)
        rec.start(everything)
        self._unlearn(model, train, rest, isolated, ctx, rec)
        model.eval()
        info = {"n_isolated": float(n_isolated)}
        if ctx.is_poison is not None and ctx.is_poison.any():
            found = float(ctx.is_poison[isolated].sum())
            info["isolation_precision"] = found / n_isolated
            info["isolation_recall"] = found / float(ctx.is_poison.sum())
        log.info("abl: isolated %d samples %s", n_isolated, info)
        return DefenseResult(ModelClassifier(model, ctx.device), history=rec.history, info=info)

    def _unlearn(self, model: nn.Module, train: ImageDataset, rest: np.ndarray, isolated: np.ndarray,
                 ctx: DefenseContext, rec: _LossRecorder) -> None:
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "abl", "unlearning"))
        if self.params.unlearning == "ascent":
            self._ascend(model, train, isolated, ctx, rec, gen)
        else:
            self._descend_ascend(model, train, rest, isolated, ctx, rec, gen)

    def _ascend(self, model: nn.Module, train: ImageDataset, isolated: np.ndarray, ctx: DefenseContext,
                rec: _LossRecorder, gen: torch.Generator) -> None:
        """The reference's unlearning: maximise the mean CE of each batch of D_b, in train mode."""
        p = self.params
        optimizer = torch.optim.SGD(model.parameters(), lr=p.unlearning_lr, momentum=0.9, nesterov=True,
                                    weight_decay=REFERENCE_WEIGHT_DECAY)
        batches = batch_slices(len(isolated), ctx.victim.train.batch_size)
        for _ in range(p.unlearning_epochs):
            order = isolated[torch.randperm(len(isolated), generator=gen).numpy()]
            total = 0.0
            for batch in batches:
                idx = order[batch]
                model.train(len(idx) > 1)  # BatchNorm cannot train on a single sample
                logits = model(to_tensor(train.images[idx], ctx.device))
                per_sample = F.cross_entropy(logits, torch.from_numpy(train.labels[idx]).to(ctx.device),
                                             reduction="none")
                rec.add(idx, per_sample.detach().cpu().numpy())
                loss = per_sample.mean()
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                optimizer.step()
                total += float(loss.detach()) / len(batches)
            rec.end_epoch("unlearning", {"loss": -total, "loss_isolated": total, "lr": p.unlearning_lr})

    def _descend_ascend(self, model: nn.Module, train: ImageDataset, rest: np.ndarray, isolated: np.ndarray,
                        ctx: DefenseContext, rec: _LossRecorder, gen: torch.Generator) -> None:
        """Our earlier variant: mean CE on a batch of D_c minus mean CE (capped at ln K) on a batch of D_b."""
        p = self.params
        optimizer = torch.optim.SGD(model.parameters(), lr=p.unlearning_lr, momentum=0.9)
        bs = ctx.victim.train.batch_size
        batches = batch_slices(len(rest), bs)
        cap = math.log(train.num_classes)
        model.eval()
        for _ in range(p.unlearning_epochs):
            order = rest[torch.randperm(len(rest), generator=gen).numpy()]
            total_c = total_b = 0.0
            for batch in batches:
                idx_c = order[batch]
                idx_b = isolated[torch.randperm(len(isolated), generator=gen).numpy()[:bs]]
                idx = np.concatenate([idx_c, idx_b])
                logits = model(to_tensor(train.images[idx], ctx.device))
                target = torch.from_numpy(train.labels[idx]).to(ctx.device)
                per_sample = F.cross_entropy(logits, target, reduction="none")
                rec.add(idx, per_sample.detach().cpu().numpy())
                loss_c, loss_b = per_sample[:len(idx_c)].mean(), per_sample[len(idx_c):].clamp(max=cap).mean()
                optimizer.zero_grad(set_to_none=True)
                (loss_c - loss_b).backward()
                optimizer.step()
                total_c += float(loss_c.detach()) / len(batches)
                total_b += float(loss_b.detach()) / len(batches)
            rec.end_epoch("unlearning", {"loss": total_c - total_b, "loss_isolated": total_b, "lr": p.unlearning_lr})
