"""The uint8 grid and the L-inf ball of the threat model: the one home of the rule every attack and trigger follows.

A PoisonSet stores uint8 images, and its audit holds each poison to ``|poison - clean| <= epsilon`` on
that grid (epsilon in /255). Attacks optimise in float on [0, 1] and go to the grid once, at the end;
triggers stamp on the grid directly. Every path ends in :func:`apply_step`, so the stored L-inf
distance never exceeds epsilon, even where float rounding would push a pixel a hair past the ball.

Layout convention: **images are uint8 NHWC** arrays (as stored); **float perturbations are NCHW** on
the [0, 1] scale, torch tensors or numpy arrays alike (as models see them). Callers holding an NHWC
float perturbation transpose it before :func:`quantize`.

The feasible set of a float perturbation ``delta`` of clean images ``x0`` is

    { delta : ||delta||_inf <= eps / 255  and  0 <= x0 + delta <= 1 },

and the projection onto this box intersection is the coordinate-wise clamp (:func:`project`).
Projected gradient descent after Madry et al., 'Towards Deep Learning Models Resistant to
Adversarial Attacks', ICLR 2018, Eq. 2. Stepping on the grid itself would round away steps below
one grey level, such as Huang et al.'s 0.8/255 (Unlearnable Examples, ICLR 2021).
"""

from __future__ import annotations

import numpy as np
import torch

from poison_core.training import to_tensor


def to_unit(epsilon: int) -> float:
    """An epsilon on the uint8 grid (in /255) as a radius on the [0, 1] scale."""
    return float(epsilon) / 255.0


def project(delta: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp `delta` to [-eps, eps] and keep x0 + delta inside the pixel box [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (x0 + delta).clamp(0.0, 1.0) - x0


def project_linf(delta: torch.Tensor, radius: float, x: torch.Tensor | None = None) -> torch.Tensor:
    """The ball alone (a perturbation shared by many images: class-wise noise), or with `x` the ball
    and the pixel box (:func:`project`)."""
    return delta.clamp(-radius, radius) if x is None else project(delta, x, radius)


def project_images(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """The same projection for attacks that optimise the poisoned images x rather than delta."""
    return x0 + project(x - x0, x0, eps)


def random_start(x0: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """A feasible delta drawn uniformly from [-eps, eps] per pixel (then projected into the box)."""
    noise = (torch.rand(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device) * 2 - 1) * eps
    return project(noise, x0, eps)


def clip_unit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] in the forward pass, identity in the backward pass (straight-through).

    A perturbation shared by many images (class-wise, cluster-wise) that the image range clips
    away on dark or bright pixels then still gets a gradient there, as each sample's projected
    copy would in the per-sample updates of Huang et al.'s code.
    """
    return x + (x.clamp(0.0, 1.0) - x).detach()


def apply_step(images: np.ndarray, step: np.ndarray, epsilon: int) -> np.ndarray:
    """uint8 `images` moved by the integer `step`, each pixel's change clipped to [-epsilon, epsilon] and
    the result to [0, 255]: the rule every poison and trigger ends with."""
    step = np.clip(np.asarray(step), -epsilon, epsilon).astype(np.int16)
    return np.clip(images.astype(np.int16) + step, 0, 255).astype(np.uint8)


def towards(images: np.ndarray, goal: np.ndarray, epsilon: int) -> np.ndarray:
    """uint8 `images` moved towards the uint8-valued `goal` (same layout, broadcastable) by at most
    `epsilon` grey levels per pixel (a trigger stamped under the threat model's epsilon)."""
    return apply_step(images, np.asarray(goal).astype(np.int16) - images.astype(np.int16), epsilon)


def quantize(images: np.ndarray, delta: torch.Tensor | np.ndarray, epsilon: int) -> np.ndarray:
    """uint8 NHWC `images` plus a float NCHW `delta` (on [0, 1]) as uint8 NHWC, within `epsilon` exactly:
    the integer perturbation is round(255 * delta), clipped to [-epsilon, epsilon]."""
    if isinstance(delta, torch.Tensor):
        nhwc = delta.detach().cpu().double().permute(0, 2, 3, 1).numpy()
    else:
        nhwc = np.asarray(delta, dtype=np.float64).transpose(0, 2, 3, 1)
    return apply_step(images, np.rint(nhwc * 255.0), epsilon)


def int_deltas(poisoned: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The integer perturbation (N, H, W, C) int16 that turned `clean` into `poisoned`."""
    return poisoned.astype(np.int16) - clean.astype(np.int16)


def delta_of(poisoned: np.ndarray, clean: np.ndarray) -> torch.Tensor:
    """The float NCHW perturbation on [0, 1] that turns uint8 `clean` into uint8 `poisoned`."""
    return to_tensor(poisoned, "cpu") - to_tensor(clean, "cpu")


def linf(poisoned: np.ndarray, clean: np.ndarray) -> int:
    """The L-inf distance of two uint8 image arrays, in /255 (0 for empty arrays)."""
    if poisoned.size == 0:
        return 0
    return int(np.abs(int_deltas(poisoned, clean)).max())
