"""The model registry and its convention (poison_core.models imports every member into it).

Image classifiers that follow one features/head convention.

Every member of ``MODELS`` is a builder ``(in_channels, num_classes, image_size, width) -> nn.Module``
returning a :class:`Classifier`: ``model.features(x)`` is the penultimate feature vector (N, D),
``model.head`` is the final ``nn.Linear``, and ``model(x) == model.head(model.features(x))``.
Inputs are float NCHW tensors in [0, 1] of 1 or 3 channels and any size from 8x8 up. No model uses
dropout, so training is deterministic given the seed.

    model = build_model(ModelConfig(name="resnet18"), image_shape=(32, 32, 3), num_classes=10, seed=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Protocol

import torch
from pydantic import AfterValidator
from torch import nn

from poison_core.errors import ConfigError, InputError
from poison_core.registry import Registry

if TYPE_CHECKING:
    from poison_core.config import ModelConfig

MIN_IMAGE_SIZE = 8


class ModelBuilder(Protocol):
    """What a registered model is: a function building a fresh, randomly initialised classifier."""

    def __call__(self, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 width: int | None) -> nn.Module: ...


class Classifier(nn.Module):
    """Base of every registered model: ``forward(x) == head(features(x))``.

    Subclasses set ``self.head`` (an ``nn.Linear``) and implement :meth:`features`. Attacks that
    work in feature space (feature collision, bullseye, linear probes) rely on this split.
    """

    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate feature vector (N, D) of a float NCHW batch in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features


MODELS: Registry[ModelBuilder] = Registry("model", group="belladonna.models")
MODELS.check = lambda obj: None if callable(obj) else f"{obj!r} is not a model builder or constructor"


def _registered_model(name: str) -> str:
    try:
        MODELS.entry(name)
    except InputError as exc:  # pydantic names the field of a ValueError
        raise ValueError(str(exc)) from None
    return name


ModelName = Annotated[str, AfterValidator(_registered_model)]
"""A name in the model registry, checked when the model holding it validates: the architecture that an
attack's parameters name (the benchmark's own models are checked by poison_core.members at preflight)."""


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised `cfg.name` for images of shape (H, W, C) and `num_classes` classes.

    Weights depend only on (cfg, image_shape, num_classes, seed): the builder runs inside a forked
    CPU RNG seeded with `seed`, so the caller's global RNG state is left exactly as it was.
    """
    builder = MODELS.get(cfg.name)
    if len(image_shape) != 3:
        raise ConfigError(f"model {cfg.name!r}: image_shape must be (H, W, C), got {tuple(image_shape)}")
    height, width_px, channels = (int(v) for v in image_shape)
    if channels not in (1, 3):
        raise ConfigError(f"model {cfg.name!r}: images must have 1 or 3 channels, got {channels}")
    if min(height, width_px) < MIN_IMAGE_SIZE:
        raise ConfigError(f"model {cfg.name!r}: images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, "
                          f"got {height}x{width_px}")
    if num_classes < 2:
        raise ConfigError(f"model {cfg.name!r}: num_classes must be at least 2, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(channels, num_classes, (height, width_px), cfg.width)
