"""Growth of crafting time with the number of poisons (budget 0.5, 1, 2, 4 % of 2,000 images) and
with the ensemble size (Witches' Brew surrogates K, MetaPoison models M), on the setting of
:mod:`benchmarks.throughput`, in this process on one thread.

Each series gets the exponent b of a least-squares fit seconds ~ a * x^b over its points: b <= 1
means the time grows no faster than linearly (b < 1: fixed costs are amortised).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from benchmarks.throughput import TARGETED, craft_once, surrogates
from poison_core.data import DatasetSplits

log = logging.getLogger(__name__)

BUDGETS = (0.005, 0.01, 0.02, 0.04)
BREW = {"steps": 40, "restarts": 1, "augment": False}
META = {"n_models": 2, "stagger_epochs": 4, "unroll_steps": 2, "steps": 4, "drop_period": 8, "lr": 0.05,
        "batch_size": 64, "epoch_batches": 4}


def exponent(xs: list[float], seconds: list[float]) -> float:
    """b of the least-squares fit log(seconds) = log(a) + b * log(x)."""
    return float(np.polyfit(np.log(xs), np.log(seconds), 1)[0])


def _series(name: str, attack: str, axis: str, points: list[tuple[float, dict[str, Any], Any, list]],
            splits: DatasetSplits) -> list[dict[str, Any]]:
    rows, xs, times = [], [], []
    for x, params, threat, models in points:
        seconds, n_poison, _ = craft_once(attack, params, threat, splits, models)
        xs.append(x)
        times.append(seconds)
        rows.append({"series": name, axis: x, "poisons": n_poison, "seconds": round(seconds, 2)})
        log.info("%s %s=%s: %.2fs", name, axis, x, seconds)
    b = round(exponent(xs, times), 2)
    for row in rows:
        row["exponent"] = b
    return rows


def growth(splits: DatasetSplits, quick: bool = False) -> list[dict[str, Any]]:
    """Rows (series, x, poisons, seconds, exponent of the series)."""
    models = surrogates(splits, n=8 if not quick else 4)
    brew = {**BREW, "steps": 10} if quick else BREW
    sizes = [1, 2, 4] if quick else [1, 2, 4, 8]
    budgets = [(100 * b, TARGETED.model_copy(update={"budget": b})) for b in BUDGETS]
    rows = _series("witches_brew_vs_budget", "witches_brew", "budget_pct",
                   [(pct, brew, threat, models[:2]) for pct, threat in budgets], splits)
    rows += _series("metapoison_vs_budget", "metapoison", "budget_pct",
                    [(pct, META, threat, models[:1]) for pct, threat in budgets], splits)
    rows += _series("witches_brew_vs_surrogates", "witches_brew", "ensemble",
                    [(k, brew, TARGETED, models[:k]) for k in sizes], splits)
    rows += _series("metapoison_vs_models", "metapoison", "ensemble",
                    [(m, {**META, "n_models": m}, TARGETED, models[:1]) for m in sizes], splits)
    return rows
