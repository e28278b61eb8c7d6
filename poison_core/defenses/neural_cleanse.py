"""Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, 'Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks', IEEE S&P 2019).

1. Train the victim architecture on the (possibly poisoned) training data: the model to inspect.
2. Reverse engineering (Sec. IV-C, Eq. 2-3): for every class t find the smallest trigger that sends
   clean inputs to t. The stamped input is  A(x, m, Delta) = (1 - m) * x + m * Delta  (Eq. 2) with a
   2-D mask m in [0, 1]^(HxW) shared by the channels and a pattern Delta in [0, 1]^(CxHxW), found by
       min_{m, Delta}  CE(f(A(x, m, Delta)), t) + lambda * |m|_1     (Eq. 3)
   over training samples. As in the authors' code (bolunwang/backdoor, visualizer.py) m and Delta are
   tanh-parametrised (m = tanh(w) / (2 - eps) + 1/2, so both stay in [0, 1]), optimised with Adam
   (lr 0.1, betas 0.5 / 0.9) and lambda follows their adaptive schedule: 0 until the trigger reaches
   the attack-success threshold (99 %) for `patience` epochs, then init_cost (1e-3), multiplied by
   2 after `patience` successful epochs and divided by 2^1.5 after `patience` failing ones; the
   smallest-L1 mask that reached the threshold is kept, and a class stops early once lambda went both
   up and down and that best L1 has not improved for 5 x patience epochs. The authors run up to 1000
   epochs; `epochs` defaults to 40 for the small CPU models here. All K classes are optimised
   together in one batch (K independent parameter sets: Adam is element-wise, so this equals K runs).
3. Detection (Sec. IV-B): the anomaly index of class t is |L1_t - median| / (1.4826 * MAD) over the
   K mask norms (MAD = median absolute deviation; 1.4826 makes it a standard-deviation estimate for
   normal data). A class whose norm is below the median with anomaly index > 2 is flagged as infected.
4. Mitigation by unlearning (Sec. VI-C, the paper's main patch): if any class is flagged, fine-tune the
   model on a 10 % sample of the training data in which 20 % of the samples carry a reversed trigger
   of a flagged class and keep their labels, for 1 epoch. Otherwise the model is returned unchanged.
   The paper fine-tunes on clean data; here the sample comes from the poisoned training set, whose
   dirty-label poisons (labelled with the infected class) re-teach the trigger while it is unlearnt.
   The fine-tuning runs at a constant unlearn_lr, by default a tenth of the victim's (peak) lr: the
   victim ends its schedule near lr 0, and restarting it at the peak costs clean accuracy by itself
   (Fashion-MNIST, 4,000 images, width-16 ConvNet: plain fine-tuning on 10 % clean data at lr 0.05
   gives 0.84 -> 0.74, at 0.01 0.81; BackdoorBench's NC fine-tunes at lr 0.01).
   Then the BatchNorm running statistics are recomputed over the unlearning sample (`reestimate_bn`,
   on by default; the paper does not discuss BatchNorm): one epoch is a few steps, after which the
   exponential running averages sit half-way between the old network's statistics and the new one's,
   so the eval-mode network is not the network that was fine-tuned. That mismatch, not the unlearning,
   caused the clean-accuracy collapse we measured before. Measured on the grid's Fashion-MNIST victims
   (configs/fashion-mnist-backdoors.yaml, unlearning lr 0.005, one run per cell): unlearning the
   false-alarm class 8 (below) took clean accuracy 0.843 -> 0.711 on a clean model, 0.839 -> 0.736 and
   0.836 -> 0.727 on two BadNets models, 0.809 -> 0.452 on WaNet's, and with the re-estimation to 0.810,
   0.812, 0.828 and 0.785; unlearning the BadNets target 9 gave ASR 0.03 / 0.04 at clean 0.778 / 0.808
   without it and ASR 0.12 / 0.12 at 0.823 / 0.827 with it (a network with mismatched statistics also
   predicts the target less). Re-estimating on the whole training set instead of the unlearning sample
   left ASR at 0.22 / 0.37; five unlearning epochs let the sample's poisons re-teach the trigger (ASR
   0.72 / 0.43 without the re-estimation, 0.82 / 0.57 with it).
   `exclude_flagged` leaves every sample labelled with a flagged class out of the unlearning sample
   (our adaptation, off by default): measured on digits (white 3x3 BadNets, 10 %, ConvNet, three
   unlearning seeds) the paper's setting (10 %, 1 epoch, lr 0.05) left ASR at 1.0 / 0.0 / 0.0 with
   clean accuracy 0.78-0.84, unlearning on all data (100 %, 50 % stamped, lr 0.02) left ASR 1.0,
   while excluding the flagged class (100 %, 2 epochs, lr 0.01) gave ASR <= 0.005, clean 0.97-0.98.

A false alarm measured on Fashion-MNIST (configs/fashion-mnist-backdoors.yaml, 40 reversal epochs on
500 samples): class 8 (bag) has a naturally small trigger (mask L1 ~20 against a median ~70), so it
is flagged on many models, poisoned or not (anomaly index 2.3-4.1 on 5 of 6 poisoned models of one
grid run, 2.91 on a clean one), sometimes next to the BadNets target 9, sometimes instead of it. The
paper reports its clean models below index 2; on digits ours do too (index 0.83). With the BatchNorm
re-estimation a false alarm's unlearning costs 0.8-3.3 points of clean accuracy (above; 2-6 in the
grid run in benchmarks/results/members.md), up to 42 before.

The paper assumes a small clean held-out set; here the triggers are reversed on, and the unlearning
sample drawn from, the (possibly poisoned) training set. Ground truth (ctx.is_poison) is used only
to report whether the flagged class is the poisons' label (`nc_flagged_poison_class`).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.data.dataset import ImageDataset
from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, ModelClassifier,
                                       register_defense)
from poison_core.defenses.filters import feature_model
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, reestimate_batchnorm, to_tensor, train_model

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826
TANH_EPS = 1e-7  # the authors' K.epsilon(): tanh(w) / (2 - eps) + 0.5 stays inside (0, 1)
UNLEARN_LR_SCALE = 0.1  # default unlearning lr as a fraction of the victim's lr (module docstring, step 4)


class NeuralCleanseParams(DefenseParams):
    """Reverse engineering: epochs (authors' code: up to 1000 with early stopping), n_samples training
    samples the triggers are optimised on (1000), batch_size (32), lr (Adam 0.1), init_cost (1e-3),
    cost_multiplier (2), patience (5), attack_success (0.99); detection: anomaly_threshold (2);
    mitigation 'unlearning' (Sec. VI-C: unlearn_fraction 0.1 of the training data, stamp_fraction
    0.2 of it stamped, unlearn_epochs 1, unlearn_lr None = UNLEARN_LR_SCALE x the victim's lr) or
    'none' (detect only); reestimate_bn: recompute the BatchNorm statistics on the unlearning sample
    after fine-tuning (see the module docstring; no effect on a model without BatchNorm);
    exclude_flagged: leave the flagged classes' samples out of the unlearning sample (not in the
    paper, whose unlearning data is clean; see the module docstring)."""

    epochs: int = Field(40, ge=1, le=1000)
    n_samples: int = Field(1000, ge=2, le=100_000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(0.1, gt=0, le=10)
    init_cost: float = Field(1e-3, gt=0, le=100)
    cost_multiplier: float = Field(2.0, gt=1, le=10)
    patience: int = Field(5, ge=1, le=100)
    attack_success: float = Field(0.99, gt=0, le=1)
    anomaly_threshold: float = Field(2.0, gt=0, le=100)
    mitigation: Literal["unlearning", "none"] = "unlearning"
    unlearn_fraction: float = Field(0.1, gt=0, le=1)
    stamp_fraction: float = Field(0.2, gt=0, le=1)
    unlearn_epochs: int = Field(1, ge=1, le=1000)
    unlearn_lr: float | None = Field(None, gt=0, le=10)
    exclude_flagged: bool = False
    reestimate_bn: bool = True


def mad_anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|x - median| / (1.4826 * median|x - median|) of each norm (0 where x is the median; a
    deviation over a zero MAD is divided by 1e-12, i.e. effectively infinite)."""
    norms = np.asarray(norms, dtype=np.float64)
    deviation = np.abs(norms - np.median(norms))
    mad = MAD_TO_SIGMA * float(np.median(deviation))
    return np.where(deviation > 0, deviation / max(mad, 1e-12), 0.0)


def flagged_classes(norms: np.ndarray, threshold: float = 2.0) -> np.ndarray:
    """Classes whose mask norm is below the median with an anomaly index above `threshold`."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.flatnonzero((norms < np.median(norms)) & (mad_anomaly_index(norms) > threshold))


def _to_raw(u: torch.Tensor) -> torch.Tensor:
    """Inverse of the tanh parametrisation: w with tanh(w) / (2 - eps) + 0.5 == u."""
    return torch.atanh((u - 0.5) * (2 - TANH_EPS))


def _from_raw(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - TANH_EPS) + 0.5


class _CostSchedule:
    """The authors' adaptive lambda, one independent state per class (visualizer.py)."""

    def __init__(self, k: int, p: NeuralCleanseParams) -> None:
        self.p, self.cost = p, np.zeros(k)
        self.set_counter, self.up, self.down = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
        self.up_flag, self.down_flag = np.zeros(k, bool), np.zeros(k, bool)

    def step(self, success: np.ndarray) -> None:
        p = self.p
        warm = (self.cost == 0) & success
        self.set_counter = np.where(warm, self.set_counter + 1, 0)
        start = warm & (self.set_counter >= p.patience)
        self.cost[start] = p.init_cost
        for arr in (self.up, self.down):
            arr[start] = 0
        self.up_flag[start] = self.down_flag[start] = False
        self.up = np.where(success, self.up + 1, 0)
        self.down = np.where(success, 0, self.down + 1)
        raise_, lower = self.up >= p.patience, (self.up < p.patience) & (self.down >= p.patience)
        self.cost[raise_] *= p.cost_multiplier
        self.cost[lower] /= p.cost_multiplier ** 1.5
        self.up[raise_], self.down[lower] = 0, 0
        self.up_flag |= raise_
        self.down_flag |= lower


def reverse_triggers(model: nn.Module, images: np.ndarray, num_classes: int, p: NeuralCleanseParams, seed: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 3 for every class at once: masks (K, H, W), patterns (K, H, W, C) in [0, 1] and the L1
    norms (K,) of the smallest masks that reached the attack-success threshold (else the last masks)."""
    model.eval()
    grad_state = [q.requires_grad for q in model.parameters()]
    for q in model.parameters():
        q.requires_grad_(False)
    n, h, w, c = images.shape
    k = num_classes
    gen = torch.Generator().manual_seed(seed)
    mask_w = _to_raw(torch.rand(k, 1, h, w, generator=gen, dtype=torch.float32)).to(device).requires_grad_()
    pattern_w = _to_raw(torch.rand(k, c, h, w, generator=gen, dtype=torch.float32)).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_w, pattern_w], lr=p.lr, betas=(0.5, 0.9))
    x_all = to_tensor(images, device)
    targets = torch.arange(k, device=device)
    schedule = _CostSchedule(k, p)
    best_mask, best_pattern = np.zeros((k, h, w)), np.zeros((k, h, w, c))
    best_reg, stop_best = np.full(k, np.inf), np.full(k, np.inf)
    stale, done = np.zeros(k, int), np.zeros(k, bool)
    batches = batch_slices(n, p.batch_size)
    try:
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=gen)
            hits, regs = np.zeros(k), np.zeros(k)
            for batch in batches:
                x = x_all[order[batch].to(device)]
                mask, pattern = _from_raw(mask_w), _from_raw(pattern_w)
                stamped = (1 - mask)[:, None] * x[None] + (mask * pattern)[:, None]
                logits = model(stamped.reshape(-1, c, h, w)).reshape(k, len(x), -1)
                ce = F.cross_entropy(logits.transpose(1, 2), targets[:, None].expand(k, len(x)),
                                     reduction="none").mean(dim=1)
                reg = mask.sum(dim=(1, 2, 3))
                cost = torch.as_tensor(schedule.cost, dtype=reg.dtype, device=device)
                opt.zero_grad(set_to_none=True)
                (ce + cost * reg).sum().backward()
                opt.step()
                hits += (logits.argmax(-1) == targets[:, None]).double().mean(dim=1).detach().cpu().numpy() * len(x)
                regs += reg.detach().double().cpu().numpy() * len(x)
            success, reg_epoch = hits / n >= p.attack_success, regs / n
            better = success & (reg_epoch < best_reg) & ~done
            if better.any():
                with torch.no_grad():
                    m = _from_raw(mask_w)[:, 0].double().cpu().numpy()
                    pat = _from_raw(pattern_w).permute(0, 2, 3, 1).double().cpu().numpy()
                best_mask[better], best_pattern[better], best_reg[better] = m[better], pat[better], reg_epoch[better]
            stale = np.where(np.isfinite(best_reg) & (best_reg >= stop_best), stale + 1, 0)
            stop_best = np.minimum(stop_best, best_reg)
            done |= schedule.up_flag & schedule.down_flag & (stale >= 5 * p.patience)
            schedule.step(success)
            if done.all():
                break
    finally:
        for q, flag in zip(model.parameters(), grad_state):
            q.requires_grad_(flag)
    missing = ~np.isfinite(best_reg)
    if missing.any():
        with torch.no_grad():
            best_mask[missing] = _from_raw(mask_w)[:, 0].double().cpu().numpy()[missing]
            best_pattern[missing] = _from_raw(pattern_w).permute(0, 2, 3, 1).double().cpu().numpy()[missing]
    return best_mask, best_pattern, best_mask.sum(axis=(1, 2))


def stamp(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Eq. 2 on uint8 NHWC images: (1 - m) x + m Delta, rounded back to uint8."""
    x = images.astype(np.float64) / 255.0
    out = (1 - mask[None, :, :, None]) * x + mask[None, :, :, None] * pattern[None]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def unlearning_set(train: ImageDataset, masks: np.ndarray, patterns: np.ndarray, flagged: np.ndarray,
                   p: NeuralCleanseParams, seed: int) -> ImageDataset:
    """Sec. VI-C: a unlearn_fraction sample of the training data (without the flagged classes'
    samples when p.exclude_flagged), stamp_fraction of it stamped with a flagged class's reversed
    trigger (round-robin over the flagged classes), labels unchanged."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~np.isin(train.labels, flagged)) if p.exclude_flagged else np.arange(len(train))
    if len(pool) < 2:
        pool = np.arange(len(train))
    n_sample = min(len(pool), max(2, math.floor(p.unlearn_fraction * len(pool) + 1e-9)))
    picked = np.sort(rng.choice(pool, size=n_sample, replace=False))
    images = train.images[picked].copy()
    stamped = rng.choice(n_sample, size=max(1, math.floor(p.stamp_fraction * n_sample + 1e-9)), replace=False)
    for i, cls in enumerate(flagged):
        rows = stamped[i::len(flagged)]
        images[rows] = stamp(images[rows], masks[cls], patterns[cls])
    return train.subset(picked).replace(images=images)


@register_defense
class NeuralCleanse(Defense):
    """Reverse-engineer a minimal trigger per class, flag small-norm outliers by MAD, unlearn them."""

    name = "neural_cleanse"
    paper = "Wang et al., IEEE S&P 2019, Neural Cleanse: identifying and mitigating backdoor attacks in neural networks"
    summary = ("detection + unlearning: reverse a minimal trigger per class, flag small-L1 outliers "
               "(MAD anomaly index > 2), fine-tune on samples stamped with it")
    Params = NeuralCleanseParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        p, train = self.params, ctx.train
        model = feature_model(ctx)
        rng = np.random.default_rng(derive_seed(ctx.seed, "neural_cleanse", "samples"))
        rows = np.sort(rng.choice(len(train), size=min(p.n_samples, len(train)), replace=False))
        masks, patterns, norms = reverse_triggers(model, train.images[rows], train.num_classes, p,
                                                  derive_seed(ctx.seed, "neural_cleanse", "reverse"), ctx.device)
        index = mad_anomaly_index(norms)
        flagged = flagged_classes(norms, p.anomaly_threshold)
        suspect = int(np.argmin(norms))
        info = {"nc_anomaly_index": float(index[suspect]), "nc_flagged": float(len(flagged) > 0),
                "nc_flagged_class": float(flagged[np.argmin(norms[flagged])]) if len(flagged) else -1.0,
                "nc_mask_l1_min": float(norms[suspect]), "nc_mask_l1_median": float(np.median(norms))}
        if ctx.is_poison is not None and ctx.is_poison.any():
            poison_label = int(np.bincount(train.labels[ctx.is_poison]).argmax())
            info["nc_flagged_poison_class"] = float(poison_label in set(flagged.tolist()))
        log.info("neural_cleanse: mask L1 norms %s, anomaly indices %s, flagged %s", norms.round(2),
                    index.round(2), flagged.tolist())
        history: list[dict] = []
        if len(flagged) and p.mitigation == "unlearning":
            seed = derive_seed(ctx.seed, "neural_cleanse", "unlearn")
            data = unlearning_set(train, masks, patterns, flagged, p, seed)
            recipe = ctx.victim.train.model_copy(update={"epochs": p.unlearn_epochs, "schedule": "none",
                                                         "lr": p.unlearn_lr or UNLEARN_LR_SCALE * ctx.victim.train.lr})
            history = list(train_model(model, data, recipe, device=ctx.device,
                                       seed=derive_seed(ctx.seed, "neural_cleanse", "finetune")).epochs)
            if p.reestimate_bn:
                reestimate_batchnorm(model, data, device=ctx.device, batch_size=recipe.batch_size)
        return DefenseResult(ModelClassifier(model.eval(), ctx.device), history=history, info=info)
