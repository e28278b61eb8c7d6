"""ReColorAdv, the colour part of MetaPoison's perturbation, as the reference runs it.

Laidlaw & Feizi, 'Functional Adversarial Attacks', NeurIPS 2019, Sec. 3 (ReColorAdv): one colour
function f per image, applied to every pixel alike, f(x) = x + s(x), where the shift s is given by its
values theta_g on a regular grid of points g over colour space and interpolated (trilinearly for three
channels) in between. The threat model bounds every grid shift, ||theta_g||_inf <= color_epsilon, and a
smoothness penalty lambda * R(theta) keeps neighbouring grid points moving together.

The flavour is MetaPoison's (github:wronnyhuang/metapoison, recolor.py ``recolor`` / ``smoothloss``,
meta.py ``clipop_colorperts``, parse.py ``-gridshape 10 10 10 -epscolor .04 -smoothcoef 1``):

* colour space: the YUV of ``tf.image.rgb_to_yuv`` divided by 255 (the reference's help text says LUV;
  its code converts to YUV), grid Y in [0, 1], U and V in [-0.5, 0.5]; 10 points per axis;
* parameters theta: the shift of each grid point, shape (N, g, g, g, 3), zero at the start;
* R(theta) = mean over all images, axes, neighbouring grid pairs and channels of
  ((theta_g - theta_h) * g_axis)^2 (the difference over the grid spacing, as the reference writes it);
* projection: theta clipped to [-color_epsilon, color_epsilon], then g + theta clipped into the grid's
  box, so that the shifted grid stays inside colour space.

Where we differ, and why: (1) outside the grid's box (saturated colours reach |V| = 0.615 > 0.5) the
reference's ``batch_interp_regular_nd_grid`` returns the box's edge value, so even theta = 0 moves those
colours; we extend the *shift* as a constant instead (s(x) = s(clamp(x))), so theta = 0 is the identity
everywhere and |f(x) - x| <= color_epsilon holds for every colour. (2) The inverse conversion is the exact
inverse of the forward matrix (tf's ``yuv_to_rgb`` kernel is rounded). (3) One-channel (grey) images use
the one-dimensional colour space Y = grey value, a grid of g points over [0, 1] and linear
interpolation: ReColorAdv restricted to grey. (4) The result is clamped to the pixel box [0, 1], since the
PoisonSet stores uint8 pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GRID_HIGH", "GRID_LOW", "MAX_POINTS", "RGB_TO_YUV", "check_shape", "grid_points", "project", "quantize_recolored",
           "recolor", "shifted_base", "shifted_pixels", "smoothness", "zero_params"]

RGB_TO_YUV = ((0.299, -0.14714119, 0.61497538),
              (0.587, -0.28886916, -0.51496512),
              (0.114, 0.43601035, -0.10001026))
"""tf.image.rgb_to_yuv's kernel: yuv = rgb @ RGB_TO_YUV (rgb as a row vector)."""
GRID_LOW = {1: (0.0,), 3: (0.0, -0.5, -0.5)}
GRID_HIGH = {1: (1.0,), 3: (1.0, 0.5, 0.5)}
MAX_POINTS = 32
"""The largest grid resolution accepted (per axis): 32^3 * 3 parameters per image."""


def check_shape(shape: Sequence[int], channels: int) -> tuple[int, ...]:
    """The grid (points per axis) of colour parameters of `shape` (N, *grid, C) for C-channel images;
    ValueError naming what is wrong unless C is 1 or 3, len(grid) == C and 2 <= every axis <= MAX_POINTS."""
    shape = tuple(int(s) for s in shape)
    if channels not in GRID_LOW:
        raise ValueError(f"colour parameters need 1- or 3-channel images, got {channels} channels")
    grid = shape[1:-1]
    if len(shape) != channels + 2 or shape[-1] != channels or not all(2 <= g <= MAX_POINTS for g in grid):
        raise ValueError(f"colour parameters of shape {shape} do not fit {channels}-channel images "
                         f"(expected (N, {', '.join(['g'] * channels)}, {channels}) with 2 <= g <= {MAX_POINTS})")
    return grid


def zero_params(n: int, channels: int, points: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The identity colour function for `n` images: zero shifts on a grid of `points` per axis."""
    check_shape((n, *([points] * channels), channels), channels)
    return torch.zeros((n, *([points] * channels), channels), dtype=dtype)


def grid_points(grid: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The grid's points g in colour space, shape (*grid, C): the identity function's values."""
    c = len(grid)
    axes = [torch.linspace(lo, hi, n, dtype=dtype, device=device) for lo, hi, n in zip(GRID_LOW[c], GRID_HIGH[c], grid)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(RGB_TO_YUV, dtype=torch.float64).to(dtype=dtype, device=device)


def _to_color(x: torch.Tensor) -> torch.Tensor:
    """NCHW images on [0, 1] as (N, H*W, C) colour coordinates (YUV for C = 3, grey for C = 1)."""
    flat = x.flatten(2).transpose(1, 2)
    return flat @ _matrix(x.dtype, x.device) if x.shape[1] == 3 else flat


def _from_color(coords: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.shape[1] == 3:
        coords = coords @ torch.linalg.inv(_matrix(torch.float64, coords.device)).to(coords.dtype)
    return coords.transpose(1, 2).reshape(like.shape)


def _shift_at(params: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The shift s at (N, M, C) colour coordinates: multilinear interpolation of the grid shifts
    `params` (N, *grid, C), the coordinates clamped into the grid's box (constant extension)."""
    n, *grid, c = params.shape
    flat = params.reshape(n, -1, c)
    lows, fracs, strides = [], [], []
    stride = int(np.prod(grid))
    for axis, points in enumerate(grid):
        stride //= points
        lo, hi = GRID_LOW[c][axis], GRID_HIGH[c][axis]
        t = ((coords[..., axis] - lo) / (hi - lo) * (points - 1)).clamp(0, points - 1)
        low = t.detach().floor().clamp(max=points - 2)
        lows.append(low.long())
        fracs.append(t - low)
        strides.append(stride)
    out = torch.zeros_like(coords)
    for corner in itertools.product((0, 1), repeat=c):
        index = sum((low + bit) * s for low, bit, s in zip(lows, corner, strides))
        weight = torch.ones_like(coords[..., 0])
        for frac, bit in zip(fracs, corner):
            weight = weight * (frac if bit else 1 - frac)
        values = torch.gather(flat, 1, index.unsqueeze(-1).expand(-1, -1, c))  # type: ignore[union-attr]  # a sum of tensors
        out = out + weight.unsqueeze(-1) * values
    return out


def recolor(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """f(x) = x + s(x) per pixel, in colour space, back to the pixel box: NCHW images on [0, 1] and
    colour parameters (N, *grid, C) -> NCHW on [0, 1]; differentiable in both."""
    check_shape(params.shape, x.shape[1])
    coords = _to_color(x)
    shifted = coords + _shift_at(params.to(x.dtype), coords)
    return _from_color(shifted, x).clamp(0.0, 1.0)


def smoothness(params: torch.Tensor) -> torch.Tensor:
    """The reference's ``smoothloss``: mean of ((theta_g - theta_h) * g_axis)^2 over every image, axis,
    pair of neighbouring grid points and channel; zero for a constant shift."""
    grid = params.shape[1:-1]
    terms = [(torch.diff(params, dim=axis + 1) * points).square().reshape(-1) for axis, points in enumerate(grid)]
    return torch.cat(terms).mean()


def project(params: torch.Tensor, bound: float) -> torch.Tensor:
    """Reference ``clipop_colorperts``: theta clipped to [-bound, bound], then g + theta into the grid's box;
    a last clip to the bound keeps |theta| <= bound exactly in floating point."""
    grid = params.shape[1:-1]
    c = len(grid)
    eye = grid_points(grid, params.dtype, params.device)
    low = torch.tensor(GRID_LOW[c], dtype=params.dtype, device=params.device)
    high = torch.tensor(GRID_HIGH[c], dtype=params.dtype, device=params.device)
    inside = torch.maximum(torch.minimum(eye + params.clamp(-bound, bound), high), low) - eye
    return inside.clamp(-bound, bound)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float64) / 255.0


def shifted_pixels(images: np.ndarray, params: np.ndarray | torch.Tensor) -> np.ndarray:
    """The colour-shifted images of uint8 NHWC `images` on the [0, 255] scale (float64 NHWC), computed in
    float64 on the CPU from the (float32) parameters: what the crafting side and the audit both use."""
    theta = params.detach().cpu() if isinstance(params, torch.Tensor) else torch.tensor(np.asarray(params))
    with torch.no_grad():
        out = recolor(_nchw(images), theta.to(torch.float64))
    return out.permute(0, 2, 3, 1).numpy() * 255.0


def shifted_base(images: np.ndarray, params: np.ndarray | torch.Tensor) -> np.ndarray:
    """The colour-shifted base on the uint8 grid: :func:`shifted_pixels` rounded to the nearest grey level
    (np.rint). The additive part of a poison is measured from it."""
    return np.rint(shifted_pixels(images, params)).astype(np.uint8)


def quantize_recolored(images: np.ndarray, params: torch.Tensor, delta: torch.Tensor, epsilon: int) -> np.ndarray:
    """uint8 poisons f(x) + delta: the float poison rounded to the uint8 grid, then clipped to within
    `epsilon` grey levels of the colour-shifted base :func:`shifted_base` and to [0, 255]."""
    pixels = shifted_pixels(images, params)
    base = np.rint(pixels)
    additive = delta.detach().cpu().double().permute(0, 2, 3, 1).numpy() * 255.0
    step = np.clip(np.rint(pixels + additive - base), -epsilon, epsilon)
    return np.clip(base + step, 0, 255).astype(np.uint8)
