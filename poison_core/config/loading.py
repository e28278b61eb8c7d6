"""Loading a benchmark YAML (``load_benchmark``) into typed configs.

Any validation error becomes one :class:`ConfigError` line naming the field, the problem, the allowed
range and the value given, e.g. ``threat.epsilon: Input should be less than or equal to 255 (allowed:
0 <= epsilon <= 255; got 300)``. Member names (attacks, defenses, models, datasets) and member
parameters are checked at preflight (:func:`poison_core.members.check_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from poison_core.config.base import StrictModel
from poison_core.config.benchmark import BenchmarkConfig
from poison_core.config_errors import format_validation_error
from poison_core.errors import ConfigError, InputError
from poison_core.paths import read_text

MAX_CONFIG_BYTES = 4 * 2**20
"""Largest benchmark YAML (a grid of hundreds of cells is a few KiB)."""
MAX_YAML_DEPTH = 32
"""Deepest nesting a benchmark YAML may have (the config schema itself is under 8 levels deep)."""


def load_benchmark(source: str | Path) -> BenchmarkConfig:
    """Load a benchmark from a YAML file path (or YAML text starting with a newline or '{')."""
    text = read_yaml_text(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # yaml's composer recurses once per level of nesting
        raise ConfigError(f"malformed YAML: nested deeper than Python's recursion limit allows "
                          f"(a benchmark needs fewer than {MAX_YAML_DEPTH} levels)") from None
    if _depth(raw) > MAX_YAML_DEPTH:
        raise ConfigError(f"malformed YAML: nested more than {MAX_YAML_DEPTH} levels deep")
    if not isinstance(raw, dict):
        raise ConfigError(f"benchmark config must be a YAML mapping, got {type(raw).__name__}")
    return parse_config(BenchmarkConfig, raw)


def parse_config(model: type[StrictModel], raw: Any) -> Any:
    """Validate `raw` against `model`, turning any error into one ConfigError line."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model)) from None
    except InputError as exc:  # registry lookups inside validators
        raise ConfigError(str(exc)) from None


def read_yaml_text(source: str | Path) -> str:
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        return source
    try:
        return read_text(source, "config file", limit=MAX_CONFIG_BYTES)
    except InputError as exc:  # a FIFO, a folder, invalid UTF-8, a huge file: one line naming the path
        raise ConfigError(str(exc)) from None


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of parsed YAML, stopping once it passes MAX_YAML_DEPTH (no deep recursion)."""
    if level > MAX_YAML_DEPTH or not isinstance(value, (dict, list)):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(child, level + 1) for child in children), default=level + 1)
