"""The grid's members: an attack or a defense by registry name, with its parameters.

The name and the parameters are checked against the member (its registry entry and its own
``Params`` model) by :mod:`poison_core.members` at preflight: configs sit below the registries, so
``params`` is kept here as the mapping the YAML gave.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from poison_core.config.base import NAME_PATTERN, StrictModel
from poison_core.config.dataset import RegistryName
from poison_core.config.threat_model import ThreatModel


class _Named(StrictModel):
    name: RegistryName
    params: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(None, pattern=NAME_PATTERN)

    @property
    def key(self) -> str:
        """The member's name in the grid: `id` when given (two configs of one attack), else `name`."""
        return self.id or self.name


class AttackConfig(_Named):
    """An attack by registry name, its parameters, and optionally its own threat model."""

    threat: ThreatModel | None = None


class DefenseConfig(_Named):
    """A defense by registry name and its parameters."""
