"""Which dataset a benchmark runs on, and which architecture its models have.

Names are checked against the dataset and model registries (built-ins, plug-ins and import strings)
by :func:`poison_core.members.check_names` at preflight, not here: configs sit below the registries.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from poison_core.config.base import StrictModel

RegistryName = Annotated[str, Field(min_length=1, max_length=4096)]
"""A member's name: a registered name, a plug-in's, or an import string ``module:attribute``."""

ModelName = RegistryName
"""A name in the model registry (checked at preflight; attack parameters use the checked
:data:`poison_core.models.ModelName`)."""


class DatasetConfig(StrictModel):
    """Which dataset, where from, and how it is split and subsampled (all by `seed`)."""

    name: RegistryName = "digits"
    path: str | None = None
    download: bool = False
    n_train: int | None = Field(None, gt=0, le=10_000_000)
    n_test: int | None = Field(None, gt=0, le=10_000_000)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ModelConfig(StrictModel):
    """An architecture from the model registry (a built-in or plug-in name, or an import string such as
    ``torchvision.models:resnet18``); `width` scales channels where the model has them; `weights` is a
    safetensors file (path or URI) the model starts from instead of a random initialisation
    (`poison_core.models.weights`)."""

    name: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)
    weights: str | None = Field(None, min_length=1, max_length=4096)
