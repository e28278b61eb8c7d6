"""The `sig` trigger kind: Barni, Kallas & Tondi, 'A new backdoor attack in CNNs by training set
corruption without label poisoning', ICIP 2019 (the ramp and the sinusoidal backdoor signal).

A horizontal signal v(i, j), the same on every row i and channel, is superimposed on the image,
x' = x + v, with j = 1..m the column index of an image m columns wide:

    ramp:        v(i, j) = j * Delta / m
    sinusoidal:  v(i, j) = Delta * sin(2 * pi * j * f / m)

The sum is rounded to the uint8 grid, clipped to [0, 255], and each pixel's change is clipped to the
spec's `epsilon`, so the trigger honours the threat model at train and test time alike.

Barni et al. strengthen the signal at test time (Delta_ts above the training Delta_tr). A spec
therefore records both: `delta` is the strength :func:`apply_sig` stamps (the test-time one, so
evaluation triggers test images with it) and `train_delta` the strength of the poisons;
:func:`training_spec` gives the spec that reproduces the stored poisons.

Registered on import of poison_core.triggers (every kind is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poison_core.errors import ConfigError
from poison_core.perturbation import towards
from poison_core.triggers.base import TRIGGERS

SIGNALS = ("sin", "ramp")


def sig_signal(signal: str, delta: float, frequency: float, width: int) -> np.ndarray:
    """The (width,) float64 signal v(., j) for columns j = 1..width (Barni et al.'s ramp or sinusoid)."""
    j = np.arange(1, width + 1, dtype=np.float64)
    if signal == "ramp":
        return j * float(delta) / width
    if signal == "sin":
        return float(delta) * np.sin(2.0 * np.pi * j * float(frequency) / width)
    raise ConfigError(f"trigger.signal: {signal!r} is not one of {', '.join(SIGNALS)}")


def training_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec that stamps the poisons: `delta` replaced by the recorded `train_delta`."""
    return {**spec, "delta": spec.get("train_delta", spec["delta"])}


@TRIGGERS.register("sig", paper="Barni, Kallas & Tondi, ICIP 2019",
                   summary="horizontal ramp or sinusoidal signal superimposed on the whole image")
def apply_sig(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Add the signal of strength `delta` to uint8 NHWC `images`, each pixel moved by <= epsilon."""
    delta = float(spec["delta"])
    if not 0.0 < delta <= 255.0:
        raise ConfigError(f"trigger.delta: {delta} is outside (0, 255]")
    v = sig_signal(spec.get("signal", "sin"), delta, float(spec.get("frequency", 6)), images.shape[2])
    stamped = np.clip(np.rint(images.astype(np.float64) + v[None, None, :, None]), 0, 255)
    return towards(images, stamped, int(spec.get("epsilon", 255)))
