"""A benchmark's member names and parameters, checked against the registries: the one place configs
meet the registries.

Configs (:mod:`poison_core.config`) sit below the registries in the layer contract (pyproject.toml),
so they hold member names as text and parameters as the mapping the YAML gave. This module looks every
name up through its registry (built-ins, entry-point plug-ins and import strings alike, the lookup
:class:`poison_core.registry.Registry` gives) and validates every member's parameters against its own
``Params`` model. Preflight runs :func:`check_names` first (tasks.preflight, the CLI's loader), so a bad
name fails with one line naming the field and the allowed members, before a dataset is read.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from poison_core.attacks import ATTACKS
from poison_core.config import AttackConfig, BenchmarkConfig, DatasetConfig, DefenseConfig, ModelConfig
from poison_core.config_errors import format_validation_error
from poison_core.data import DATASETS
from poison_core.defenses import DEFENSES
from poison_core.errors import ConfigError, InputError
from poison_core.models import MODELS
from poison_core.registry import Registry


def check_names(cfg: BenchmarkConfig) -> None:
    """Raise one ConfigError line (field first) unless every name in `cfg` is a member of its registry
    and every attack's and defense's parameters validate: the dataset, the victim's and surrogate's
    architectures, their source datasets, the attacks and defenses, and the datasets and models named
    inside members' parameters."""
    _walk(cfg, "")


def attack_params(attack: AttackConfig, where: str = "") -> BaseModel:
    """The attack's parameters validated against its own ``Params`` model (ConfigError naming `where`)."""
    return _params(ATTACKS, attack.name, attack.params, where)


def defense_params(defense: DefenseConfig, where: str = "") -> BaseModel:
    """The defense's parameters validated against its own ``Params`` model (ConfigError naming `where`)."""
    return _params(DEFENSES, defense.name, defense.params, where)


def _lookup(registry: Registry, name: str, where: str) -> Any:
    try:
        return registry.get(name)
    except InputError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _params(registry: Registry, name: str, params: dict[str, Any], where: str) -> BaseModel:
    member = _lookup(registry, name, f"{where}.name" if where else "name")
    prefix = f"{where}: " if where else ""
    try:
        return member.Params.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(f"{prefix}params of {name!r}: {format_validation_error(exc, member.Params)}") from None
    except InputError as exc:  # a registry lookup inside the member's own validators
        raise ConfigError(f"{prefix}params of {name!r}: {exc}") from None


def _walk(value: Any, where: str) -> None:
    """Check the names in `value` (a config, a member's parsed parameters, or a tuple of them)."""

    def field(name: str) -> str:
        return f"{where}.{name}" if where else name

    if isinstance(value, DatasetConfig):
        _lookup(DATASETS, value.name, field("name"))
    elif isinstance(value, ModelConfig):
        _lookup(MODELS, value.name, field("name"))
    elif isinstance(value, AttackConfig):
        _walk(attack_params(value, where), field("params"))
    elif isinstance(value, DefenseConfig):
        _walk(defense_params(value, where), field("params"))
    if isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _walk(item, field(str(index)))
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            if not (isinstance(value, (AttackConfig, DefenseConfig)) and name == "params"):
                _walk(getattr(value, name), field(name))
