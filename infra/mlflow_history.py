"""Runs found through MLflow, for a machine whose run folder has no history (a fresh worker pointed at
the same tracking server): the newest FINISHED parent run of the same benchmark and store, found with
MLflow's public ``search_runs`` on the tags the flow sets (``benchmark``, ``store``), its results read
from the ``results.json`` artifact the flow logs (tasks.regression_gate). And the description that the
regression gate writes on the parent run: the verdict first, then the results table, then the changes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from poison_core.compare_format import headline, to_markdown

log = logging.getLogger(__name__)
MAX_CANDIDATES = 20
"""Newest matching parent runs looked at (each a results.json download until one qualifies)."""
MAX_TAG_LEN = 8000
COMPARED = "## Compared with the previous run"


def _quoted(value: str) -> str | None:
    """`value` as an MLflow filter string literal, or None when it cannot be quoted safely."""
    return None if "'" in value or "\\" in value else f"'{value}'"


def previous_run(tracking_uri: str, benchmark: str, store: str,
                 exclude_run_id: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """(run id, results) of the newest FINISHED MLflow parent run of `benchmark` on `store` whose
    results.json artifact is there and whose gate did not fail; None if there is none (or the tracking
    store cannot be read: a warning)."""
    name, root = _quoted(benchmark), _quoted(store)
    if name is None or root is None:
        log.warning("no MLflow lookup of a previous run: a quote in the benchmark name or store")
        return None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(benchmark)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], max_results=MAX_CANDIDATES,
                                  filter_string=f"tags.benchmark = {name} and tags.store = {root} "
                                                "and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
    except Exception as exc:  # noqa: BLE001 - an unreachable tracking server means no base, not a failed run
        log.warning("no MLflow lookup of a previous run at %s: %s", tracking_uri, exc)
        return None
    for run in runs:
        if run.info.run_id == exclude_run_id or "mlflow.parentRunId" in run.data.tags:
            continue
        results = _results(client, run.info.run_id)
        if results is None or results.get("store") != store or (results.get("regression_gate") or {}).get("failed"):
            continue
        run_id = (results.get("provenance") or {}).get("run_id") or run.info.run_id
        log.info("regression gate: previous run %s found in MLflow (run %s)", run_id, run.info.run_id)
        return run_id, results
    return None


def _results(client: Any, mlflow_run_id: str) -> dict[str, Any] | None:
    """The run's results.json artifact as a dict, or None (absent, unreadable, not an object)."""
    with tempfile.TemporaryDirectory(prefix="belladonna-mlflow-") as tmp:
        try:
            path = client.download_artifacts(mlflow_run_id, "results.json", tmp)
            results = json.loads(Path(path).read_text())
        except Exception as exc:  # noqa: BLE001 - mlflow raises many kinds; such a run is no base
            log.info("MLflow run %s has no readable results.json: %s", mlflow_run_id, exc)
            return None
    return results if isinstance(results, dict) and isinstance(results.get("summary"), list) else None


def verdict_line(comparison: dict[str, Any], limit: int = 5) -> str:
    """One markdown line: the verdict, the base run and the first `limit` worse (attack/defense metric)."""
    worse = [f"{e['attack']}/{e['defense']} {e['metric']}" for e in comparison["entries"] if e["verdict"] == "worse"]
    line = f"**{headline(comparison)}** against run {comparison['base'].get('run_id') or '?'}"
    if worse:
        more = f" and {len(worse) - limit} more" if len(worse) > limit else ""
        line += ": worse " + ", ".join(worse[:limit]) + more
    return line + "."


def with_comparison(description: str, comparison: dict[str, Any]) -> str:
    """The parent run's description with the verdict as its first line and the changed rows after the
    results table (just above its first ``## `` section), cut to MLflow's tag length."""
    head, sep, rest = description.partition("\n## ")
    section = f"{COMPARED}\n\n" + to_markdown(comparison, changes_only=True, escape_brackets=True)
    # a hard line break (two spaces), not a new paragraph: the verdict and the summary line take the
    # height of two lines, so the run page shows the table's header and first row above "Show more"
    text = f"{verdict_line(comparison)}  \n{head.strip()}\n\n{section.rstrip()}\n" + (f"\n## {rest}" if sep else "")
    return text[:MAX_TAG_LEN]
