"""``belladonna run --recompute``: which stored outputs a run recomputes although they are stored.

A target is a stage (that stage and every stage after it, since their inputs are recomputed too), an
attack's or a defense's grid key (its crafts, its victims and its cells), or ``all``. Nothing is
deleted: a forced output is written again under its own key, and the rerun says ``forced``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from poison_core.config import BenchmarkConfig
from poison_core.errors import ConfigError

STAGES = ("ingest", "pretrain", "craft", "retrain", "evaluate")


@dataclass(frozen=True)
class Recompute:
    """The targets of ``--recompute``; ``Recompute()`` forces nothing."""

    targets: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, targets: Iterable[str] | None, cfg: BenchmarkConfig) -> "Recompute":
        """Check every target against the stages and `cfg`'s grid; one ConfigError line for the first unknown."""
        members = {a.key for a in cfg.attacks} | {d.key for d in cfg.defenses}
        chosen = frozenset(targets or ())
        for target in sorted(chosen):
            if target != "all" and target not in STAGES and target not in members:
                raise ConfigError(f"--recompute: {target!r} is not 'all', a stage ({', '.join(STAGES)}) or an attack "
                                  f"or defense of benchmark {cfg.name!r} ({', '.join(sorted(members))})")
        return cls(chosen)

    def forces(self, stage: str, attack: str | None = None, defense: str | None = None) -> bool:
        """Whether the output of `stage` for (`attack`, `defense`) is recomputed."""
        if "all" in self.targets:
            return True
        position = STAGES.index(stage)
        if any(STAGES.index(t) <= position for t in self.targets if t in STAGES):
            return True
        return bool({attack, defense} & self.targets)
