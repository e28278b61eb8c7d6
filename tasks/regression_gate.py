"""The end of a benchmark run: keep its results in the run history and, when asked (``compare: {to:
previous}`` in the config, or the flow's `compare_to`), the nightly regression gate.

The gate compares the run with the previous completed run of the same benchmark and store (the run
folder's history, :mod:`tasks.run_history`) with :func:`poison_core.compare.compare_results`, and
records the comparison: in results.json (``comparison``), on the MLflow parent run (tags
``regression: true|false``, ``regression.worse``, the table at the top of its description, the artifact
``comparison.md``), as a Prefect markdown artifact, and as the Prefect event ``belladonna.regression``
(resource ``belladonna.benchmark.<name>``, label ``belladonna.worse`` "true" / "false"), which the
``notify_on_regression`` automation in prefect.yaml turns into a notification once the user gives it a
notification block. A run with regressions ends Completed, or Failed with `fail_on_regression`
(:class:`RegressionError`, raised after everything is written). The HTML report page is written next
to results.json and uploaded to MLflow for every run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from infra import mlflow_history
from infra.storage import Store
from poison_core.compare import Thresholds, compare_results
from poison_core.compare_format import headline, to_markdown
from poison_core.config import BenchmarkConfig
from tasks import run_history, store_history

log = logging.getLogger(__name__)
EVENT = "belladonna.regression"


class RegressionError(RuntimeError):
    """A run the gate found worse than the previous one, under ``fail_on_regression``."""


def previous_run(benchmark_dir: Path, store: str, mlflow: dict[str, Any] | None = None
                 ) -> tuple[str, dict[str, Any]] | None:
    """The newest completed run of this benchmark written against the same store, if any: from the run
    folder's history, else (a fresh machine) the store's own history when the store is remote
    (tasks.store_history), else the newest FINISHED MLflow parent run of the benchmark and store at
    `mlflow`'s tracking URI (infra.mlflow_history; `mlflow`'s run id, this run's own, is skipped). A run
    the gate failed (``fail_on_regression``) is kept in the history but is no base: comparing the next
    run with it would accept the regression the night after it was caught."""
    def usable(results: dict[str, Any]) -> bool:
        return results.get("store") == store and not (results.get("regression_gate") or {}).get("failed")

    for run_id, results in reversed(run_history.history(benchmark_dir, limit=1000)):
        if usable(results):
            return run_id, results
    if store_history.is_remote(store):
        try:
            for run_id, results in reversed(store_history.history(Store(store), benchmark_dir.name)):
                if usable(results):
                    log.info("regression gate: previous run %s found in %s", run_id, store)
                    return run_id, results
        except Exception as exc:  # noqa: BLE001 - an unreadable store history means look elsewhere
            log.warning("regression gate: the run history in %s is not readable: %s", store, exc)
    if mlflow and mlflow.get("tracking_uri"):
        return mlflow_history.previous_run(mlflow["tracking_uri"], benchmark_dir.name, store, mlflow.get("run_id"))
    return None


def record_run(result: dict[str, Any], cfg: BenchmarkConfig, benchmark_dir: Path, started: float,
               compare_to: str | None = None, fail_on_regression: bool | None = None) -> dict[str, Any]:
    """Give the run its id, compare it when asked, write it to the history, and record the comparison."""
    run_id = run_history.new_run_id(started, (result.get("prefect") or {}).get("flow_run_id"))
    result["provenance"] = {**result.get("provenance", {}), "run_id": run_id,
                            "config_hash": _config_hash(cfg), "seeds": list(cfg.seeds)}
    settings = cfg.compare
    target = compare_to if compare_to is not None else settings.to
    fail = settings.fail_on_regression if fail_on_regression is None else fail_on_regression
    if target not in (None, "", "none", "previous"):
        raise ValueError(f"compare_to: {target!r} is not one of previous, none")
    comparison = None
    if target == "previous":
        found = previous_run(benchmark_dir, result.get("store"), result.get("mlflow"))
        if found is None:
            log.info("regression gate: no previous completed run of %s in %s", cfg.name, benchmark_dir)
            result["comparison"] = None
        else:
            thresholds = Thresholds(min_abs=settings.min_abs_change, min_rel=settings.min_rel_change,
                                    alpha=settings.alpha)
            comparison = compare_results(found[1], result, thresholds)
            result["comparison"] = comparison
        result["regression_gate"] = {"failed": bool(fail and comparison and comparison["regression"]),
                                     "fail_on_regression": bool(fail)}
    path = run_history.write_run(result, benchmark_dir, run_id)
    log.info("results: %s", path.resolve())
    page = _html(path, cfg)
    _record_store(result.get("store"), cfg.name, run_id, path, page)
    _record_mlflow(result, path, page, comparison)
    if comparison is not None:
        _record_prefect(cfg.name, run_id, comparison)
        log.warning("regression gate: %s", headline(comparison))
        if result["regression_gate"]["failed"]:
            raise RegressionError(f"{cfg.name} run {run_id}: {headline(comparison)} against run "
                                  f"{comparison['base'].get('run_id')} (see {path})")
    return result


def _config_hash(cfg: BenchmarkConfig) -> str:
    from infra.storage import content_hash

    return content_hash(cfg.model_dump(mode="json"))


def _html(results_path: Path, cfg: BenchmarkConfig) -> Path | None:
    """The report page next to results.json (a failure is a warning: the results are already written)."""
    try:
        from tasks.html_report import write_report_for

        return write_report_for(results_path, results_path.parent / "report.html", history=cfg.compare.history)
    except Exception as exc:  # noqa: BLE001 - the page is a convenience, never the reason a run fails
        log.warning("report page not written: %s", exc)
        return None


def _record_store(store: str | None, name: str, run_id: str, results_path: Path, page: Path | None) -> None:
    """The run's results and page in a remote store's own history too (tasks.store_history), so a machine
    that sees only the store can report and compare; a failure is a warning (the local copy is written)."""
    if not store or not store_history.is_remote(store):
        return
    try:
        log.info("run history: %s", store_history.write_run(Store(store), name, run_id, results_path, page))
    except Exception as exc:  # noqa: BLE001 - the results are written locally and in MLflow
        log.warning("run history not written to %s: %s", store, exc)


def _record_mlflow(result: dict[str, Any], results_path: Path, page: Path | None,
                   comparison: dict[str, Any] | None) -> None:
    """results.json, the page and the comparison on the MLflow parent run; the verdict in its tags and
    at the top of its description."""
    mlflow_info = result.get("mlflow") or {}
    run_id, uri = mlflow_info.get("run_id"), mlflow_info.get("tracking_uri")
    if not run_id or not uri:
        return
    try:
        from infra.mlflow_runs import DESCRIPTION_TAG
        from infra.tracking import Tracker

        tracker = Tracker(uri, experiment=(result["provenance"]["config"] or {}).get("name", "belladonna"))
        client = tracker.client
        client.log_artifact(run_id, str(results_path))
        if page is not None:
            client.log_artifact(run_id, str(page))
        if comparison is None:
            return
        gate = result.get("regression_gate") or {}
        tracker.set_tags({"regression": str(comparison["regression"]).lower(),
                          "regression.worse": str(comparison["counts"]["worse"]),
                          "regression.base_run": str(comparison["base"].get("run_id")),
                          "regression.gate_failed": str(bool(gate.get("failed"))).lower()}, run_id=run_id)
        # as metrics too: the runs list can show them as columns and sort by them
        tracker.log_metrics({f"regression.{verdict.replace(' ', '_')}": float(n)
                             for verdict, n in comparison["counts"].items()}, run_id=run_id)
        tracker.log_text(to_markdown(comparison), "comparison.md", run_id=run_id)
        old = client.get_run(run_id).data.tags.get(DESCRIPTION_TAG, "")
        tracker.set_tags({DESCRIPTION_TAG: mlflow_history.with_comparison(old, comparison)}, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - tracking trouble is logged; results.json has it all
        log.warning("comparison not recorded in MLflow: %s", exc)


def _record_prefect(name: str, run_id: str, comparison: dict[str, Any]) -> None:
    """A markdown artifact with the comparison and the ``belladonna.regression`` event."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    from tasks.report import _artifact_key

    create_markdown_artifact(markdown=f"# {name}: compared with the previous run\n\n{to_markdown(comparison)}",
                             key=f"{_artifact_key(name)}-comparison", description=headline(comparison))
    worse = [f"{e['attack']}/{e['defense']}/{e['metric']}" for e in comparison["entries"] if e["verdict"] == "worse"]
    emit_event(event=EVENT, resource={"prefect.resource.id": f"belladonna.benchmark.{name}",
                                      "prefect.resource.name": name,
                                      "belladonna.worse": str(comparison["regression"]).lower()},
               payload={"headline": headline(comparison), "run_id": run_id, "base_run_id": comparison["base"].get(
                   "run_id"), "counts": comparison["counts"], "worse": worse[:50], "at": time.time()})
