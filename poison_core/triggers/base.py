"""Backdoor triggers as JSON-able specs, so a PoisonSet's metadata fully describes its trigger.

`apply_trigger(spec, images)` stamps the trigger on uint8 images at train and test time alike.
The stamp respects the threat model's epsilon: each pixel moves by at most `epsilon` towards the
trigger pattern (epsilon 255 gives the classic opaque BadNets patch of Gu et al., 2017).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.registry import Registry

TriggerFn = Callable[[dict[str, Any], np.ndarray], np.ndarray]
TRIGGERS: Registry[TriggerFn] = Registry("trigger")

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def patch_pattern(size: int, channels: int, pattern: str) -> np.ndarray:
    """The (size, size, channels) uint8 patch: a black/white checkerboard or a white square."""
    if pattern == "white":
        return np.full((size, size, channels), 255, np.uint8)
    grid = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.uint8) * 255
    return np.repeat(grid[:, :, None], channels, axis=2)


def _corner_slices(position: str, size: int, height: int, width: int, margin: int) -> tuple[slice, slice]:
    if size + margin > min(height, width):
        raise ConfigError(f"trigger size {size} (+margin {margin}) does not fit {height}x{width} images")
    top = margin if position.startswith("top") else height - size - margin
    left = margin if position.endswith("left") else width - size - margin
    return slice(top, top + size), slice(left, left + size)


@TRIGGERS.register("patch", paper="Gu et al., BadNets, 2017", summary="square patch in a corner")
def apply_patch(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Stamp a `size` x `size` patch at a corner (`position`, `margin`), moved by <= epsilon."""
    n, h, w, c = images.shape
    rows, cols = _corner_slices(spec["position"], int(spec["size"]), h, w, int(spec.get("margin", 0)))
    out = images.copy()
    goal = patch_pattern(int(spec["size"]), c, spec.get("pattern", "checkerboard"))
    out[:, rows, cols, :] = towards(images[:, rows, cols, :], goal[None], int(spec.get("epsilon", 255)))
    return out


def apply_trigger(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Stamp the trigger described by `spec` (its `kind` picks the registered function)."""
    return TRIGGERS.get(spec["kind"])(spec, images)
