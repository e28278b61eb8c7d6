"""SIG: Barni, Kallas & Tondi, 'A new backdoor attack in CNNs by training set corruption without label
poisoning', ICIP 2019 (the signals of :mod:`poison_core.triggers.sig`).

Clean-label: only training images of `target_class` are corrupted, x' = x + v, and their
labels stay correct. The victim learns the signal v as a feature of the target class, and at test
time v superimposed on an image of any other class steers it to the target class (success = attack
success rate). Paper defaults: the sinusoidal signal with Delta = 20 and f = 6 (their traffic-sign
experiment; the ramp, their MNIST signal, is `signal: ramp`); Barni et al. raise the strength at test
time (Delta_ts > Delta_tr), which `test_delta` sets (None: the training strength).

Budget: floor(budget * n) poisons, capped at the target class's size (Barni et al. state the share
of the target class corrupted, alpha; here alpha = poisons / target-class size). Epsilon: each
pixel's change is clipped to the threat epsilon, at train and test time alike; Delta = 20 is stamped
unclipped from epsilon 20 on (a test-time Delta_ts from epsilon Delta_ts on).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.triggers import apply_trigger
from poison_core.triggers.sig import training_spec


class SigParams(AttackParams):
    target_class: int = Field(0, ge=0)
    signal: Literal["sin", "ramp"] = "sin"
    delta: float = Field(20.0, gt=0, le=255)
    frequency: float = Field(6.0, gt=0, le=1024)
    test_delta: float | None = Field(None, gt=0, le=255)


@register_attack
class Sig(Attack):
    """Clean-label backdoor: a ramp or sinusoidal signal added to target-class training images."""

    name = "sig"
    paper = ("Barni, Kallas & Tondi, A new backdoor attack in CNNs by training set corruption without label "
             "poisoning, ICIP 2019")
    summary = "clean-label backdoor: sinusoidal (or ramp) signal added to target-class images, labels kept"
    Params = SigParams
    label_policy = "clean"
    perturbation_only = True

    def trigger_spec(self, epsilon: int) -> dict[str, Any]:
        """The stored spec: `delta` is the test-time strength, `train_delta` that of the poisons."""
        p = self.params
        test_delta = p.delta if p.test_delta is None else p.test_delta
        return {"kind": "sig", "signal": p.signal, "delta": test_delta, "train_delta": p.delta,
                "frequency": p.frequency, "epsilon": epsilon, "target_class": p.target_class}

    def check_dataset(self, train: ImageDataset) -> None:
        p = self.params
        if p.target_class >= train.num_classes:
            raise ConfigError(f"params.target_class: {p.target_class} is outside 0..{train.num_classes - 1}")

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        if ctx.threat.epsilon < 1:
            raise ConfigError("threat.epsilon: the sig signal needs epsilon >= 1 (allowed: 1..255)")
        pool = np.flatnonzero(train.labels == p.target_class)
        if not len(pool):
            raise ConfigError(f"params.target_class: the training set has no image of class {p.target_class}")
        pos = np.sort(rng.choice(pool, size=min(n_poison, len(pool)), replace=False))
        spec = self.trigger_spec(ctx.threat.epsilon)
        images = apply_trigger(training_spec(spec), train.images[pos])
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "backdoor", "target_class": p.target_class}, trigger=spec,
                       provenance={"target_class_fraction": len(pos) / len(pool)})
