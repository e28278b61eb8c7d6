"""Which threat model a PoisonSet answers to: the one place that decides it.

A PoisonSet is held to the threat model of the benchmark attack that made it: that attack's own `threat`
when the config gives one, else the benchmark's `threat` (:meth:`BenchmarkConfig.threat_for`). Readers
know the attack to a different precision: the stage runner (tasks.stages.expected_threat) knows the grid
member from the store key, so it asks for that member (`member`) and gets one threat model; the audit
and export commands (poison_core.poisons.audit_file) know only the attack named in the file's
provenance, so with several configs of one attack (``id``) they get each distinct threat model of
those configs, in grid order, and the file must be a valid poison under one of them. Imported poisons
(the ``imported`` attack) answer to their grid member like crafted ones.
"""

from __future__ import annotations

from poison_core.config import BenchmarkConfig, ThreatModel
from poison_core.errors import AuditError


def answering_threats(cfg: BenchmarkConfig, attack: object, *, member: str | None = None,
                      what: str = "PoisonSet") -> tuple[ThreatModel, ...]:
    """The threat models `cfg` holds a PoisonSet made by the attack named `attack` to (of its grid member
    `member` only, when given): one per distinct threat model, in grid order. An AuditError naming `what`
    when `cfg` runs no such attack: there is no threat model to audit it against."""
    attacks = [a for a in cfg.attacks if a.name == attack and (member is None or a.key == member)]
    if not attacks:
        runs = ", ".join(sorted({a.key if member is not None else a.name for a in cfg.attacks}))
        made_by = f"attack {attack!r}" + (f" as member {member!r}" if member is not None else "")
        raise AuditError(f"{what}: made by {made_by}, which benchmark {cfg.name!r} does not run (it runs: {runs}); "
                         "there is no threat model to audit it against")
    return tuple(dict.fromkeys(cfg.threat_for(a) for a in attacks))
