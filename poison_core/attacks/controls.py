"""Controls: the baselines every availability attack is compared with.

`random_noise`: i.i.d. uniform integer noise in [-eps, eps] on each protected pixel, the control
of Huang et al. (ICLR 2021, Table 1, 'random noise'): same budget, same epsilon, no optimisation.
If an attack does no better than this control, its effect is the perturbation budget, not the attack.
`mode: class` draws ONE uniform pattern per class and adds it to every protected sample of that class:
the control of class-wise error-minimising noise (Huang et al., Sec. 4.1, class-wise setting). A fixed
pattern per class is itself a shortcut a network can learn, so a class-wise attack must beat this
control, not only the sample-wise one.

`random_labels`: the budget's labels redrawn uniformly over ALL classes (a draw may keep the
label), the random-label setting of Zhang et al., 'Understanding deep learning requires rethinking
generalization', ICLR 2017. Pixels are never changed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from poison_core.attacks._pgd import choose_positions
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack


class RandomNoiseParams(AttackParams):
    """mode 'sample': an independent draw per sample (Table 1's control); 'class': one draw per class."""

    mode: Literal["sample", "class"] = "sample"


@register_attack
class RandomNoise(Attack):
    """Uniform +/-eps noise on the budget (the control of every perturbation attack), per sample or per class."""

    name = "random_noise"
    paper = "Huang et al., Unlearnable Examples, ICLR 2021 (random-noise control, Table 1)"
    summary = "clean-label control: uniform integer noise in [-eps, eps], i.i.d. per sample or one pattern per class"
    Params = RandomNoiseParams
    label_policy = "clean"
    perturbation_only = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        train, eps = ctx.train, ctx.threat.epsilon
        pos = choose_positions(len(train), n_poison, rng)
        clean = train.images[pos].astype(np.int16)
        if self.params.mode == "class":
            patterns = rng.integers(-eps, eps + 1, size=(train.num_classes, *clean.shape[1:]), dtype=np.int16)
            noise = patterns[train.labels[pos]]
        else:
            noise = rng.integers(-eps, eps + 1, size=clean.shape, dtype=np.int16)
        images = np.clip(clean + noise, 0, 255).astype(np.uint8)
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "control": "random_noise", "mode": self.params.mode})


@register_attack
class RandomLabels(Attack):
    """Labels of the budget redrawn uniformly over all classes (the label-noise control)."""

    name = "random_labels"
    paper = "Zhang et al., Understanding deep learning requires rethinking generalization, ICLR 2017"
    summary = "dirty-label control: labels redrawn uniformly at random over all classes"
    label_policy = "dirty"

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        train = ctx.train
        pos = choose_positions(len(train), n_poison, rng)
        labels = rng.integers(0, train.num_classes, size=len(pos)).astype(np.int64)
        return Crafted(positions=pos, images=train.images[pos], poison_labels=labels,
                       targets={"kind": "availability", "control": "random_labels"})
