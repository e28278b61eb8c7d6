"""Poison keys of the targeted clean-label attacks: which test image, which class, which bases.

A *poison key* is (target test image, adversarial class, base class), as in Geiping et al.
('Witches' Brew', ICLR 2021, Sec. 5) and Shafahi et al. ('Poison Frogs', NeurIPS 2018, Sec. 3):
the attack wants the victim to classify the target as the adversarial class. In the clean-label
setting the perturbed training images (the *bases*) come from the adversarial class itself, so
their correct labels can stay: base class == adversarial class.

Selection (ThreatModel.targets):

* ``random``: `n_targets` distinct test images drawn uniformly (ctx.seed's generator) among those
  the surrogate ensemble classifies correctly (a misclassified target would make success trivial
  or meaningless) and whose label is not the adversarial class; the adversarial class is the given
  one, else uniform among the other classes.
* ``fixed``: the first `n_targets` of `target_ids` (test ids), with the given adversarial class or
  a uniformly drawn other class.
* ``setups``: setups ``start .. start + n_targets - 1`` of another tool's file of keys (the 'Just How
  Toxic' benchmark's ``poison_setups/*.pickle``, poison_core.interop.setups): each setup's target,
  its base class as the adversarial class, and its own base indices instead of a draw. The budget must
  hold every key's bases; a base an earlier key already uses is left out of a later one (logged).

The budget floor(budget * n) is split evenly among the keys; each key's bases are that many
training images of its base class drawn uniformly without replacement (never shared by two keys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import logging

import numpy as np
import torch
from torch import nn

from poison_core.interop import setups as setup_files
from poison_core.perturbation import quantize
from poison_core.attacks.base import CraftContext, Crafted
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.training import to_tensor

CHUNK = 256
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoisonKey:
    """One attacked test image: its id and position in ctx.test, true class, adversarial and base class."""

    target_id: int
    target_position: int
    true_class: int
    adversarial_class: int
    base_class: int


@dataclass(frozen=True)
class KeyPlan:
    """A key and the positions (into ctx.train) of the bases crafted for it."""

    key: PoisonKey
    positions: np.ndarray


def check_classes(ctx: CraftContext) -> None:
    """Refuse class ids outside the dataset and a base class that would need a label change."""
    sel, k = ctx.threat.targets, ctx.train.num_classes
    for name in ("adversarial_class", "base_class"):
        value = getattr(sel, name)
        if value is not None and value >= k:
            raise ConfigError(f"threat.targets.{name}: {value} is outside 0..{k - 1}")
    if sel.base_class is not None and sel.adversarial_class is not None and sel.base_class != sel.adversarial_class:
        raise ConfigError(f"threat.targets.base_class: clean-label poisons come from the adversarial class "
                          f"{sel.adversarial_class}, got {sel.base_class}")
    if ctx.test is None:
        raise ConfigError("ctx.test: targeted attacks choose their targets from the test split; none was given")


def _ensemble_predict(models: Sequence[nn.Module], images: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        x = to_tensor(images, device)
        logits = sum(torch.softmax(m.eval()(x), dim=1) for m in models)
    return logits.argmax(1).cpu().numpy()  # type: ignore[union-attr]  # a sum of tensors


def _random_targets(ctx: CraftContext, n: int, adversarial: int | None, rng: np.random.Generator) -> np.ndarray:
    test = ctx.test
    assert test is not None
    pool = np.flatnonzero(test.labels != adversarial) if adversarial is not None else np.arange(len(test))
    pool = pool[rng.permutation(len(pool))]
    if not ctx.surrogates:
        chosen = pool[:n]
    else:
        found: list[np.ndarray] = []
        for start in range(0, len(pool), CHUNK):
            part = pool[start:start + CHUNK]
            ok = _ensemble_predict(ctx.surrogates, test.images[part], ctx.device) == test.labels[part]
            found.append(part[ok])
            if sum(len(f) for f in found) >= n:
                break
        chosen = np.concatenate(found)[:n] if found else pool[:0]
    if len(chosen) < n:
        raise ConfigError(f"threat.targets.n_targets: only {len(chosen)} eligible test images for {n} targets")
    return chosen


def choose_keys(ctx: CraftContext, rng: np.random.Generator) -> list[PoisonKey]:
    """The poison keys of this craft, from ctx.threat.targets and the attack's generator."""
    check_classes(ctx)
    sel, test, k = ctx.threat.targets, ctx.test, ctx.train.num_classes
    assert test is not None
    if sel.mode == "fixed":
        positions = test.positions(np.asarray(sel.target_ids[:sel.n_targets], dtype=np.int64))
    else:
        positions = _random_targets(ctx, sel.n_targets, sel.adversarial_class, rng)
    keys = []
    for pos in positions:
        true = int(test.labels[pos])
        adversarial = sel.adversarial_class
        if adversarial is None:
            adversarial = int((true + rng.integers(1, k)) % k)
        if adversarial == true:
            raise ConfigError(f"threat.targets.adversarial_class: {adversarial} is the true class of target "
                              f"{int(test.ids[pos])}; choose another class")
        keys.append(PoisonKey(int(test.ids[pos]), int(pos), true, int(adversarial), int(adversarial)))
    return keys


def setup_plans(ctx: CraftContext, n_poison: int) -> list[KeyPlan]:
    """The keys and bases of a setups file (mode ``setups``): no draw; bases disjoint across keys."""
    check_classes(ctx)
    sel, test = ctx.threat.targets, ctx.test
    assert sel.setups is not None and test is not None
    chosen = setup_files.load(sel.setups.path, sel.setups.start, sel.n_targets, ctx.train, test)
    used = np.zeros(len(ctx.train), dtype=bool)
    plans = []
    for setup in chosen:
        pos = ctx.train.positions(setup.base_ids)
        fresh = pos[~used[pos]]
        if len(fresh) < len(pos):
            log.warning("setup %d: %d of its %d bases belong to an earlier key of this craft; left out",
                        setup.number, len(pos) - len(fresh), len(pos))
        if len(fresh) == 0:
            raise ConfigError(f"threat.targets.setups: setup {setup.number}'s bases all belong to earlier keys "
                              "of this craft; use fewer setups (n_targets) or another start")
        used[fresh] = True
        target_pos = int(test.positions(np.asarray([setup.target_id]))[0])
        key = PoisonKey(setup.target_id, target_pos, setup.target_class, setup.base_class, setup.base_class)
        plans.append(KeyPlan(key, np.sort(fresh).astype(np.int64)))
    total = int(used.sum())
    if total > n_poison:
        raise ConfigError(f"threat.budget: setups {sel.setups.start}..{sel.setups.start + len(chosen) - 1} of "
                          f"{sel.setups.path!r} hold {total} bases; the budget {ctx.threat.budget} of "
                          f"{len(ctx.train)} training samples allows {n_poison} (raise budget to at least "
                          f"{total / len(ctx.train):.4g} or use fewer setups)")
    return plans


def plan(ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> list[KeyPlan]:
    """Keys and their bases: n_poison // n_keys base-class training images per key, disjoint; or, in
    mode ``setups``, the file's keys and bases (:func:`setup_plans`)."""
    if ctx.threat.targets.mode == "setups":
        return setup_plans(ctx, n_poison)
    keys = choose_keys(ctx, rng)
    share = n_poison // len(keys)
    if share < 1:
        raise ConfigError(f"threat.targets.n_targets: {len(keys)} targets need at least one poison each "
                          f"(allowed: 1 <= n_targets <= {n_poison})")
    used = np.zeros(len(ctx.train), dtype=bool)
    plans = []
    for key in keys:
        plans.append(KeyPlan(key, base_positions(ctx.train, key.base_class, share, rng, exclude=used)))
        used[plans[-1].positions] = True
    return plans


def base_positions(train: ImageDataset, base_class: int, count: int, rng: np.random.Generator,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of `count` training images of `base_class` (fewer if the class is smaller)."""
    mask = train.labels == base_class
    if exclude is not None:
        mask &= ~exclude
    pool = np.flatnonzero(mask)
    if len(pool) == 0:
        raise ConfigError(f"threat.targets.base_class: no training image of class {base_class} is left to perturb")
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)).astype(np.int64)


def targets_dict(keys: Sequence[PoisonKey]) -> dict[str, Any]:
    """The goal in poison_core.evaluation's format (plus the base classes, for the record)."""
    return {"kind": "targeted", "target_ids": [k.target_id for k in keys],
            "adversarial_classes": [k.adversarial_class for k in keys],
            "base_classes": [k.base_class for k in keys], "true_classes": [k.true_class for k in keys]}


def pack(train: ImageDataset, plans: Sequence[KeyPlan], images: Sequence[np.ndarray]) -> Crafted:
    """A clean-label targeted attack's result: every key's poisoned bases (images[i] for plans[i]) in
    plan order, their labels kept, and the keys as the goal."""
    pos = np.concatenate([kp.positions for kp in plans])
    return Crafted(positions=pos, images=np.concatenate(images), poison_labels=train.labels[pos],
                   targets=targets_dict([kp.key for kp in plans]))


def per_key_poisons(ctx: CraftContext, plans: Sequence[KeyPlan],
                    craft_key: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Crafted:
    """Run `craft_key(bases, target)` (float NCHW tensors on ctx.device, returning poisoned bases)
    for every key, quantise each result to the uint8 eps-ball, and :func:`pack` them."""
    assert ctx.test is not None
    images = []
    for kp in plans:
        bases = to_tensor(ctx.train.images[kp.positions], ctx.device)
        target = to_tensor(ctx.test.images[kp.key.target_position:kp.key.target_position + 1], ctx.device)
        poisons = craft_key(bases, target)
        images.append(quantize(ctx.train.images[kp.positions], poisons - bases, ctx.threat.epsilon))
    return pack(ctx.train, plans, images)
