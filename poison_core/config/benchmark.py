"""A benchmark: a grid of cells, every attack x every defense x every seed on one dataset and victim."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from poison_core.compare_config import CompareConfig
from poison_core.config.base import NAME_PATTERN, StrictModel
from poison_core.config.dataset import DatasetConfig
from poison_core.config.execution import ExecutionConfig
from poison_core.config.members import AttackConfig, DefenseConfig
from poison_core.config.threat_model import ThreatModel
from poison_core.config.victim import VictimConfig


class BenchmarkConfig(StrictModel):
    """A grid of cells: every attack x every defense x every seed on one dataset and victim."""

    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetConfig = DatasetConfig()
    victim: VictimConfig = VictimConfig()
    surrogate: VictimConfig | None = None
    n_surrogates: int = Field(1, ge=1, le=64)
    threat: ThreatModel = ThreatModel()
    attacks: tuple[AttackConfig, ...] = Field(min_length=1, max_length=256)
    defenses: tuple[DefenseConfig, ...] = Field(default_factory=lambda: (DefenseConfig(name="none"),),
                                                min_length=1, max_length=256)
    seeds: tuple[int, ...] = Field((0,), min_length=1, max_length=1000)
    execution: ExecutionConfig = ExecutionConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in seeds if not 0 <= s <= 2**32 - 1]
        if bad:
            raise ValueError(f"seed {bad[0]} is outside 0..4294967295")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @model_validator(mode="after")
    def _grid_names_unique(self) -> "BenchmarkConfig":
        for field_name in ("attacks", "defenses"):
            keys = [member.key for member in getattr(self, field_name)]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup:
                raise ValueError(f"{field_name}: {dup!r} appears twice; give each an `id`")
        return self

    def threat_for(self, attack: AttackConfig) -> ThreatModel:
        return attack.threat or self.threat

    @model_validator(mode="after")
    def _surrogate_is_supervised(self) -> "BenchmarkConfig":
        if self.surrogate is not None and self.surrogate.protocol != "supervised":
            raise ValueError("surrogate.protocol: the attacker's surrogates train supervised; "
                             "set the protocol on victim")
        return self

    def surrogate_or_victim(self) -> VictimConfig:
        """The attacker's recipe: `surrogate`, else the victim's architecture and recipe, supervised."""
        return self.surrogate or self.victim.supervised()
