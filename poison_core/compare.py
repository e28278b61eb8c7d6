"""Compare a benchmark run with an earlier one, cell by cell and metric by metric, with a verdict each:
``better``, ``worse``, ``no significant change`` or ``not comparable`` (and why).

The test fits the metric's kind (:func:`poison_core.metrics.metric_kind`): a rate over seeds is
compared with Welch's t-test on the per-seed values; targeted success, pooled over poison keys, with
the two-proportion score test and Newcombe's interval (:mod:`poison_core.compare_stats`). The p-values
of every (cell, metric) compared are adjusted together with Holm's method. A change is flagged when it
is significant after that adjustment *and* at least as large as the user's thresholds (absolute and
relative, per metric if wished: the role of MLflow's ``MetricThreshold``; airspeed velocity's
``asv compare`` does the same for benchmark timings with a factor).

Which direction is worse is the defender's view and is said once, in :data:`DIRECTION`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poison_core.compare_stats import holm, two_proportions, welch
from poison_core.metrics import key_count_columns, metric_kind, metric_range

# +1: a higher value is better for the defender; -1: a higher value is worse. Metrics not named here
# are not compared (counts, settings, timings). ``baseline_x`` is the no-poison victim's ``x``.
DIRECTION: dict[str, int] = {
    "clean_acc": +1, "baseline_clean_acc": +1,
    "acc_drop": -1,
    "asr": -1, "baseline_asr": -1,
    "pair_flip_rate": -1, "baseline_pair_flip_rate": -1,
    "target_success": -1, "baseline_target_success": -1,
    "adv_prob": -1, "baseline_adv_prob": -1,
    "filter_precision": +1, "filter_recall": +1, "isolation_precision": +1, "isolation_recall": +1,
}
CERTIFIED_PREFIX = "certified_acc_r"  # DPA's certified accuracy at each radius: higher is better
VERDICTS = ("worse", "better", "no significant change", "not comparable")
# Config fields that do not change what a cell measures (where and how fast it runs).
IGNORED_CONFIG = ("name", "execution", "compare")


def direction(name: str) -> int | None:
    """+1 when higher is better, -1 when higher is worse, None when the metric is not compared."""
    if name.removeprefix("baseline_").startswith(CERTIFIED_PREFIX):
        return +1
    return DIRECTION.get(name)


@dataclass(frozen=True)
class Thresholds:
    """The smallest change worth flagging: |new - base| >= min_abs and |new - base| >= min_rel * |base|;
    `per_metric` overrides both for one metric, as ``{"asr": (0.05, 0.0)}``."""

    min_abs: float = 0.0
    min_rel: float = 0.0
    alpha: float = 0.05
    per_metric: dict[str, tuple[float, float]] = field(default_factory=dict)

    def large_enough(self, name: str, base: float, diff: float) -> bool:
        min_abs, min_rel = self.per_metric.get(name, (self.min_abs, self.min_rel))
        return abs(diff) >= min_abs and abs(diff) >= min_rel * abs(base)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differing_fields(base: Any, new: Any, prefix: str) -> list[str]:
    """Dotted names of the fields that differ, as ``config.victim.train.epochs: 2 -> 3``."""
    a, b = _flatten(base, prefix), _flatten(new, prefix)
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _short(value: Any) -> str:
    text = "(absent)" if value is None else repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def run_differences(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why two runs cannot be compared at all: differing dataset fingerprint, victim recipe, threat,
    seeds or other grid-wide config fields (attacks and defenses are checked per cell)."""
    pb, pn = base.get("provenance") or {}, new.get("provenance") or {}
    if not pb.get("config") or not pn.get("config"):
        missing = [w for w, p in (("base", pb), ("new", pn)) if not p.get("config")]
        return [f"provenance.config: absent from the {' and '.join(missing)} run (written by an older version)"]
    out = []
    if pb.get("dataset_fingerprint") != pn.get("dataset_fingerprint"):
        out.append(f"dataset fingerprint: {_short(pb.get('dataset_fingerprint'))} -> "
                   f"{_short(pn.get('dataset_fingerprint'))}")
    skip = (*IGNORED_CONFIG, "attacks", "defenses")
    cb = {k: v for k, v in pb["config"].items() if k not in skip}
    cn = {k: v for k, v in pn["config"].items() if k not in skip}
    return out + differing_fields(cb, cn, "config")


def _members(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """A config's attacks or defenses by key (``id`` when given, else ``name``)."""
    return {m.get("id") or m["name"]: m for m in cfg.get(kind) or []}


def _by_cell(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        cells[(row["attack"], row["defense"])].append(row)
    return cells


def _values(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([r[name] for r in rows if isinstance(r.get(name), (int, float)) and not isinstance(r[name], bool)
                     and not math.isnan(r[name])], dtype=np.float64)


def _test(name: str, base_rows: list[dict], new_rows: list[dict], confidence: float) -> dict[str, Any] | None:
    """One metric of one cell: both means, the difference with its interval, the test and its p."""
    if metric_kind(name) == "keys":
        hits, trials = key_count_columns(name)
        counts = [(sum(int(r.get(hits, 0)) for r in rs), sum(int(r.get(trials, 0)) for r in rs))
                  for rs in (base_rows, new_rows)]
        if not all(n for _, n in counts):
            return None
        (h1, n1), (h2, n2) = counts
        res = two_proportions(h1, n1, h2, n2, confidence)
        assert res is not None
        return {"test": "two-proportion z (pooled over keys), Newcombe interval", "base": h1 / n1, "new": h2 / n2,
                "base_n": n1, "new_n": n2, "diff": res["diff"], "diff_ci": list(res["ci"]),
                "statistic": res["z"], "p": res["p"]}
    a, b = _values(base_rows, name), _values(new_rows, name)
    if not a.size or not b.size:
        return None
    res = welch(a, b, confidence)
    out = {"test": "Welch t over seeds", "base": float(a.mean()), "new": float(b.mean()),
           "base_n": int(a.size), "new_n": int(b.size), "diff": float(b.mean() - a.mean())}
    if res is None:
        return {**out, "test": "none (fewer than two seeds)", "diff_ci": None, "statistic": None, "p": None}
    bounds = metric_range(name)  # a difference of two values in [lo, hi] lies in [lo - hi, hi - lo]
    ci = list(res["ci"]) if bounds is None else [max(res["ci"][0], bounds[0] - bounds[1]),
                                                 min(res["ci"][1], bounds[1] - bounds[0])]
    return {**out, "diff_ci": ci, "statistic": res["t"], "df": res["df"], "p": res["p"]}


def compare_results(base: dict[str, Any], new: dict[str, Any], thresholds: Thresholds | None = None,
                    confidence: float = 0.95) -> dict[str, Any]:
    """The comparison of two results.json objects: ``run`` (grid-wide reasons they are not comparable),
    ``notes`` (differences that do not prevent it, e.g. the code version), ``entries`` (one per cell and
    metric, with its verdict), ``counts`` per verdict and ``regression`` (any ``worse``)."""
    thresholds = thresholds or Thresholds()
    pb, pn = base.get("provenance") or {}, new.get("provenance") or {}
    notes = []
    if base.get("code_version") != new.get("code_version"):
        notes.append(f"code version: {base.get('code_version')} -> {new.get('code_version')}")
    run_reasons = run_differences(base, new)
    base_cells, new_cells = _by_cell(base.get("rows") or []), _by_cell(new.get("rows") or [])
    attacks_b, attacks_n = _members(pb.get("config") or {}, "attacks"), _members(pn.get("config") or {}, "attacks")
    defenses_b, defenses_n = (_members(pb.get("config") or {}, "defenses"),
                              _members(pn.get("config") or {}, "defenses"))
    entries: list[dict[str, Any]] = []
    for cell in sorted(set(base_cells) | set(new_cells)):
        attack, defense = cell
        reasons = list(run_reasons)
        if cell not in base_cells or cell not in new_cells:
            reasons.append(f"cell only in the {'new' if cell not in base_cells else 'base'} run")
        else:
            reasons += differing_fields(attacks_b.get(attack), attacks_n.get(attack), f"config.attacks[{attack}]")
            reasons += differing_fields(defenses_b.get(defense), defenses_n.get(defense),
                                        f"config.defenses[{defense}]")
        rows_b, rows_n = base_cells.get(cell, []), new_cells.get(cell, [])
        names = sorted({k for r in [*rows_b, *rows_n] for k in r if direction(k) is not None})
        for name in names:
            entry: dict[str, Any] = {"attack": attack, "defense": defense, "metric": name}
            tested = _test(name, rows_b, rows_n, confidence) if not reasons else None
            if reasons:
                entry.update(verdict="not comparable", reasons=reasons)
            elif tested is None:
                entry.update(verdict="not comparable", reasons=[f"{name} absent from one run"])
            else:
                entry.update(tested)
            entries.append(entry)
    family = [e for e in entries if e.get("p") is not None]
    for entry, adjusted in zip(family, holm([e["p"] for e in family])):
        entry["p_holm"] = adjusted
    for entry in entries:
        if entry.get("verdict"):
            continue
        significant = entry.get("p_holm") is not None and entry["p_holm"] < thresholds.alpha
        if significant and entry["diff"] != 0 and thresholds.large_enough(entry["metric"], entry["base"],
                                                                          entry["diff"]):
            good = entry["diff"] * direction(entry["metric"]) > 0
            entry["verdict"] = "better" if good else "worse"
        else:
            entry["verdict"] = "no significant change"
    counts = {v: sum(e["verdict"] == v for e in entries) for v in VERDICTS}
    return {"base": _identity(base), "new": _identity(new), "run": run_reasons, "notes": notes,
            "alpha": thresholds.alpha, "confidence": confidence, "family_size": len(family),
            "thresholds": {"min_abs": thresholds.min_abs, "min_rel": thresholds.min_rel,
                           "per_metric": {k: list(v) for k, v in thresholds.per_metric.items()}},
            "counts": counts, "regression": counts["worse"] > 0, "entries": entries}


def _identity(results: dict[str, Any]) -> dict[str, Any]:
    prov = results.get("provenance") or {}
    return {"run_id": prov.get("run_id"), "name": (prov.get("config") or {}).get("name"),
            "code_version": results.get("code_version"), "config_hash": prov.get("config_hash"),
            "dataset_fingerprint": prov.get("dataset_fingerprint"),
            "mlflow_run_id": (results.get("mlflow") or {}).get("run_id")}
