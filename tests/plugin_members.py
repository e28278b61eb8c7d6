"""Members that live outside poison_core, named by import string in tests/test_plugins.py: one good
attack, and bad members the contract check must catch (each breaks exactly one rule)."""

from __future__ import annotations

import numpy as np
from torch import nn

from poison_core.plugin import Attack, CraftContext, Crafted
from poison_core.poisons import PoisonSet


class Halves(Attack):
    """Relabel a budget of random samples to the class halfway round (a good member)."""

    name, paper, summary = "halves", "-", "test member: relabel to (y + K/2) mod K"
    label_policy = "dirty"

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        pos = np.sort(rng.choice(len(ctx.train), size=n_poison, replace=False))
        k = ctx.train.num_classes
        return Crafted(positions=pos, images=ctx.train.images[pos], poison_labels=(ctx.train.labels[pos] + k // 2) % k)


class _Unaudited(Attack):
    """Builds its PoisonSet itself, skipping the base class's audit: what a careless plug-in might do."""

    def changed(self, ctx: CraftContext, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def craft(self, ctx: CraftContext) -> PoisonSet:
        pos = np.arange(ctx.threat.max_poisons(len(ctx.train)))
        images, labels = self.changed(ctx, pos)
        return PoisonSet(ids=ctx.train.ids[pos], images=images, orig_labels=ctx.train.labels[pos],
                         poison_labels=labels, threat=ctx.threat, n_train=len(ctx.train))

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        raise AssertionError("craft is overridden")


class TooLoud(_Unaudited):
    """Adds twice the allowed epsilon."""

    name, paper, summary = "too_loud", "-", "breaks epsilon"
    label_policy = "clean"
    perturbation_only = True

    def changed(self, ctx, pos):
        noisy = np.clip(ctx.train.images[pos].astype(np.int16) + 2 * ctx.threat.epsilon, 0, 255).astype(np.uint8)
        return noisy, ctx.train.labels[pos]


class Relabels(_Unaudited):
    """Claims to be clean-label but changes labels."""

    name, paper, summary = "relabels", "-", "breaks clean-label"
    label_policy = "clean"
    perturbation_only = True

    def changed(self, ctx, pos):
        return ctx.train.images[pos], (ctx.train.labels[pos] + 1) % ctx.train.num_classes


class Unseeded(Halves):
    """Draws its samples from an unseeded generator."""

    name = "unseeded"

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        return super()._craft(ctx, n_poison, np.random.default_rng())


def no_head(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
    """A model builder whose module has no features/head split."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes))


def median(values):
    """Not a member of any registry."""
    return sorted(values)[len(values) // 2]
