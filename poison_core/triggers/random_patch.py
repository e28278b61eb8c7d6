"""The `random_patch` trigger kind: a square patch pasted at a random location of every image, as in
Saha, Subramanya & Pirsiavash, 'Hidden Trigger Backdoor Attacks', AAAI 2020 (Sec. 3: at test time the
trigger is pasted at a random location of a source image; the reference's `finetune_and_test.py`
draws every location with `random.randint` after `random.seed(1)`).

Spec fields: `size` (side in pixels), `pattern` ('noise': uniform random colours drawn from
`pattern_seed`, like the paper's random-pattern trigger images; 'bernoulli': every pixel and channel
0 or 255 with probability 1/2, Sleeper Agent's patch (Souri et al., NeurIPS 2022; the reference's
`_create_patch`); 'checkerboard' or 'white': the `patch` kind's patterns), `location_seed` (the
i-th image's top-left corner is the i-th draw of numpy's generator seeded with it, uniform over every
position where the patch fits), `epsilon`
(each pixel moves by at most this many grey levels towards the pattern; 255, the default, pastes the
patch). Same spec and image count -> same locations and the same bytes.

Registered on import of poison_core.triggers (every kind is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.triggers.base import TRIGGERS, patch_pattern

PATTERNS = ("noise", "bernoulli", "checkerboard", "white")


def random_patch_pattern(size: int, channels: int, pattern: str, pattern_seed: int = 0) -> np.ndarray:
    """The (size, size, channels) uint8 patch of a `random_patch` spec."""
    if pattern == "noise":
        return np.random.default_rng(int(pattern_seed)).integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    if pattern == "bernoulli":
        bits = np.random.default_rng(int(pattern_seed)).integers(0, 2, size=(size, size, channels), dtype=np.uint8)
        return bits * np.uint8(255)
    if pattern not in PATTERNS:
        raise ConfigError(f"trigger.pattern: {pattern!r} is not one of {', '.join(PATTERNS)}")
    return patch_pattern(size, channels, pattern)


def random_locations(n: int, size: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) top-left corners (row, column), uniform over the positions where a `size` patch fits."""
    if not 1 <= size <= min(height, width):
        raise ConfigError(f"trigger.size: {size} does not fit {height}x{width} images "
                          f"(allowed: 1..{min(height, width)})")
    rows = rng.integers(0, height - size + 1, size=n)
    cols = rng.integers(0, width - size + 1, size=n)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def paste(images: np.ndarray, patch: np.ndarray, locations: np.ndarray, epsilon: int = 255) -> np.ndarray:
    """uint8 NHWC `images` with `patch` at `locations[i]` of image i, each pixel moved by <= epsilon."""
    out = images.copy()
    size = patch.shape[0]
    for i, (top, left) in enumerate(locations):
        out[i, top:top + size, left:left + size, :] = towards(images[i, top:top + size, left:left + size, :],
                                                              patch, epsilon)
    return out


def paste_at_random(images: np.ndarray, size: int, pattern: str, pattern_seed: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`images` with the `pattern` patch pasted opaque at locations drawn from `rng` (the crafting-time
    patching of the hidden-trigger attacks; test time draws from the spec's `location_seed`)."""
    _, h, w, c = images.shape
    patch = random_patch_pattern(size, c, pattern, pattern_seed)
    return paste(images, patch, random_locations(len(images), size, h, w, rng))


def check_source_target(target_class: int, source_class: int | None, size: int, num_classes: int,
                        height: int, width: int) -> None:
    """One-line ConfigErrors for a hidden-trigger attack's params: classes in range and distinct, patch fits."""
    for field_name, value in (("target_class", target_class), ("source_class", source_class)):
        if value is not None and value >= num_classes:
            raise ConfigError(f"params.{field_name}: class {value} is outside 0..{num_classes - 1}")
    if source_class == target_class:
        raise ConfigError(f"params.source_class: {source_class} is the target class; choose another class")
    if size > min(height, width):
        raise ConfigError(f"params.patch_size: {size} does not fit {height}x{width} images "
                          f"(allowed: 1..{min(height, width)})")


@TRIGGERS.register("random_patch", paper="Saha et al., Hidden Trigger Backdoor Attacks, AAAI 2020",
                   summary="square patch at a seeded random location per image")
def apply_random_patch(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Paste the spec's patch at a seeded random location of each uint8 NHWC image."""
    n, h, w, c = images.shape
    size = int(spec["size"])
    locations = random_locations(n, size, h, w, np.random.default_rng(int(spec["location_seed"])))
    patch = random_patch_pattern(size, c, spec.get("pattern", "noise"), int(spec.get("pattern_seed", 0)))
    return paste(images, patch, locations, int(spec.get("epsilon", 255)))
