"""The attacker's power: the threat model, and how targeted attacks pick their targets."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from poison_core.config.base import StrictModel


class TargetSelection(StrictModel):
    """How targeted attacks pick (target test image, adversarial class, base class) keys."""

    mode: Literal["random", "fixed"] = "random"
    n_targets: int = Field(1, ge=1, le=100_000)
    target_ids: tuple[int, ...] = ()
    adversarial_class: int | None = Field(None, ge=0)
    base_class: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _fixed_needs_ids(self) -> "TargetSelection":
        if self.mode == "fixed" and not self.target_ids:
            raise ValueError("targets.target_ids must name at least one test id when mode is 'fixed'")
        return self


class ThreatModel(StrictModel):
    """The attacker's power (Goldblum et al., 'Dataset Security for ML', 2022, Sec. 2).

    epsilon: L-inf bound on the uint8 grid, in /255 (0..255). budget: fraction of the training set
    the attacker controls, in (0, 1]. clean_label: poisons keep their true labels.

    color_epsilon: bound of a colour perturbation (ReColorAdv, Laidlaw & Feizi, NeurIPS 2019, Sec. 3;
    MetaPoison's reference applies one, -epscolor 0.04): the largest shift of any point of the colour
    grid along any channel of its colour space (poison_core.recolor: YUV, or grey), as a fraction
    of that channel's range, in [0, 1]. 0 (the default) allows no colour perturbation; with a colour part
    the L-inf bound `epsilon` applies to the poison minus the colour-shifted image. A zero color_epsilon
    is left out of the dump, so threat models without one serialise (and hash) as they did before.
    """

    epsilon: int = Field(16, ge=0, le=255)
    budget: float = Field(0.01, gt=0, le=1)
    clean_label: bool = False
    knowledge: Literal["white", "grey", "black"] = "white"
    targets: TargetSelection = TargetSelection()
    color_epsilon: float = Field(0.0, ge=0, le=1)

    @model_serializer(mode="wrap")
    def _dump_without_zero_color(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.color_epsilon == 0:
            data.pop("color_epsilon", None)
        return data

    def max_poisons(self, n_train: int) -> int:
        """The largest poison count this budget allows on `n_train` samples: floor(budget * n)."""
        return int(math.floor(self.budget * n_train + 1e-9))
