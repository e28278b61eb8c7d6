"""A training recipe, and the source task that `transfer` and `finetune` victims start from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from poison_core.config.base import StrictModel
from poison_core.config.dataset import DatasetConfig


class TrainConfig(StrictModel):
    """A training recipe: optimizer, schedule, epochs. Defaults suit the small CPU ConvNet.

    compile: run the training forward and backward through ``torch.compile`` (TorchInductor). On
    one CPU thread the width-16 ConvNet's step goes from 25 to 17 ms (1.43x) after a ~23 s compile,
    so it pays from a few thousand steps on; off by default (the CPU configs train a few hundred).

    augment: the recipe's data augmentation (poison_core.augmentation). 'crop-flip' is what every
    reference victim trains with (forest/victims/training.py ``augmentations=True``; Unlearnable
    Examples' dataset.py; Sleeper Agent; ABL; WaNet; DPA): a random crop of the image zero-padded by
    `crop_padding` px (None: 4 px from 32 px images up, 2 px at 28 px as forest does for MNIST, see
    :func:`poison_core.augmentation.default_padding`) and a horizontal flip with probability 1/2 when
    `flip`. Off ('none') by default so that the small test victims keep their numbers; the shipped
    configs turn it on. When off, the three fields are left out of the dump, so recipes without
    augmentation serialise (and hash) as they did before.
    """

    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["none", "cosine", "step", "forest"] = "cosine"
    compile: bool = False
    augment: Literal["none", "crop-flip"] = "none"
    crop_padding: int | None = Field(None, ge=0, le=64)
    flip: bool = True

    @model_serializer(mode="wrap")
    def _dump_augmentation_only_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.augment == "none":
            for name in ("augment", "crop_padding", "flip"):
                data.pop(name, None)
        return data


class PretrainConfig(StrictModel):
    """The source task of the `transfer` and `finetune` protocols: a supervised model of the victim's
    architecture trained on another dataset (its images resized to the victim's image shape)."""

    dataset: DatasetConfig
    train: TrainConfig = TrainConfig()
    seed: int = Field(0, ge=0, le=2**32 - 1)
