"""Generative poisoning with an auto-encoder: Yang, Wu, Li & Chen, 'Generative Poisoning Attack
Method Against Neural Networks', arXiv:1703.01340, 2017.

Instead of running gradient ascent for every poison (the 'direct gradient method' the paper
compares against), an auto-encoder generator G is trained once to map a clean image to its poison,
after which every poison costs one forward pass; the paper reports generation up to ~239x faster
than direct gradient crafting at similar loss increase (Sec. 4). Our generator is a convolutional
auto-encoder (one stride-2 encoder stage, an upsampling decoder) whose output is bounded by the
threat model, x' = clip(x + (eps/255) tanh(G(x, y)), 0, 1); G also sees the label y, which the
attacker knows. It is trained, with the surrogate(s) fixed, on the poison loss of the
error-maximising attack it replaces (Fowl et al., NeurIPS 2021, Eq. 2: class-targeted, minimise
CE(f(x'), (y + 1) mod K); or untargeted, maximise CE(f(x'), y)), so poisons/second and damage can
be compared with `error_max` one to one (the paper rewards its generator with the victim's loss
after an update on the poisons, a bi-level objective; we use the single-level one). Labels are kept.

The pre-tanh output carries a saturation penalty `penalty * mean(relu(|G(x, y)| - 2)^2)`: without
it the generator fell within two epochs into one universal 'darken every pixel' pattern with a
saturated tanh and no gradient left. Defaults (chosen on digits against an MLP surrogate): 30
epochs of Adam (lr 3e-3, batch 128), width 16, penalty 1.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks._pgd import choose_positions, ensemble_logits, frozen, torch_generator
from poison_core.perturbation import quantize, to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.training import batch_slices, to_tensor

log = logging.getLogger(__name__)


class GenerativeParams(AttackParams):
    targeted: bool = True
    epochs: int = Field(30, ge=1, le=1000)
    width: int = Field(16, ge=1, le=512)
    lr: float = Field(3e-3, gt=0, le=1)
    batch_size: int = Field(128, ge=1, le=65_536)
    penalty: float = Field(1.0, ge=0, le=1e4)


class AutoEncoder(nn.Module):
    """Class-conditional conv auto-encoder: (image, one-hot label planes) -> conv -> stride-2 conv;
    upsample -> conv -> conv without bias. Returns the pre-tanh map; the poison is
    x + (eps/255) tanh(map). Without the label planes the generator found only one image-independent
    pattern (no damage to the victim); leaky ReLUs keep every unit trainable.
    """

    def __init__(self, channels: int, width: int, size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = nn.Sequential(nn.Conv2d(channels + num_classes, width, 3, padding=1), nn.LeakyReLU(0.2),
                                     nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(nn.Upsample(size=size), nn.Conv2d(2 * width, width, 3, padding=1),
                                     nn.LeakyReLU(0.2), nn.Conv2d(width, channels, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.decoder(self.encoder(torch.cat([x, onehot], dim=1)))


def train_generator(models: list[nn.Module], images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                    epsilon: int, params: GenerativeParams, rng: np.random.Generator,
                    device: torch.device) -> AutoEncoder:
    """Fit the auto-encoder on (images, labels) against the fixed surrogates (one pass = one epoch)."""
    h, w, c = images.shape[1:]
    gen = torch_generator(rng, device)
    model = AutoEncoder(c, params.width, (h, w), num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    radius, sign = to_unit(epsilon), 1.0 if params.targeted else -1.0
    goal = (labels + 1) % num_classes if params.targeted else labels
    with frozen(models):
        for epoch in range(params.epochs):
            order = torch.randperm(len(images), generator=gen).numpy()
            total = 0.0
            for batch in batch_slices(len(images), params.batch_size):
                idx = order[batch]
                x = to_tensor(images[idx], device)
                y = torch.from_numpy(goal[idx]).to(device)
                pre = model(x, torch.from_numpy(labels[idx]).to(device))
                poisoned = (x + radius * torch.tanh(pre)).clamp(0.0, 1.0)
                loss = sign * F.cross_entropy(ensemble_logits(models, poisoned), y) + params.penalty * saturation(pre)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            log.debug("generator epoch %d: poison loss %.4f", epoch, total / len(images))
    return model.eval()


def saturation(pre: torch.Tensor, knee: float = 2.0) -> torch.Tensor:
    """mean(relu(|pre| - knee)^2): zero while tanh(pre) is responsive, growing once it saturates."""
    return torch.relu(pre.abs() - knee).pow(2).mean()


@torch.no_grad()
def generate(model: AutoEncoder, images: np.ndarray, labels: np.ndarray, epsilon: int, device: torch.device,
             batch_size: int = 1024) -> np.ndarray:
    """Poisons of uint8 `images` in one forward pass per batch, on the uint8 grid within epsilon."""
    out = np.empty_like(images)
    for batch in batch_slices(len(images), batch_size):
        x = to_tensor(images[batch], device)
        y = torch.from_numpy(np.asarray(labels[batch], dtype=np.int64)).to(device)
        delta = (x + to_unit(epsilon) * torch.tanh(model(x, y))).clamp(0.0, 1.0) - x
        out[batch] = quantize(images[batch], delta, epsilon)
    return out


@register_attack
class Generative(Attack):
    """Yang et al.'s auto-encoder generator, trained on the error-maximising poison loss."""

    name = "generative"
    paper = "Yang, Wu, Li & Chen, Generative Poisoning Attack Method Against Neural Networks, arXiv:1703.01340 (Sec. 3)"
    summary = "clean-label availability: an auto-encoder generates error-maximising poisons in one forward pass"
    Params = GenerativeParams
    smoke = {"epochs": 4, "width": 4, "lr": 0.01}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        train, eps = ctx.train, ctx.threat.epsilon
        pos = choose_positions(len(train), n_poison, rng)
        model = train_generator(list(ctx.surrogates), train.images, train.labels, train.num_classes, epsilon=eps,
                                params=self.params, rng=rng, device=ctx.device)
        images = generate(model, train.images[pos], train.labels[pos], eps, ctx.device)
        return Crafted(positions=pos, images=images, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "targeted": self.params.targeted})
