"""Transferable Unlearnable Examples: Ren et al., ICLR 2023 ('TUE').

Unlearnable noise that transfers across training settings (supervised and self-supervised) and
datasets. Like error-minimising noise it is a min-min problem, but the inner model is an
UNSUPERVISED contrastive encoder (SimCLR, Chen et al., ICML 2020), and the noise is also pushed to
be linearly separable by class through the Class-wise Separability Discriminant (Sec. 4, Eq. 4-6):

    min_theta  min_{||delta_i||_inf <= eps}  w_ssl * L_SimCLR(theta; aug(x + delta)) + w_csd * CSD(delta, y),
    CSD(delta, y) = mean_{k != l} (r_k + r_l) / ||c_k - c_l||,   c_k = mean_{y_i = k} delta_i,
                    r_k = mean_{y_i = k} ||delta_i - c_k||        (a Davies-Bouldin ratio).

The loop follows the authors' `ssl_perturbation.py::sample_wise_perturbation` (github:renjie3/TUE):
each epoch walks a seeded SHUFFLED order of the protected samples; after every `train_steps`
SimCLR steps on noisy views it sweeps the noise of every protected sample, in another shuffled
order, with `steps` sign-descent steps of the reference's absolute size 0.8/255 (--step_size 0.8 on
the 0-255 scale, whatever the eps; `step_size`, in /255; `step_fraction`, when set, makes the step that
fraction of eps instead, the earlier rule: 0.1 * eps equals 0.8/255 only at eps 8), each
batch's CSD computed over the classes in that batch. Shuffling matters: on class-sorted data
contiguous batches hold one class and CSD is 0. Defaults are the SimCLR command of the authors'
demo.sh: 40 epochs, train_step 20, num_steps 20, step_size 0.8, batch 512, random start,
ssl_weight 0 and linear_noise_csd_weight 0.1. With ssl_weight 0 (their SimCLR and SimSiam commands)
the noise sees only the CSD term and the encoder does not influence it, so it is not trained at all
here; set `ssl_weight` > 0 (their MoCo command uses 1 and 1) for the joint objective. Encoder, views
(crop, flip, colour jitter, greyscale) and optimiser: :mod:`poison_core.simclr`. As in
`simclr_utils.get_linear_noise_csd_loss`, the radii r_k enter CSD as constants (gradient through the
centres only); `csd(..., radius_grad=True)` differentiates them too. Labels are unchanged.

Cross-dataset transfer with another class count (the paper's interpolation strategy, Sec. 5.3) is
:func:`interpolate_to_classes`: target class c < K reuses source class c's noise pool, and every
further class draws convex mixtures lambda * delta_a + (1 - lambda) * delta_b of two source classes
(one pair and one lambda per target class), so the new classes stay separable. This is our reading
of the strategy; the paper gives no equation for it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pydantic import Field

from poison_core.attacks._pgd import choose_positions, sign_descent, torch_generator
from poison_core.perturbation import project_linf, quantize, to_unit
from poison_core.simclr import (SimCLREncoderConfig, build_encoder, shuffled_batches, simclr_loss, simclr_optimizer,
                                simclr_step)
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError
from poison_core.training import to_tensor

log = logging.getLogger(__name__)


class TUEParams(AttackParams, SimCLREncoderConfig):
    """Defaults: demo.sh's SimCLR command of Ren et al.'s code (see the module docstring). The encoder's
    settings (model, width, projection_dim, temperature, lr, weight_decay, views) are SimCLR's, from
    :class:`poison_core.config.SimCLRConfig`, whose defaults are this code's own (feature_dim 128,
    temperature 0.5, Adam lr 1e-3), unchanged; as in the reference, one `epochs` (40) and one `batch_size`
    (512) drive both the encoder's steps and the noise's sweeps."""

    ssl_weight: float = Field(0.0, ge=0, le=1000)
    csd_weight: float = Field(0.1, ge=0, le=1000)
    train_steps: int = Field(20, ge=1, le=100_000)
    steps: int = Field(20, ge=1, le=10_000)
    step_size: float = Field(0.8, gt=0, le=255)
    step_fraction: float | None = Field(None, gt=0, le=1)
    random_start: bool = True


def csd(delta: torch.Tensor, labels: torch.Tensor, *, radius_grad: bool = False) -> torch.Tensor:
    """Class-wise Separability Discriminant of perturbations (Ren et al., Eq. 5): low = separable.
    0 when the batch holds fewer than two classes. Radii are constants unless `radius_grad`."""
    flat = delta.reshape(len(delta), -1)
    classes = torch.unique(labels)
    if len(classes) < 2:
        return flat.sum() * 0.0
    centres = torch.stack([flat[labels == k].mean(0) for k in classes])
    radii = torch.stack([(flat[labels == k] - centres[i]).norm(dim=1).mean() for i, k in enumerate(classes)])
    if not radius_grad:
        radii = radii.detach()
    dist = torch.cdist(centres, centres)
    off = ~torch.eye(len(classes), dtype=torch.bool, device=delta.device)
    return ((radii[:, None] + radii[None, :] + 1e-5) / (dist + 1e-5))[off].mean()


def interpolate_to_classes(deltas: np.ndarray, labels: np.ndarray, target_labels: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Perturbations for a dataset with other labels (and class count) from class-separable ones.

    Target class c < K (source classes) draws from source class c's perturbations; a class c >= K
    draws from mixtures lam * delta_a + (1 - lam) * delta_b of two distinct source classes (a, b, lam
    fixed per target class; distinct pairs while there are enough). Returns one perturbation per
    target label, with the dtype of `deltas`.
    """
    source = np.unique(labels)
    if len(source) < 2:
        raise ConfigError("labels: interpolation needs perturbations of at least two source classes")
    pairs = [(a, b) for i, a in enumerate(source) for b in source[i + 1:]]
    order = rng.permutation(len(pairs))
    out = np.empty((len(target_labels), *deltas.shape[1:]), dtype=np.float64)
    for c in np.unique(target_labels):
        rows = np.flatnonzero(target_labels == c)
        if c < len(source):
            out[rows] = deltas[rng.choice(np.flatnonzero(labels == source[c]), size=len(rows))]
            continue
        a, b = pairs[order[(c - len(source)) % len(pairs)]]
        lam = rng.uniform(0.25, 0.75)
        pick_a = rng.choice(np.flatnonzero(labels == a), size=len(rows))
        pick_b = rng.choice(np.flatnonzero(labels == b), size=len(rows))
        out[rows] = lam * deltas[pick_a] + (1 - lam) * deltas[pick_b]
    if np.issubdtype(deltas.dtype, np.integer):
        return np.rint(out).astype(deltas.dtype)
    return out.astype(deltas.dtype)


def noise_step(params: "TUEParams", radius: float) -> float:
    """The sign-descent step on [0, 1]: step_fraction * eps when set, else step_size / 255 (the reference's
    absolute 0.8/255, ssl_perturbation.py --step_size)."""
    return params.step_fraction * radius if params.step_fraction is not None else params.step_size / 255.0


@register_attack
class TransferableUnlearnable(Attack):
    """TUE: SimCLR min-min noise plus the class-wise separability (CSD) term."""

    name = "tue"
    paper = "Ren et al., Transferable Unlearnable Examples, ICLR 2023 (Eq. 4-6)"
    summary = "clean-label availability: contrastive min-min noise made linearly separable by class"
    Params = TUEParams
    smoke = {"width": 4, "epochs": 1, "train_steps": 2, "steps": 2, "batch_size": 64, "ssl_weight": 1.0}
    label_policy = "clean"
    perturbation_only = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, device = self.params, ctx.train, ctx.device
        pos = choose_positions(len(train), n_poison, rng)
        images, radius = train.images[pos], to_unit(ctx.threat.epsilon)
        labels = torch.from_numpy(train.labels[pos]).to(device)
        encoder, optimizer = None, None
        if p.ssl_weight > 0:  # with ssl_weight 0 the encoder cannot influence the noise (see the docstring)
            encoder = build_encoder(p.model, p.width, p.projection_dim, train.image_shape, train.num_classes,
                                    rng, device)
            optimizer = simclr_optimizer(encoder, p)
        gen = torch_generator(rng, device)
        height, width, channels = train.image_shape
        noise = torch.zeros((len(pos), channels, height, width), device=device)
        if p.random_start:
            noise = (torch.rand(noise.shape, generator=gen, device=device) * 2 - 1) * radius
        last_csd = 0.0
        for epoch in range(p.epochs):
            train_batches = shuffled_batches(len(pos), p.batch_size, gen)
            for start in range(0, len(train_batches), p.train_steps):
                if encoder is not None:
                    encoder.requires_grad_(True)
                    for batch in train_batches[start:start + p.train_steps]:
                        x = (to_tensor(images[batch], device) + noise[batch]).clamp(0.0, 1.0)
                        simclr_step(encoder, optimizer, x, gen, p)
                    encoder.eval()
                    encoder.requires_grad_(False)
                last_csd = self._sweep(encoder, images, labels, noise, radius, gen, device)
            log.info("tue epoch %d/%d: mean batch CSD %.4f", epoch + 1, p.epochs, last_csd)
        out = quantize(images, noise, ctx.threat.epsilon)
        return Crafted(positions=pos, images=out, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "epochs": p.epochs, "final_batch_csd": round(last_csd, 6)})

    def _sweep(self, encoder: torch.nn.Module | None, images: np.ndarray, labels: torch.Tensor, noise: torch.Tensor,
               radius: float, gen: torch.Generator, device: torch.device) -> float:
        """One pass of `steps` sign-descent steps over the noise of every protected sample, in a shuffled
        order (updates `noise` in place); returns the mean CSD of the updated batches."""
        p, values = self.params, []
        for batch in shuffled_batches(len(images), p.batch_size, gen):
            idx = torch.from_numpy(batch).to(device)
            x, y = to_tensor(images[batch], device), labels[idx]

            def objective(delta: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = p.csd_weight * csd(delta, y)
                if encoder is not None:
                    loss = loss + p.ssl_weight * simclr_loss(encoder, (x + delta).clamp(0.0, 1.0), gen, p)
                return loss

            noise[idx] = sign_descent(noise[idx], objective, steps=p.steps, step_size=noise_step(p, radius),
                                      project=lambda d, x=x: project_linf(d, radius, x))
            values.append(float(csd(noise[idx], y)))
        return float(np.mean(values))
