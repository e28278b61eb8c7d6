"""UEraser (Qin, Gao, Zhao, Ye & Xu, 'Learning the Unlearnable: Adversarial Augmentations Suppress
Unlearnable Example Attacks', arXiv 2303.15127 / ICCV-W AROW 2023).

Unlearnable examples plant a shortcut that strong augmentation breaks. UEraser trains on
augmentations and, adversarially, on the *worst* of K draws of each sample (the paper's Eq. 3):

    min_theta  E_{(x, y)}  max_{k = 1..K}  L(f_theta(a_k(x)), y),   a_k ~ A i.i.d.

The policy A follows the reference (``lafeat/ueraser``, ``ueraser.py``): plasma-fractal brightness
(roughness U(0.3, 0.7), intensity U(0.5, 1), p 0.5) and contrast (p 0.5), a channel shuffle (p 0.5,
nothing to shuffle on 1-channel data) and TrivialAugment (Mueller & Hutter, ICCV 2021: one op per image
drawn uniformly from kornia's default list, magnitude uniform in its range: auto-contrast, equalize,
rotate +-30 deg, posterize to 4-8 bits, solarize, contrast / brightness / sharpness factors 0.1-1.9,
shear +-0.3, translate +-10 %), optionally followed by random erasing (Zhong et al., AAAI 2020; not in
the reference, off by default). Reference training ('em' mode, the UEraser-Max of the paper): K = 5
``repeats`` every epoch; its README's schedule uses the repeats for the first 60 of 200 epochs
(``adversarial_fraction`` 0.3) and single draws (UEraser-Lite) after. As in the reference, the K
copies of a batch go through the model as one tiled batch in train mode, and the loss is the batch
mean of each sample's maximum over its copies, so the gradient flows through the max-loss copy only.

Every random number is drawn from the torch.Generator the trainer passes to ``TrainHooks.augment``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, register_defense,
                                       train_victim)
from poison_core.training import LossContext, TrainHooks


class UEraserParams(DefenseParams):
    """repeats: K augmented copies per sample, trained on the max-loss one (paper and reference: 5; 1 is
    UEraser-Lite); adversarial_fraction: the fraction of the epochs (from the start) that use K copies,
    single draws afterwards (1.0: UEraser-Max, the reference's 'em' mode; its README: 60/200 = 0.3);
    erasing: probability of a final random erasing of each image (0: the reference policy)."""

    repeats: int = Field(5, ge=1, le=32)
    adversarial_fraction: float = Field(1.0, ge=0, le=1)
    erasing: float = Field(0.0, ge=0, le=1)


def plasma(n: int, height: int, width: int, roughness: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Plasma fractals (N, 1, H, W) in [0, 1]: midpoint-displacement noise approximated by octaves of
    bilinearly upsampled uniform noise on 2^l + 1 grids, octave l weighted roughness^l (Fournier, Fussell &
    Carpenter 1982; the diamond-square maps of kornia's RandomPlasma*), min-max normalised per image."""
    levels = max(1, math.ceil(math.log2(max(height, width))))
    total = torch.zeros(n, 1, height, width, device=gen.device)
    for level in range(levels + 1):
        side = 2 ** level + 1
        grid = torch.rand(n, 1, side, side, generator=gen, device=gen.device) * 2 - 1
        up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)
        total = total + roughness.view(-1, 1, 1, 1) ** level * up
    low = total.amin(dim=(2, 3), keepdim=True)
    high = total.amax(dim=(2, 3), keepdim=True)
    return (total - low) / (high - low).clamp_min(1e-12)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=gen.device) < p).view(-1, 1, 1, 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


def plasma_brightness(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """x + intensity * (2 * plasma - 1), intensity ~ U(0.5, 1), roughness ~ U(0.3, 0.7), with probability p."""
    n, _, height, width = x.shape
    shift = (2 * plasma(n, height, width, _uniform(n, 0.3, 0.7, gen), gen) - 1) * _uniform(n, 0.5, 1.0, gen).view(
        -1, 1, 1, 1)
    return torch.where(_coin(n, p, gen), (x + shift).clamp(0, 1), x)


def plasma_contrast(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """(x - 0.5) * 4 * plasma + 0.5 (a per-pixel contrast map in [0, 4]), roughness ~ U(0.3, 0.7), prob. p."""
    n, _, height, width = x.shape
    gain = 4 * plasma(n, height, width, _uniform(n, 0.3, 0.7, gen), gen)
    return torch.where(_coin(n, p, gen), ((x - 0.5) * gain + 0.5).clamp(0, 1), x)


def channel_shuffle(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """A random permutation of each image's channels with probability p (the identity when C = 1)."""
    n, channels = x.shape[:2]
    if channels == 1:
        return x
    perms = torch.argsort(torch.rand(n, channels, generator=gen, device=gen.device), dim=1)
    shuffled = torch.gather(x, 1, perms.view(n, channels, 1, 1).expand_as(x))
    return torch.where(_coin(n, p, gen), shuffled, x)


TA_OPS = ("auto_contrast", "equalize", "rotate", "posterize", "solarize", "contrast", "brightness", "sharpness",
          "shear_x", "shear_y", "translate_x", "translate_y")
GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma (ITU-R 601-2) of an RGB batch; the batch itself when it has one channel."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: other + factor * (x - other), clipped to [0, 1]."""
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each image and channel on 256 levels (the rank CDF mapped to [0, 1])."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=x.dtype))
    cdf = hist.cumsum(1)
    low = cdf.gather(1, levels.min(1, keepdim=True).values)
    lut = ((cdf - low) / (h * w - low).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, levels).view(n, c, h, w)


def _photometric(op: str, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The non-geometric TrivialAugment op `op` with magnitudes u in [0, 1] mapped to its range."""
    factor = 0.1 + 1.8 * u
    if op == "auto_contrast":
        low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return ((x - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    if op == "equalize":
        return _equalize(x)
    if op == "posterize":
        step = 2.0 ** (4 * u).round().view(-1, 1, 1, 1)  # drop 0-4 of the 8 bits
        return torch.floor(x * 255 / step) * step / 255
    if op == "solarize":
        return torch.where(x >= u.view(-1, 1, 1, 1), 1 - x, x)
    if op == "contrast":
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True).expand_as(x), factor)
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    smooth = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # sharpness
    return _blend(x, smooth, factor)


def _affine(op: str, u: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) normalised affine matrices of the geometric op `op`, signed magnitudes from u in [0, 1]."""
    s = 2 * u - 1
    theta = torch.zeros(len(u), 2, 3, device=u.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if op == "rotate":
        angle = s * torch.pi / 6
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "shear_x":
        theta[:, 0, 1] = 0.3 * s
    elif op == "shear_y":
        theta[:, 1, 0] = 0.3 * s
    elif op == "translate_x":
        theta[:, 0, 2] = 0.2 * s  # 10 % of the width (the grid spans 2)
    else:
        theta[:, 1, 2] = 0.2 * s
    return theta


def trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """TrivialAugment (Mueller & Hutter 2021): one op per image, uniform over TA_OPS, uniform magnitude."""
    n = len(x)
    choice = torch.randint(0, len(TA_OPS), (n,), generator=gen, device=gen.device)
    u = torch.rand(n, generator=gen, device=gen.device)
    out = x.clone()
    for k, op in enumerate(TA_OPS):
        rows = torch.nonzero(choice == k).flatten()
        if len(rows) == 0:
            continue
        if op in GEOMETRIC:
            grid = F.affine_grid(_affine(op, u[rows]), list(x[rows].shape), align_corners=False)
            out[rows] = F.grid_sample(x[rows], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        else:
            out[rows] = _photometric(op, x[rows], u[rows])
    return out


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """With probability p, zero a rectangle of area U(0.02, 0.33) of the image and aspect ratio
    log-uniform in (0.3, 3.3) at a uniform position (Zhong et al., AAAI 2020, Alg. 1; torchvision's ranges)."""
    n, _, h, w = x.shape
    area = _uniform(n, 0.02, 0.33, gen) * h * w
    ratio = torch.exp(_uniform(n, -1.204, 1.194, gen))
    eh = (area * ratio).sqrt().round().clamp(1, h)
    ew = (area / ratio).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=gen, device=gen.device) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=gen, device=gen.device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1))).unsqueeze(1)
    return torch.where(inside & _coin(n, p, gen), torch.zeros_like(x), x)


def ueraser_policy(x: torch.Tensor, gen: torch.Generator, erasing: float = 0.0) -> torch.Tensor:
    """One draw of the UEraser augmentation policy on each image of the NCHW batch in [0, 1]."""
    x = plasma_brightness(x, gen)
    x = plasma_contrast(x, gen)
    x = channel_shuffle(x, gen)
    x = trivial_augment(x, gen)
    if erasing > 0:
        x = random_erasing(x, gen, erasing)
    return x


def max_over_repeats(per_sample: torch.Tensor, repeats: int) -> torch.Tensor:
    """mean_i max_k L_{k, i} of per-sample losses laid out as `repeats` stacked copies of the batch
    (row k * B + i is copy k of sample i): the adversarial-augmentation objective (Qin et al., Eq. 3)."""
    return per_sample.view(repeats, -1).max(dim=0).values.mean()


@register_defense
class UEraser(Defense):
    """Train on the max-loss of K strong random augmentations of each sample (Qin et al. 2023, Eq. 3)."""

    name = "ueraser"
    paper = "Qin et al., 2023, Learning the unlearnable: adversarial augmentations suppress unlearnable examples"
    summary = "training: strong random augmentations, loss = max over K=5 augmented copies per sample"
    Params = UEraserParams

    def repeats_at(self, epoch: int, epochs: int) -> int:
        """K while epoch < adversarial_fraction * epochs, then 1."""
        return self.params.repeats if epoch < self.params.adversarial_fraction * epochs else 1

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        epochs = ctx.victim.train.epochs
        state = {"epoch": 0}

        def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            k = self.repeats_at(state["epoch"], epochs)
            tiled = x.repeat(k, *([1] * (x.ndim - 1)))
            return ueraser_policy(tiled, gen, self.params.erasing), y.repeat(k)

        def loss(per_sample: torch.Tensor, lctx: LossContext) -> torch.Tensor:
            return max_over_repeats(per_sample, self.repeats_at(lctx.epoch, epochs))

        def on_epoch_end(epoch: int, _model, record: dict) -> None:
            k = self.repeats_at(epoch, epochs)
            record["train_acc"] = record["train_acc"] / k  # the trainer counted all k copies
            record["repeats"] = k
            state["epoch"] = epoch + 1

        result = train_victim(ctx, ctx.train, TrainHooks(augment=augment, loss=loss, on_epoch_end=on_epoch_end))
        result.info.update({"repeats": float(self.params.repeats),
                            "adversarial_epochs": float(sum(self.repeats_at(e, epochs) > 1 for e in range(epochs)))})
        return result
