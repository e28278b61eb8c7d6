"""SimCLR pieces shared by the attacks that need a label-free encoder (TUE, Unlearnable Clusters) and the
`simclr-linear` victim protocol (poison_core.protocols).

SimCLR (Chen et al., 'A Simple Framework for Contrastive Learning of Visual Representations',
ICML 2020): two random views of every image go through an encoder f and a projection head g, and
the NT-Xent loss (their Eq. 1) pulls the two views of an image together against the other 2N - 2
views of the batch. No label is used anywhere in this module.

Views follow the augmentation of Ren et al.'s TUE code (github:renjie3/TUE, utils.py
`train_diff_transform` / `train_transform_no_totensor`, the SimCLR recipe): RandomResizedCrop
(scale 0.08-1, ratio 3/4-4/3), horizontal flip p = 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) applied
with p = 0.8 and RandomGrayscale p = 0.2. They are written here as differentiable tensor ops so that
a perturbation under optimisation receives gradients through them: crop + flip is one bilinear affine
warp per image; the jitter applies brightness, contrast, saturation and hue in that fixed order
(torchvision shuffles the order); hue is a rotation of the chroma plane in YIQ space (an
approximation of torchvision's HSV hue shift). On one-channel images saturation, hue and greyscale
are identities, so only brightness and contrast are applied. The projection head is the reference's
`simclr_model.Model.g`: Linear (no bias) - BatchNorm - ReLU - Linear, then L2 normalisation; the
optimiser is the reference's Adam(lr 1e-3, weight decay 1e-6).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.config import ModelConfig, StrictModel
from poison_core.models import ModelName, build_model
from poison_core.training import to_tensor

log = logging.getLogger(__name__)


class SimCLRParams(StrictModel):
    """A label-free SimCLR encoder: backbone from the model registry, head and recipe of TUE's code
    (feature_dim 128, temperature 0.5, batch 512, Adam lr 1e-3; 40 epochs as in its SimCLR demo)."""

    model: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)
    projection_dim: int = Field(128, ge=2, le=4096)
    temperature: float = Field(0.5, gt=0, le=10)
    epochs: int = Field(40, ge=1, le=10_000)
    batch_size: int = Field(512, ge=4, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10)


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


def simclr_optimizer(encoder: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(encoder.parameters(), lr=lr, weight_decay=1e-6)


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """A seeded random order of 0..n-1 cut into batches (a trailing batch of one joins the previous one,
    which BatchNorm needs); the shuffled loader of the reference (`shuffle=True`)."""
    order = torch.randperm(n, generator=gen, device=gen.device).cpu().numpy()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def resized_crop_flip(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip(0.5) as one bilinear affine warp per image."""
    n, device = len(x), x.device
    rand = torch.rand((n, 5), generator=gen, device=device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1]
    aspect = torch.exp(log_r)
    w_frac = torch.sqrt(area * aspect).clamp(max=1.0)
    h_frac = torch.sqrt(area / aspect).clamp(max=1.0)
    flip = torch.where(rand[:, 2] < 0.5, -1.0, 1.0)
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


def simclr_views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random SimCLR view of every image of the NCHW batch on [0, 1] (see the module docstring)."""
    return random_grayscale(color_jitter(resized_crop_flip(x, gen), gen), gen)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of L2-normalised projections (Chen et al. 2020, Eq. 1)."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def simclr_loss(encoder: nn.Module, x: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    """NT-Xent of two independent views of the batch `x`."""
    return nt_xent(encoder(simclr_views(x, gen)), encoder(simclr_views(x, gen)), temperature)


def simclr_step(encoder: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, gen: torch.Generator,
                temperature: float) -> float:
    """One train-mode optimiser step of the encoder on the batch `x`; returns the loss."""
    encoder.train()
    loss = simclr_loss(encoder, x, gen, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def fit_simclr_encoder(images: np.ndarray, params: SimCLRParams, *, num_classes: int, rng: np.random.Generator,
                       gen: torch.Generator, device: torch.device) -> ContrastiveEncoder:
    """Train a SimCLR encoder on uint8 NHWC `images` (no labels) for `params.epochs` shuffled epochs;
    returned in eval mode."""
    encoder = build_encoder(params.model, params.width, params.projection_dim, images.shape[1:], num_classes,
                            rng, device)
    optimizer = simclr_optimizer(encoder, params.lr)
    for epoch in range(params.epochs):
        losses = [simclr_step(encoder, optimizer, to_tensor(images[b], device), gen, params.temperature)
                  for b in shuffled_batches(len(images), params.batch_size, gen)]
        log.info("simclr encoder epoch %d/%d: mean loss %.4f", epoch + 1, params.epochs, float(np.mean(losses)))
    return encoder.eval()
