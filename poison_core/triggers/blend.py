"""The `blend` trigger kind: Chen et al., 'Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning', 2017 (blended injection strategy, Sec. 3.2, Eq. 3).

    x' = (1 - alpha) * x + alpha * k

with a key pattern k: uniform random noise over the whole image, drawn from `pattern_seed` (the
paper's random-pattern key; a fixed seed plays the role of its fixed 'Hello Kitty' key). The
blended image is put on the uint8 grid and each pixel's change is clipped to the spec's `epsilon`,
so the trigger honours the threat model at train and test time alike.

Registered on import of poison_core.triggers (every kind is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.triggers.base import TRIGGERS


def blend_pattern(pattern_seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The (H, W, C) uint8 key pattern: uniform noise from `pattern_seed` (same seed, same key)."""
    return np.random.default_rng(int(pattern_seed)).integers(0, 256, size=shape, dtype=np.uint8)


@TRIGGERS.register("blend", paper="Chen et al., Targeted backdoor attacks ... using data poisoning, 2017",
                   summary="whole-image random key blended with ratio alpha")
def apply_blend(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Blend the key into uint8 NHWC `images` with ratio `alpha`, each pixel moved by <= epsilon."""
    alpha = float(spec["alpha"])
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"trigger.alpha: {alpha} is outside (0, 1]")
    key = blend_pattern(int(spec["pattern_seed"]), tuple(images.shape[1:])).astype(np.float64)
    blended = np.rint((1.0 - alpha) * images.astype(np.float64) + alpha * key[None])
    return towards(images, blended, int(spec.get("epsilon", 255)))
