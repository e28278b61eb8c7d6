"""Transferable Unlearnable Examples: Ren et al., ICLR 2023 ('TUE').

Unlearnable noise that transfers across training settings (supervised and self-supervised) and
datasets. Like error-minimising noise it is a min-min problem, but the inner model is an
UNSUPERVISED contrastive encoder (SimCLR, Chen et al., ICML 2020), and the noise is also pushed to
be linearly separable by class through the Class-wise Separability Discriminant (Sec. 4, Eq. 4-6):

    min_theta  min_{||delta_i||_inf <= eps}  L_SimCLR(theta; aug(x + delta)) + lambda * CSD(delta, y),
    CSD(delta, y) = mean_{k != l} (r_k + r_l) / ||c_k - c_l||,   c_k = mean_{y_i = k} delta_i,
                    r_k = mean_{y_i = k} ||delta_i - c_k||        (a Davies-Bouldin ratio).

Here: a small encoder (the model registry's `model` backbone + a 2-layer projection head) is trained
from scratch inside (no surrogate needed); each round takes `train_steps` SimCLR steps on noisy
views, then `steps` sign-descent steps of the joint objective on the noise of every protected batch
(sample-wise noise, the paper's main setting; lambda = `csd_weight`). Views use differentiable
augmentations: random resized crop and horizontal flip (one affine warp) and brightness jitter;
the paper also uses colour jitter and greyscale, which are no-ops on one-channel data. The gradient
flows through both c_k and r_k of CSD (the authors' code detaches r_k). Labels are unchanged.

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
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks._pgd import choose_positions, project_linf, quantize, sign_descent, to_unit, torch_generator
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.config import ModelConfig, ModelName
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.training import batch_slices, to_tensor

logger = logging.getLogger(__name__)


class TUEParams(AttackParams):
    model: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)
    projection_dim: int = Field(64, ge=2, le=4096)
    temperature: float = Field(0.5, gt=0, le=10)
    csd_weight: float = Field(1.0, ge=0, le=1000)
    rounds: int = Field(10, ge=1, le=10_000)
    train_steps: int = Field(10, ge=1, le=100_000)
    steps: int = Field(5, ge=1, le=10_000)
    step_fraction: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(256, ge=4, le=65_536)
    lr: float = Field(0.05, gt=0, le=10)


class ContrastiveEncoder(nn.Module):
    """backbone.features -> Linear -> ReLU -> Linear, L2-normalised (SimCLR's projection head)."""

    def __init__(self, backbone: nn.Module, projection_dim: int) -> None:
        super().__init__()
        dim = backbone.head.in_features
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.backbone.features(x)), dim=1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Differentiable SimCLR-style views: resized crop (scale 0.6-1) + flip as one affine warp, then
    brightness x U(0.6, 1.4), clipped to [0, 1]."""
    n, device = len(x), x.device
    rand = torch.rand((n, 5), generator=gen, device=device)
    scale = 0.6 + 0.4 * rand[:, 0]
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0)
    shift = (rand[:, 2:4] * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros((n, 2, 3), device=device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return (warped * (0.6 + 0.8 * rand[:, 4]).view(n, 1, 1, 1)).clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of L2-normalised projections (Chen et al. 2020, Eq. 1)."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def csd(delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class-wise Separability Discriminant of perturbations (Ren et al., Eq. 5): low = separable."""
    flat = delta.reshape(len(delta), -1)
    classes = torch.unique(labels)
    if len(classes) < 2:
        return flat.sum() * 0.0
    centres = torch.stack([flat[labels == k].mean(0) for k in classes])
    radii = torch.stack([(flat[labels == k] - centres[i]).norm(dim=1).mean() for i, k in enumerate(classes)])
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


@register_attack
class TransferableUnlearnable(Attack):
    """TUE: SimCLR min-min noise plus the class-wise separability (CSD) term."""

    name = "tue"
    paper = "Ren et al., Transferable Unlearnable Examples, ICLR 2023 (Eq. 4-6)"
    summary = "clean-label availability: contrastive min-min noise made linearly separable by class"
    Params = TUEParams
    label_policy = "clean"

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, device = self.params, ctx.train, ctx.device
        pos = choose_positions(len(train), n_poison, rng)
        images, radius = train.images[pos], to_unit(ctx.threat.epsilon)
        labels = torch.from_numpy(train.labels[pos]).to(device)
        backbone = build_model(ModelConfig(name=p.model, width=p.width), train.image_shape, train.num_classes,
                               seed=int(rng.integers(2**31)))
        gen = torch_generator(rng, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            encoder = ContrastiveEncoder(backbone, p.projection_dim).to(device)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=p.lr, momentum=0.9, weight_decay=5e-4)
        height, width, channels = train.image_shape
        noise = (torch.rand((len(pos), channels, height, width), generator=gen, device=device) * 2 - 1) * radius
        batches = batch_slices(len(pos), p.batch_size)
        for round_ in range(p.rounds):
            encoder.train()
            for step in range(p.train_steps):
                batch = batches[(round_ * p.train_steps + step) % len(batches)]
                x = (to_tensor(images[batch], device) + noise[batch]).clamp(0.0, 1.0)
                loss = nt_xent(encoder(augment(x, gen)), encoder(augment(x, gen)), p.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            encoder.eval()
            encoder.requires_grad_(False)
            for batch in batches:
                x, y = to_tensor(images[batch], device), labels[batch]

                def objective(delta: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    noisy = (x + delta).clamp(0.0, 1.0)
                    ssl = nt_xent(encoder(augment(noisy, gen)), encoder(augment(noisy, gen)), p.temperature)
                    return ssl + p.csd_weight * csd(delta, y)

                noise[batch] = sign_descent(noise[batch], objective, steps=p.steps,
                                            step_size=p.step_fraction * radius,
                                            project=lambda d, x=x: project_linf(d, radius, x))
            encoder.requires_grad_(True)
            logger.info("tue round %d/%d: last SimCLR loss %.4f", round_ + 1, p.rounds, float(loss.detach()))
        out = quantize(images, noise, ctx.threat.epsilon)
        return Crafted(positions=pos, images=out, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "rounds": p.rounds})
