"""SimCLR pieces shared by the attacks that need a label-free encoder (TUE, Unlearnable Clusters) and the
`simclr-linear` victim protocol (poison_core.protocols).

SimCLR (Chen et al., 'A Simple Framework for Contrastive Learning of Visual Representations',
ICML 2020): two random views of every image go through an encoder f and a projection head g, and
the NT-Xent loss (their Eq. 1) pulls the two views of an image together against the other 2N - 2
views of the batch. No label is used anywhere in this module.

Settings (head size, temperature, recipe, views) are :class:`poison_core.config.SimCLRConfig`, one config
for every user, with the defaults of Ren et al.'s TUE code (github:renjie3/TUE) and its views, the
SimCLR paper's CIFAR-10 augmentation: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), horizontal flip
p = 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) applied with p = 0.8 and RandomGrayscale p = 0.2. They are
written here as differentiable tensor ops so that a perturbation under optimisation receives gradients
through them: crop + flip is one bilinear affine warp per image; the jitter applies brightness, contrast,
saturation and hue in that fixed order (torchvision shuffles the order); hue is a rotation of the chroma
plane in YIQ space (an approximation of torchvision's HSV hue shift). On one-channel images saturation,
hue and greyscale are identities, so only brightness and contrast are applied. The projection head is
the reference's `simclr_model.Model.g`: Linear (no bias) - BatchNorm - ReLU - Linear, then L2
normalisation; the optimiser is the reference's Adam (lr and weight decay from the config).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.config import ModelConfig, SimCLRConfig, SimCLRViews
from poison_core.models import ModelName, build_model
from poison_core.training import to_tensor

log = logging.getLogger(__name__)


class SimCLREncoderConfig(SimCLRConfig):
    """SimCLR's settings plus the backbone, for the attacks that build their own label-free encoder (TUE,
    Unlearnable Clusters): an architecture from the model registry, at `width`. The SimCLR defaults are
    :class:`poison_core.config.SimCLRConfig`'s, unchanged."""

    model: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)

    def backbone(self) -> ModelConfig:
        return ModelConfig(name=self.model, width=self.width)


class ContrastiveEncoder(nn.Module):
    """backbone.features -> Linear (no bias) -> BatchNorm -> ReLU -> Linear, L2-normalised."""

    def __init__(self, backbone: nn.Module, projection_dim: int) -> None:
        super().__init__()
        dim = backbone.head.in_features
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(),
                                        nn.Linear(dim, projection_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.backbone.features(x)), dim=1)


def build_encoder(model: str, width: int | None, projection_dim: int, image_shape: tuple[int, int, int],
                  num_classes: int, rng: np.random.Generator, device: torch.device) -> ContrastiveEncoder:
    """A freshly initialised encoder, seeded from `rng` (the classifier head of the backbone is unused)."""
    backbone = build_model(ModelConfig(name=model, width=width), image_shape, num_classes,
                           seed=int(rng.integers(2**31)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        return ContrastiveEncoder(backbone, projection_dim).to(device)


def simclr_optimizer(encoder: nn.Module, cfg: SimCLRConfig) -> torch.optim.Optimizer:
    """The reference's optimiser: Adam at the config's lr and weight decay."""
    return torch.optim.Adam(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """A seeded random order of 0..n-1 cut into batches (a trailing batch of one joins the previous one,
    which BatchNorm needs); the shuffled loader of the reference (`shuffle=True`)."""
    order = torch.randperm(n, generator=gen, device=gen.device).cpu().numpy()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def resized_crop_flip(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip(flip_p) as one bilinear affine warp per image."""
    n, device = len(x), x.device
    rand = torch.rand((n, 5), generator=gen, device=device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1]
    aspect = torch.exp(log_r)
    w_frac = torch.sqrt(area * aspect).clamp(max=1.0)
    h_frac = torch.sqrt(area / aspect).clamp(max=1.0)
    flip = torch.where(rand[:, 2] < flip_p, -1.0, 1.0)
    theta = torch.zeros((n, 2, 3), device=device)
    theta[:, 0, 0], theta[:, 1, 1] = w_frac * flip, h_frac
    theta[:, 0, 2] = (rand[:, 3] * 2 - 1) * (1 - w_frac)
    theta[:, 1, 2] = (rand[:, 4] * 2 - 1) * (1 - h_frac)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (N, 1, H, W) of an RGB batch, as torchvision's rgb_to_grayscale."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the (I, Q) chroma plane of YIQ by 2 pi * turns per image."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    i = 0.596 * r - 0.274 * g - 0.322 * b
    q = 0.211 * r - 0.523 * g + 0.312 * b
    cos, sin = torch.cos(2 * math.pi * turns).view(-1, 1, 1), torch.sin(2 * math.pi * turns).view(-1, 1, 1)
    i, q = cos * i - sin * q, sin * i + cos * q
    return torch.stack([y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q], dim=1)


def color_jitter(x: torch.Tensor, gen: torch.Generator, *, p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p), differentiably; each
    factor is uniform in [1 - s, 1 + s] (hue in [-hue, hue] turns), per image."""
    n, rgb = len(x), x.shape[1] == 3
    rand = torch.rand((n, 5), generator=gen, device=x.device)
    apply = (rand[:, 0] < p).view(n, 1, 1, 1)
    factor = lambda u, s: (1 - s + 2 * s * u).view(n, 1, 1, 1)  # noqa: E731
    out = (x * factor(rand[:, 1], brightness)).clamp(0.0, 1.0)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    c = factor(rand[:, 2], contrast)
    out = (c * out + (1 - c) * mean).clamp(0.0, 1.0)
    if rgb:
        s = factor(rand[:, 3], saturation)
        out = (s * out + (1 - s) * _gray(out)).clamp(0.0, 1.0)
        out = _rotate_hue(out, (2 * rand[:, 4] - 1) * hue).clamp(0.0, 1.0)
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """RandomGrayscale(p): an RGB image becomes its luma on all three channels (identity on grey data)."""
    if x.shape[1] != 3:
        return x
    pick = (torch.rand(len(x), generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(pick, _gray(x).expand_as(x), x)


def simclr_views(x: torch.Tensor, gen: torch.Generator, views: SimCLRViews = SimCLRViews()) -> torch.Tensor:
    """One random SimCLR view of every image of the NCHW batch on [0, 1] (see the module docstring)."""
    brightness, contrast, saturation, hue = views.jitter_factors()
    out = resized_crop_flip(x, gen, scale=(views.crop_min_scale, 1.0), flip_p=views.flip)
    out = color_jitter(out, gen, p=views.jitter, brightness=brightness, contrast=contrast, saturation=saturation,
                       hue=hue)
    return random_grayscale(out, gen, p=views.grayscale)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of L2-normalised projections (Chen et al. 2020, Eq. 1)."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def simclr_loss(encoder: nn.Module, x: torch.Tensor, gen: torch.Generator, cfg: SimCLRConfig) -> torch.Tensor:
    """NT-Xent of two independent views of the batch `x`."""
    return nt_xent(encoder(simclr_views(x, gen, cfg.views)), encoder(simclr_views(x, gen, cfg.views)), cfg.temperature)


def simclr_step(encoder: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, gen: torch.Generator,
                cfg: SimCLRConfig) -> float:
    """One train-mode optimiser step of the encoder on the batch `x`; returns the loss."""
    encoder.train()
    loss = simclr_loss(encoder, x, gen, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def fit_simclr_encoder(images: np.ndarray, cfg: SimCLRConfig, backbone: ModelConfig, *, num_classes: int,
                       rng: np.random.Generator, gen: torch.Generator, device: torch.device) -> ContrastiveEncoder:
    """Train a SimCLR encoder with a `backbone` body on uint8 NHWC `images` (no labels) for `cfg.epochs`
    shuffled epochs; returned in eval mode."""
    encoder = build_encoder(backbone.name, backbone.width, cfg.projection_dim, images.shape[1:], num_classes, rng,
                            device)
    optimizer = simclr_optimizer(encoder, cfg)
    for epoch in range(cfg.epochs):
        losses = [simclr_step(encoder, optimizer, to_tensor(images[b], device), gen, cfg)
                  for b in shuffled_batches(len(images), cfg.batch_size, gen)]
        log.info("simclr encoder epoch %d/%d: mean loss %.4f", epoch + 1, cfg.epochs, float(np.mean(losses)))
    return encoder.eval()
