"""A seeded, CPU-deterministic trainer for image classifiers, with hooks for training defenses.

``train_model`` is plain mini-batch SGD / Adam on cross-entropy. Everything random (shuffling,
augmentation, any dropout-like op a hook draws from the global RNG) is derived from ``seed`` inside
a forked CPU RNG, so the caller's global RNG state is left untouched and the same seed on the same
data gives bit-identical weights on CPU. Images stay uint8 NHWC until a batch is drawn.

The recipe's own augmentation (``TrainConfig.augment``: random crop with zero padding and horizontal
flip, what every reference victim trains with; poison_core.augmentation) is applied to each batch
before any hook, drawing from the same seeded augmentation generator.

Hooks let defenses change training without copying the loop:

* ``augment(x, y, generator)`` may return soft labels (N, C), e.g. mixup (Zhang et al., ICLR 2018);
* ``loss(per_sample_ce, ctx)`` turns per-sample losses into the scalar minimised, e.g. trimmed loss
  or Anti-Backdoor Learning (Li et al., NeurIPS 2021);
* ``on_epoch_end(epoch, model, record)`` sees each epoch's record (and may add to it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from poison_core.augmentation import default_padding, random_shift_flip
from poison_core.data.dataset import ImageDataset

if TYPE_CHECKING:
    from poison_core.config import TrainConfig

log = logging.getLogger(__name__)

STEP_MILESTONES = (0.5, 0.75)
STEP_FACTOR = 0.1
FOREST_DIVISORS = (2.667, 1.6, 1.142)


def to_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC array -> float32 NCHW tensor in [0, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


@dataclass
class LossContext:
    """What a loss hook may use besides the per-sample losses of one batch.

    indices: positional indices (into the training ImageDataset) of the batch samples, LongTensor.
    """

    indices: torch.Tensor
    epoch: int
    logits: torch.Tensor
    targets: torch.Tensor


AugmentFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, LossContext], torch.Tensor]
EpochEndFn = Callable[[int, nn.Module, dict[str, Any]], None]


@dataclass
class TrainHooks:
    """Optional extension points of :func:`train_model` (all default to plain training)."""

    augment: AugmentFn | None = None
    loss: LossFn | None = None
    on_epoch_end: EpochEndFn | None = None


@dataclass
class TrainHistory:
    """One dict per epoch: epoch, loss (mean objective), train_acc, lr (at epoch start), [eval_acc]."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record ({} before any epoch ran)."""
        return self.epochs[-1] if self.epochs else {}

    def __len__(self) -> int:
        return len(self.epochs)


def forest_milestones(epochs: int) -> tuple[int, ...]:
    """The epochs at which forest's 'linear' schedule divides the lr by 10: floor(epochs / d) for
    d in (2.667, 1.6, 1.142), as MultiStepLR reads forest's float milestones; zeros dropped."""
    return tuple(m for m in (int(epochs // d) for d in FOREST_DIVISORS) if m > 0)  # float floor: 40 // 1.6 = 24


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate at global optimisation step `step` (0-based).

    cosine: per-step cosine annealing from cfg.lr towards 0 (Loshchilov & Hutter, SGDR, ICLR 2017,
    Eq. 5 without restarts); step: x0.1 at 50% and 75% of the epochs; forest: x0.1 at epochs
    epochs // 2.667, epochs // 1.6 and epochs // 1.142 (14, 24, 35 of 40: Geiping et al.'s forest,
    forest/victims/training.py, scheduler 'linear' of forest/hyperparameters.py); none: constant.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / total))
    if cfg.schedule == "forest":
        epoch = step // steps_per_epoch
        return cfg.lr * STEP_FACTOR ** sum(epoch >= m for m in forest_milestones(cfg.epochs))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        milestones = {int(frac * cfg.epochs) for frac in STEP_MILESTONES} - {0}
        return cfg.lr * STEP_FACTOR ** sum(epoch >= m for m in milestones)
    return cfg.lr


def recipe_augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The recipe's augmentation of one NCHW batch (``cfg.augment``): random crop of the zero-padded
    image and horizontal flip (poison_core.augmentation), every draw from `gen`; identity for 'none'."""
    if cfg.augment == "none":
        return x
    padding = cfg.crop_padding if cfg.crop_padding is not None else default_padding(x.shape[-2], x.shape[-1])
    return random_shift_flip(x, gen, max_shift=padding, flip=cfg.flip)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam (L2 weight decay), as `cfg` says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of `batch_size`; a trailing batch of one joins the previous batch
    (BatchNorm cannot normalise a single sample at 1x1 resolution)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [n]
    return [slice(a, b) for a, b in zip(starts, ends)]


def train_model(model: nn.Module, data: ImageDataset, cfg: TrainConfig, *, device: torch.device | str,
                seed: int, hooks: TrainHooks | None = None,
                eval_data: ImageDataset | None = None, shuffle: bool = True) -> TrainHistory:
    """Train `model` in place on `data` with recipe `cfg`; returns the per-epoch history.

    shuffle: False walks the data in its stored order every epoch (an unshuffled loader, as ABL's
    reference isolation does); True draws a seeded permutation per epoch.

    The model is moved to `device`, is in train mode while training and in eval mode on return.
    Same (model init, data, cfg, seed) -> identical weights on CPU; the global RNG is untouched.
    """
    if len(data) == 0:
        raise ValueError(f"cannot train on dataset {data.name!r}: it has no samples")
    hooks = hooks or TrainHooks()
    device = torch.device(device)
    model.to(device)
    batches = batch_slices(len(data), cfg.batch_size)
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2, np.uint64) >> 1)
    history = TrainHistory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffle_gen = torch.Generator().manual_seed(shuffle_seed)
        augment_gen = torch.Generator(device=device).manual_seed(augment_seed)
        optimizer = make_optimizer(model, cfg)
        forward = torch.compile(model) if cfg.compile else model
        for epoch in range(cfg.epochs):
            record = _train_epoch(model, forward, data, cfg, optimizer, batches, epoch,
                                  shuffle_gen if shuffle else None, augment_gen, hooks, device)
            if eval_data is not None:
                record["eval_acc"] = accuracy(model, eval_data, device=device)
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(epoch, model, record)
            history.epochs.append(record)
            log.debug("epoch %d/%d %s", epoch + 1, cfg.epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, float)))
    model.eval()
    return history


def _train_epoch(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], data: ImageDataset,
                 cfg: TrainConfig, optimizer: torch.optim.Optimizer, batches: list[slice], epoch: int,
                 shuffle_gen: torch.Generator | None, augment_gen: torch.Generator, hooks: TrainHooks,
                 device: torch.device) -> dict[str, Any]:
    model.train()
    order = torch.arange(len(data)) if shuffle_gen is None else torch.randperm(len(data), generator=shuffle_gen)
    epoch_lr = learning_rate(cfg, epoch * len(batches), len(batches))
    total_loss, correct = 0.0, 0
    for b, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch * len(batches) + b, len(batches))
        idx = order[batch]
        idx_np = idx.numpy()
        x = to_tensor(data.images[idx_np], device)
        y = torch.from_numpy(data.labels[idx_np]).to(device)
        if cfg.augment != "none":
            x = recipe_augment(x, cfg, augment_gen)
        if hooks.augment is not None:
            x, y = hooks.augment(x, y, augment_gen)
        logits = forward(x)
        targets = y.to(logits.dtype) if y.is_floating_point() else y
        per_sample = F.cross_entropy(logits, targets, reduction="none")
        if hooks.loss is not None:
            loss = hooks.loss(per_sample, LossContext(idx.to(device), epoch, logits, targets))
        else:
            loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hard = targets.argmax(1) if targets.ndim == 2 else targets
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == hard).sum())
    return {"epoch": epoch, "loss": total_loss / len(data), "train_acc": correct / len(data), "lr": epoch_lr}


def reestimate_batchnorm(model: nn.Module, data: ImageDataset, *, device: torch.device | str,
                         batch_size: int = 64) -> None:
    """Recompute every BatchNorm layer's running mean and variance as the plain average over one pass of
    `data` in batches (torch.optim.swa_utils.update_bn, as SWA does after averaging weights); leaves
    the model in eval mode. After a short fine-tune the running statistics are an exponential average
    that moved only part of the way (1 - 0.9^steps at momentum 0.1) from the old network's statistics to
    the new one's, so the eval-mode network is not the one that was trained; this makes it so."""
    device = torch.device(device)
    model.to(device)
    batches = (to_tensor(data.images[b], device) for b in batch_slices(len(data), batch_size))
    update_bn(batches, model)
    model.eval()


def predict_logits(model: nn.Module, images: np.ndarray, *, device: torch.device | str,
                   batch_size: int = 512) -> np.ndarray:
    """Logits (N, K) float32 of uint8 NHWC `images`, in eval mode without gradients."""
    model.eval()
    outputs: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(to_tensor(images[start:start + batch_size], device))
            outputs.append(logits.float().cpu().numpy())
    if not outputs:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError("cannot tell the number of classes of an empty prediction for a model without a head")
        return np.zeros((0, head.out_features), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def predict(model: nn.Module, images: np.ndarray, *, device: torch.device | str, batch_size: int = 512) -> np.ndarray:
    """Predicted classes (N,) int64 of uint8 NHWC `images`."""
    return predict_logits(model, images, device=device, batch_size=batch_size).argmax(1).astype(np.int64)


def accuracy(model: nn.Module, data: ImageDataset, *, device: torch.device | str, batch_size: int = 512) -> float:
    """Fraction of `data` classified correctly."""
    if len(data) == 0:
        raise ValueError(f"cannot measure accuracy on dataset {data.name!r}: it has no samples")
    return float(np.mean(predict(model, data.images, device=device, batch_size=batch_size) == data.labels))
