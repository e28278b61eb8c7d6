"""The attacker's power: the threat model, and how targeted attacks pick their targets."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from poison_core.config.base import StrictModel


class SetupsFile(StrictModel):
    """A file of poison keys drawn by someone else: the 'Just How Toxic' benchmark's
    ``poison_setups/*.pickle`` (Schwarzschild et al., ICML 2021; aks2203/poisoning-benchmark, how_to.md),
    a list of {"target class", "target index", "base class", "base indices"} dicts. The keys used are
    setups ``start`` .. ``start + n_targets - 1`` (poison_core.interop.setups)."""

    format: Literal["benchmark"] = "benchmark"
    path: str = Field(min_length=1, max_length=4096)
    start: int = Field(0, ge=0, le=100_000)


class TargetSelection(StrictModel):
    """How targeted attacks pick (target test image, adversarial class, base class) keys: a seeded
    ``random`` draw, ``fixed`` test ids, or ``setups``, another tool's keys read from a file (targets,
    classes and the bases themselves). A selection without a setups file dumps (and hashes) as before."""

    mode: Literal["random", "fixed", "setups"] = "random"
    n_targets: int = Field(1, ge=1, le=100_000)
    target_ids: tuple[int, ...] = ()
    adversarial_class: int | None = Field(None, ge=0)
    base_class: int | None = Field(None, ge=0)
    setups: SetupsFile | None = None

    @model_validator(mode="after")
    def _fixed_needs_ids(self) -> "TargetSelection":
        if self.mode == "fixed" and not self.target_ids:
            raise ValueError("targets.target_ids must name at least one test id when mode is 'fixed'")
        if (self.mode == "setups") != (self.setups is not None):
            raise ValueError("targets.setups (a file of keys, e.g. {path: cifar10_transfer_learning.pickle}) is "
                             "given exactly when mode is 'setups'")
        if self.mode == "setups":
            for name in ("target_ids", "adversarial_class", "base_class"):
                if getattr(self, name) not in (None, ()):
                    raise ValueError(f"targets.{name}: the setups file gives every key's target and classes; "
                                     f"leave {name} unset when mode is 'setups'")
        return self

    @model_serializer(mode="wrap")
    def _dump_without_setups(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.setups is None:
            data.pop("setups", None)
        return data


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
