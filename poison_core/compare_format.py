"""The comparison of two runs (:func:`poison_core.compare.compare_results`) as text: rows of plain cells
(for the terminal table), markdown (``--markdown``, the MLflow description, the Prefect artifact)."""

from __future__ import annotations

from typing import Any

from poison_core.metrics import SUMMARY_COLUMNS

HEADERS = ("attack", "defense", "metric", "base", "new", "change [95 % CI]", "p (Holm)", "verdict")
ORDER = {"worse": 0, "better": 1, "not comparable": 2, "no significant change": 3}


def _value(entry: dict[str, Any], side: str) -> str:
    value = entry.get(side)
    if value is None:
        return "-"
    n = entry.get(f"{side}_n")
    return f"{value:.3f}" + (f" (n={n})" if n is not None else "")


def _change(entry: dict[str, Any]) -> str:
    if entry.get("diff") is None:
        return "-"
    ci = entry.get("diff_ci")
    return f"{entry['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def table_rows(comparison: dict[str, Any], changes_only: bool = False) -> list[tuple[Any, ...]]:
    """One tuple of display cells per entry, the worse first; `changes_only` drops the unchanged."""
    entries = sorted(comparison["entries"], key=lambda e: (ORDER[e["verdict"]], e["attack"], e["defense"],
                                                            e["metric"]))
    if changes_only:
        entries = [e for e in entries if e["verdict"] != "no significant change"]
    rows = []
    for e in entries:
        verdict = e["verdict"] + (f": {'; '.join(e['reasons'][:3])}" if e.get("reasons") else "")
        if e["verdict"] == "no significant change" and e.get("p") is None:
            verdict += " (not tested: fewer than two seeds)"
        p = e.get("p_holm")
        rows.append((e["attack"], e["defense"], SUMMARY_COLUMNS.get(e["metric"], e["metric"]), _value(e, "base"),
                     _value(e, "new"), _change(e), "-" if p is None else f"{p:.3g}", verdict))
    return rows


def headline(comparison: dict[str, Any]) -> str:
    """One line: the counts per verdict and whether anything got worse."""
    counts = comparison["counts"]
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    verdict = "REGRESSION" if comparison["regression"] else "no regression"
    return f"{verdict}: " + (", ".join(parts) or "nothing compared")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def to_markdown(comparison: dict[str, Any], changes_only: bool = False, escape_brackets: bool = False) -> str:
    """The comparison as markdown: a headline, the run-level notes and reasons, then the table."""
    esc = _escape if escape_brackets else (lambda s: s.replace("|", "\\|"))
    base, new = comparison["base"], comparison["new"]
    lines = [f"**{headline(comparison)}** (base {base.get('run_id') or '?'} -> new {new.get('run_id') or '?'}; "
             f"Welch t over seeds, two-proportion test for pooled counts, Holm over {comparison['family_size']} "
             f"tests at alpha {comparison['alpha']})", ""]
    for reason in comparison["run"]:
        lines.append(f"* not comparable: {esc(reason)}")
    for note in comparison["notes"]:
        lines.append(f"* {esc(note)}")
    rows = table_rows(comparison, changes_only)
    if rows:
        lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    elif changes_only:
        lines += ["", "No cell changed significantly."]
    return "\n".join(lines).strip() + "\n"
