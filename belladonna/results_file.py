"""The shape of ``results.json`` as `belladonna report` reads it: a pydantic model, strict where the report
reads, open elsewhere.

`flows.benchmark` writes the file; other keys (per-stage recompute reasons, nodes, ...) may be added at
the top level and in each summary row without breaking older readers, so unknown keys are kept. The
fields the report prints are strictly typed (no bool for an int, no string for a rate), finite, within
the metric's range (:func:`poison_core.metrics.metric_range`) and their intervals ordered: a file that
is not UTF-8 JSON of this shape is refused in one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poison_core.config_errors import format_validation_error
from poison_core.errors import InputError
from poison_core.metrics import SUMMARY_COLUMNS, metric_range
from poison_core.paths import read_text

MAX_RESULTS_BYTES = 256 * 2**20
"""Largest results.json the report reads (a grid of thousands of cells is a few MiB)."""

Name = Annotated[str, Field(strict=True, min_length=1, max_length=256)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e12, le=1e12)]
Count = Annotated[int, Field(strict=True, ge=0, le=10**9)]
Interval = tuple[Number, Number]


class SummaryRow(BaseModel):
    """One (attack, defense) row: the mean over seeds of each metric, its interval and its n."""

    model_config = ConfigDict(frozen=True, extra="allow")

    attack: Name
    defense: Name
    n_seeds: Annotated[int, Field(strict=True, ge=1, le=100_000)]

    @model_validator(mode="after")
    def _metrics_in_range(self) -> "SummaryRow":
        extra = self.model_extra or {}
        for name in SUMMARY_COLUMNS:
            if name in ("attack", "defense", "n_seeds") or name not in extra:
                continue
            _check_metric(name, extra, metric_range(name))
        return self


def _check_metric(name: str, row: dict[str, Any], bounds: tuple[float, float] | None) -> None:
    """ValueError naming `name` unless its value, interval and n have the types and ranges a report needs."""
    value = row[name]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name}: {value!r} is outside {bounds[0]:g}..{bounds[1]:g}")
    ci = row.get(f"{name}_ci")
    if ci is not None:
        if (not isinstance(ci, list) or len(ci) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in ci)):
            raise ValueError(f"{name}_ci: must be [low, high] finite numbers, got {ci!r}")
        low, high = ci
        if low > high or (bounds is not None and not (bounds[0] <= low and high <= bounds[1])):
            raise ValueError(f"{name}_ci: {ci!r} is not an ordered interval within "
                             f"{'any range' if bounds is None else f'{bounds[0]:g}..{bounds[1]:g}'}")
    n = row.get(f"{name}_n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10**9):
        raise ValueError(f"{name}_n: must be a count 0..1e9, got {n!r}")
    if bounds is None and abs(value) > 1e12:
        raise ValueError(f"{name}: {value!r} is not a plausible count")


class ResultsFile(BaseModel):
    """The top level of results.json; keys the report does not read are kept as they are."""

    model_config = ConfigDict(frozen=True, extra="allow")

    summary: Annotated[list[SummaryRow], Field(min_length=1, max_length=1_000_000)]
    stage_seconds: dict[Name, Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1e9)]] = {}


def read_results(path: Path) -> ResultsFile:
    """The validated results in `path`; anything else is one InputError line naming the file and the field."""
    text = read_text(path, "results file", limit=MAX_RESULTS_BYTES)
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise InputError(f"{path} is not a Belladonna results file: not JSON ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a Belladonna results file: the top level is a {type(raw).__name__}, "
                         "not an object")
    try:
        return ResultsFile.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{path} is not a Belladonna results file: {format_validation_error(exc, ResultsFile)}") \
            from None


def _no_constant(name: str) -> Any:
    """json's hook for NaN / Infinity / -Infinity, which JSON (RFC 8259) does not have."""
    raise ValueError(f"{name} is not a JSON number")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
