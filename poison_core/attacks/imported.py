"""`imported`: another tool's poisons, read from its files, as a member of the grid.

The poisons were crafted elsewhere (the 'Just How Toxic' benchmark's trial folders, Geiping et al.'s
forest exports, plain arrays; see poison_core.interop); this attack reads them, checks them against
the clean training set (bases named by the dataset's original indices) and lets the Attack template
pack and audit them under the config's threat model like any crafted PoisonSet: epsilon on the uint8
grid, the budget, unchanged labels for clean-label threat models. The seed plays no part. The
provenance records the format and the sha256 of every file read; :meth:`input_fingerprint` is the
content hash the stage key includes, so changed files give a new key.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError
from poison_core.interop import formats
from poison_core.interop.common import match


class ImportedParams(AttackParams):
    """format and path of the files; normalization: forest's normalisation of forest-packed deltas
    (poison_core.interop.forest_packed; default cifar10 on CIFAR-10), left out of the dump when unset."""

    format: Literal["benchmark", "forest-numpy", "forest-full", "forest-packed", "arrays"]
    path: str = Field(min_length=1, max_length=4096)
    normalization: Literal["cifar10", "cifar100", "mnist", "imagenet", "tinyimagenet", "none"] | None = None

    @model_serializer(mode="wrap")
    def _dump_without_unset_normalization(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.normalization is None:
            data.pop("normalization", None)
        return data


@register_attack
class Imported(Attack):
    """Poisons crafted by another tool, read from its files."""

    name = "imported"
    paper = "Schwarzschild et al., ICML 2021 (benchmark format); Geiping et al., ICLR 2021 (forest)"
    summary = "another tool's poisons (benchmark pickles, forest exports, npy/npz), audited as a PoisonSet"
    Params = ImportedParams
    smoke = None  # needs the files of another tool: tests/test_interop.py checks its crafts
    label_policy = "any"

    def input_fingerprint(self) -> str:
        """sha256 over the sorted relative paths and bytes of the files this attack reads."""
        return formats.input_fingerprint(self.params.format, self.params.path)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        if ctx.test is None:
            raise ConfigError("ctx.test: imported poisons' targets are found in the test split; none was given")
        p = self.params
        what = f"{p.format} poisons at {p.path!r}"
        got = formats.read(p.format, p.path, ctx.train, ctx.test, n_poison, normalization=p.normalization)
        pos = match(got, ctx.train, ctx.threat.epsilon, what)
        record: dict[str, Any] = {"format": p.format, "path": p.path, "sources": got.sources}
        if p.normalization is not None:
            record["normalization"] = p.normalization
        return Crafted(positions=pos, images=got.images, poison_labels=got.poison_labels, targets=got.targets,
                       trigger=got.trigger, provenance={"import": record})
