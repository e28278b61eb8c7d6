"""Coverage of availability attacks: the fraction of the training set that carries the noise.

Huang et al. (Unlearnable Examples, ICLR 2021, Sec. 4.2 and Table 2) and Fowl et al. (NeurIPS 2021)
report test accuracy against the percentage of protected training data, 20/40/60/80/100 %. In
Belladonna the coverage IS the threat model's budget: every availability attack protects
floor(budget * n) uniformly drawn samples (all of them at budget 1.0), so a coverage curve is one
benchmark cell per budget. :func:`coverage_threats` builds those threat models; the pipeline runs
each and plots accuracy against :func:`coverage`: :func:`coverage_curves` finds, in a benchmark's
attacks, the families that differ only in budget and reads their victims' accuracy off the summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from poison_core.config import AttackConfig, ThreatModel
from poison_core.errors import ConfigError
from poison_core.poisons import PoisonSet

DEFAULT_COVERAGES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)


def coverage_threats(threat: ThreatModel, coverages: Sequence[float] = DEFAULT_COVERAGES) -> list[ThreatModel]:
    """`threat` once per coverage, with budget = coverage (each in (0, 1])."""
    for value in coverages:
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"coverage: {value} is outside (0, 1]")
    return [threat.model_copy(update={"budget": float(value)}) for value in coverages]


def coverage(poison_set: PoisonSet) -> float:
    """The fraction of the training set that `poison_set` perturbs."""
    return len(poison_set) / poison_set.n_train


def coverage_curves(attacks: Sequence[AttackConfig], default: ThreatModel,
                    summary: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], dict[str, list[float]]]]:
    """Victim test accuracy against coverage, for every family of attack configs that share name,
    params and threat model except the budget, with at least two budgets.

    Returns family name -> (coverages, {defense: accuracies}); coverage 0 is the no-poison victim
    (the mean ``baseline_clean_acc`` of the family's cells). `summary` rows are the mean over
    seeds of each (attack key, defense) cell, as :func:`poison_core.evaluation.summarize` makes them.
    """
    families: dict[str, list[tuple[float, AttackConfig]]] = {}
    for attack in attacks:
        threat = attack.threat or default
        family = json.dumps({"name": attack.name, "params": attack.params,
                             "threat": threat.model_dump(mode="json", exclude={"budget"})}, sort_keys=True)
        families.setdefault(family, []).append((threat.budget, attack))
    curves: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
    for members in families.values():
        members.sort(key=lambda member: member[0])
        if len({budget for budget, _ in members}) < 2:
            continue
        rows = {(r["attack"], r["defense"]): r for r in summary}
        defenses = sorted({r["defense"] for r in summary if r["attack"] in {a.key for _, a in members}})
        by_defense: dict[str, list[float]] = {}
        for defense in defenses:
            found = [rows.get((a.key, defense)) for _, a in members]
            cells = [c for c in found if c is not None]
            if len(cells) < len(found):
                continue
            baseline = sum(float(c["baseline_clean_acc"]) for c in cells) / len(cells)
            by_defense[defense] = [baseline] + [float(c["clean_acc"]) for c in cells]
        if by_defense:
            name = members[0][1].name
            label = name if name not in curves else "+".join(a.key for _, a in members)
            curves[label] = ([0.0] + [budget for budget, _ in members], by_defense)
    return curves
