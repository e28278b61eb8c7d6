"""p-tampering poisoning: Mahloujifar, Diochnos & Mahmoody, 'Learning under p-Tampering Attacks',
ALT 2018, and 'The Curse of Concentration in Robust Learning: Evasion and Poisoning Attacks from
Concentration of Measure', AAAI 2019 (p-tampering, Def. 2.1 / Sec. 3).

The training set arrives as a stream. Independently for each incoming example, with probability
p the attacker gets to replace it by another *valid* example (a real sample with its true label,
drawn here from the clean training pool), and it uses the opportunity to raise the loss of the
learner on a target (here: the examples of `target_class`, a class-targeted goal). The learner is
online: multinomial logistic regression updated by one SGD step per example (lr, L2 lam). At each
opportunity the attacker draws `n_candidates` valid examples and keeps the one whose SGD step
raises the target loss the most, i.e. a greedy one-step estimate of the expected target loss that
the paper's biasing attack (ALT 2018, Sec. 3, the 'one-rejection sampling' tamperer) raises;
`choice: random` replaces with a random valid example instead (the control). The attacker stops
when its budget floor(budget * n) is spent, so budget should be about p or more.

Labels stay valid: the poison label is the replacement's true label (under clean_label the
candidates are restricted to the slot's own class, so labels are unchanged). The replacement is
stored at the slot's position within the threat model's L-inf ball of the slot's image; with
epsilon 255 it is the valid example itself.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import Field

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError

log = logging.getLogger(__name__)


class PTamperingParams(AttackParams):
    p: float = Field(0.1, gt=0, le=1)
    target_class: int = Field(0, ge=0, le=100_000)
    choice: Literal["loss", "random"] = "loss"
    n_candidates: int = Field(256, ge=1, le=100_000)
    n_target: int = Field(200, ge=1, le=100_000)
    lr: float = Field(0.5, gt=0, le=100)
    lam: float = Field(1e-3, ge=0, le=10)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def target_losses_after_step(w: np.ndarray, b: np.ndarray, x_target: np.ndarray, y_target: np.ndarray,
                             x_cand: np.ndarray, y_cand: np.ndarray, lr: float, lam: float) -> np.ndarray:
    """Mean cross-entropy on the target after one SGD step on each candidate (exact, vectorised)."""
    k = len(b)
    resid = _softmax(x_cand @ w.T + b) - np.eye(k)[y_cand]
    base = (1.0 - lr * lam) * (x_target @ w.T) + b
    gram = x_target @ x_cand.T + 1.0
    scores = base[:, None, :] - lr * gram[:, :, None] * resid[None, :, :]
    scores -= scores.max(axis=-1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(y_target)), :, y_target].mean(axis=0)


@register_attack
class PTampering(Attack):
    """Mahloujifar et al.'s online p-tampering: replace each example w.p. p by a loss-raising valid one."""

    name = "p_tampering"
    paper = "Mahloujifar, Diochnos & Mahmoody, ALT 2018 (Sec. 3); AAAI 2019 (Def. 2.1)"
    summary = "targeted-class: online, each example w.p. p replaced by a valid example raising the target loss"
    Params = PTamperingParams
    label_policy = "any"

    def check_dataset(self, train: ImageDataset) -> None:
        k = train.num_classes
        if self.params.target_class >= k:
            raise ConfigError(f"params.target_class: class {self.params.target_class} is outside 0..{k - 1}")

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        n, k = len(train), train.num_classes
        feats = train.images.reshape(n, -1).astype(np.float64) / 255.0
        labels = train.labels
        order = rng.permutation(n)
        chances = rng.random(n) < p.p
        in_target = np.flatnonzero(labels == p.target_class)
        if len(in_target) == 0:
            raise ConfigError(f"params.target_class: class {p.target_class} has no training samples")
        target = rng.choice(in_target, size=min(p.n_target, len(in_target)), replace=False)
        w, b = np.zeros((k, feats.shape[1])), np.zeros(k)
        slots: list[int] = []
        chosen: list[int] = []
        for step, pos in enumerate(order):
            x, y = feats[pos], labels[pos]
            if chances[step] and len(slots) < n_poison:
                pool = np.flatnonzero(labels == y) if ctx.threat.clean_label else np.arange(n)
                cand = rng.choice(pool, size=min(p.n_candidates, len(pool)), replace=False)
                x_cand = np.clip(feats[cand], x - eps / 255.0, x + eps / 255.0)
                if p.choice == "loss":
                    gain = target_losses_after_step(w, b, feats[target], labels[target], x_cand, labels[cand],
                                                    p.lr, p.lam)
                    pick = int(np.argmax(gain))
                else:
                    pick = int(rng.integers(len(cand)))
                slots.append(pos)
                chosen.append(cand[pick])
                x, y = x_cand[pick], labels[cand[pick]]
            resid = _softmax(w @ x + b) - np.eye(k)[y]
            w -= p.lr * (np.outer(resid, x) + p.lam * w)
            b -= p.lr * resid
        positions, sources = np.asarray(slots, dtype=np.int64), np.asarray(chosen, dtype=np.int64)
        order_pos = np.argsort(positions)
        positions, sources = positions[order_pos], sources[order_pos]
        base = train.images[positions].astype(np.int16)
        images = np.clip(train.images[sources].astype(np.int16), base - eps, base + eps).astype(np.uint8)
        log.info("p-tampering (p=%.2f, %s): %d of %d examples replaced", p.p, p.choice, len(positions), n)
        return Crafted(positions=positions, images=images, poison_labels=labels[sources],
                       targets={"kind": "availability", "target_class": p.target_class, "p": p.p})
