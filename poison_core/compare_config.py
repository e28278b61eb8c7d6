"""The ``compare`` section of a benchmark config: the nightly regression gate (see docs/compare.md).

``compare: {to: previous}`` makes the benchmark flow compare each completed run with the previous
completed run of the same benchmark (:mod:`poison_core.compare`), record the verdicts in results.json,
MLflow and Prefect, and emit the ``belladonna.regression`` event; ``fail_on_regression`` ends a run
with a ``worse`` verdict ``Failed`` instead of ``Completed``. The thresholds play the role of MLflow's
``MetricThreshold``: the smallest absolute / relative change worth flagging.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CompareConfig(BaseModel):
    """Compare with the previous run (`to`), and what counts as a change worth flagging."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    to: Literal["previous"] | None = None
    fail_on_regression: bool = False
    min_abs_change: float = Field(0.0, ge=0, le=1e12)
    min_rel_change: float = Field(0.0, ge=0, le=1e6)
    alpha: float = Field(0.05, gt=0, lt=1)
    history: int = Field(10, ge=1, le=1000, description="runs shown in the report page's trend")
