"""The `fixed_patch` trigger kind: one given patch pasted at one given place of every image, as the
'Just How Toxic' benchmark's triggered-backdoor targets describe it (Schwarzschild et al., ICML 2021;
aks2203/poisoning-benchmark, poison_test.py: the target.pickle's patch is pasted with its top-left
pixel at [startx, starty] of the target image).

Spec fields: `pixels` (the patch as a nested (size, size, C) list of grey levels 0..255), `top` and
`left` (its top-left corner: row and column), `epsilon` (each pixel moves by at most this many grey
levels towards the patch; 255, the default, pastes it), and the goal's `target_class` and optional
`source_class`. Registered on import of poison_core.triggers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.triggers.base import TRIGGERS


def patch_pixels(spec: dict[str, Any], channels: int) -> np.ndarray:
    """The spec's (size, size, channels) uint8 patch; a malformed one is one ConfigError line."""
    pixels = np.asarray(spec["pixels"])
    if (pixels.ndim != 3 or pixels.shape[0] != pixels.shape[1] or pixels.shape[2] != channels
            or pixels.dtype.kind not in "iu" or pixels.size == 0 or pixels.min() < 0 or pixels.max() > 255):
        raise ConfigError(f"trigger.pixels: a (size, size, {channels}) patch of grey levels 0..255 is expected, "
                          f"got {pixels.dtype} {pixels.shape}")
    return pixels.astype(np.uint8)


@TRIGGERS.register("fixed_patch", paper="Schwarzschild et al., ICML 2021 (benchmark's triggered targets)",
                   summary="a given patch at a given place")
def apply_fixed_patch(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Paste the spec's patch with its top-left corner at (`top`, `left`), moved by <= epsilon."""
    _n, h, w, c = images.shape
    patch = patch_pixels(spec, c)
    size, top, left = patch.shape[0], int(spec["top"]), int(spec["left"])
    if top < 0 or left < 0 or top + size > h or left + size > w:
        raise ConfigError(f"trigger: a {size}x{size} patch at top {top}, left {left} does not fit {h}x{w} images")
    out = images.copy()
    region = (slice(None), slice(top, top + size), slice(left, left + size), slice(None))
    out[region] = towards(images[region], patch[None], int(spec.get("epsilon", 255)))
    return out
