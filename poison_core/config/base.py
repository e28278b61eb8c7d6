"""The base of every config model, and the pattern of names that become file and grid keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from poison_core.strict_numbers import refuse_bools

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class StrictModel(BaseModel):
    """Base of every config: immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """``true`` is not 1: a bool where a number is meant is refused (poison_core.strict_numbers)."""
        return refuse_bools(cls, data)
