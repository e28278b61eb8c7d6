"""The `warp` trigger kind: Nguyen & Tran, 'WaNet - Imperceptible Warping-based Backdoor Attack',
ICLR 2021 (the warping field and the noise mode), normalised as in their release
(VinAIResearch/Warping-based_Backdoor_Attack-release, train.py).

The field, for images of H rows and W columns:

    P = psi(U[-1, 1](2, k, k)),  psi(p) = p / mean(|p|)        control points, mean |P| = 1
    M = upsample_bicubic(P, (H, W))                            (align_corners)
    G = clip((I + s * M / size) * grid_rescale, -1, 1)         I: identity grid in [-1, 1]
    x' = grid_sample(x, G)                                     bilinear, align_corners

with `size` = W for the horizontal and H for the vertical displacement (the release divides both
by its square images' height). The noise mode adds, per image, uniform noise of one grid step,
G_n = clip(G + U[-1, 1](H, W, 2) / size, -1, 1) (:func:`apply_noise_warp`).

The control points come from `grid_seed` (numpy's default_rng) and the field is built in float64
for the image size the spec records (`size`: [H, W]); images of another size are refused. The
warped image is put on the uint8 grid and each pixel's change is clipped to the spec's `epsilon`.

Registered on import of poison_core.triggers (every kind is).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.triggers.base import TRIGGERS

CHUNK = 1024


def warp_field(k: int, s: float, grid_seed: int, height: int, width: int, grid_rescale: float = 1.0) -> torch.Tensor:
    """The (1, H, W, 2) float64 sampling grid G of the backdoor warp (x, y in grid_sample's order)."""
    if k < 2:
        raise ConfigError(f"trigger.k: {k} is outside 2..64 (a k x k control grid)")
    ctrl = np.random.default_rng(int(grid_seed)).uniform(-1.0, 1.0, size=(1, 2, k, k))
    ctrl /= np.mean(np.abs(ctrl))
    field = F.interpolate(torch.from_numpy(ctrl), size=(height, width), mode="bicubic", align_corners=True)
    field = field.permute(0, 2, 3, 1)
    ys, xs = torch.linspace(-1, 1, height, dtype=torch.float64), torch.linspace(-1, 1, width, dtype=torch.float64)
    identity = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
    scale = torch.tensor([width, height], dtype=torch.float64)
    return torch.clamp((identity + float(s) * field / scale) * float(grid_rescale), -1.0, 1.0)


def spec_field(spec: dict[str, Any], images: np.ndarray) -> torch.Tensor:
    """The spec's field, after checking that `images` have the size it was made for."""
    height, width = (int(v) for v in spec["size"])
    if tuple(images.shape[1:3]) != (height, width):
        raise ConfigError(f"trigger.size: the warp was made for {height}x{width} images, "
                          f"got {images.shape[1]}x{images.shape[2]}")
    return warp_field(int(spec["k"]), float(spec["s"]), int(spec["grid_seed"]), height, width,
                      float(spec.get("grid_rescale", 1.0)))


def warp_images(images: np.ndarray, grid: torch.Tensor, epsilon: int) -> np.ndarray:
    """grid_sample uint8 NHWC `images` with `grid` (1 or N, H, W, 2), rounded, each pixel moved by <= epsilon."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK]
        x = torch.from_numpy(chunk.astype(np.float64)).permute(0, 3, 1, 2)
        g = grid[start:start + CHUNK] if len(grid) > 1 else grid.expand(len(chunk), -1, -1, -1)
        warped = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        warped = np.clip(np.rint(warped.permute(0, 2, 3, 1).numpy()), 0, 255)
        out[start:start + CHUNK] = towards(chunk, warped, epsilon)
    return out


@TRIGGERS.register("warp", paper="Nguyen & Tran, WaNet, ICLR 2021",
                   summary="smooth random warping field from a k x k grid, applied with grid_sample")
def apply_warp(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Warp uint8 NHWC `images` with the spec's backdoor field, each pixel moved by <= epsilon."""
    return warp_images(images, spec_field(spec, images), int(spec.get("epsilon", 255)))


def apply_noise_warp(spec: dict[str, Any], images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """WaNet's noise mode: each image warped with the backdoor field plus its own uniform noise of
    one grid step (drawn from `rng`), so that a victim does not learn 'any warp means target'."""
    grid = spec_field(spec, images)
    height, width = grid.shape[1:3]
    noise = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(images), height, width, 2)))
    noisy = torch.clamp(grid + noise / torch.tensor([width, height], dtype=torch.float64), -1.0, 1.0)
    return warp_images(images, noisy, int(spec.get("epsilon", 255)))
