"""The regression gate at the end of the benchmark flow (tasks.regression_gate), in process on the tiny
digits grid: with ``fail_on_regression`` a run found worse than the previous one ends Failed, and only
after recording everything (its run folder with the comparison, the latest pointer); the failed run is
kept for the record but is not the next run's base, so the gate keeps failing until the cause is fixed.

The previous run is the first run's own results.json with its BadNets ASR lowered in every seed (the
second run reuses every stored stage and measures exactly what the first did), so the regression is
known: that one cell and metric, and nothing else.
"""

from __future__ import annotations

import json

import pytest

from tasks.run_history import run_ids
from tests.pipeline_helpers import TINY_BENCHMARK

pytestmark = pytest.mark.slow
MOVED = 1000.0  # far outside ASR's range: significant after Holm whatever the two seeds' spread


def _lower_asr(record) -> None:
    results = json.loads(record.read_text())
    rows = [r for r in results["rows"] if r["attack"] == "badnets" and isinstance(r.get("asr"), float)]
    assert rows, results["rows"]
    for row in rows:
        row["asr"] -= MOVED
    record.write_text(json.dumps(results))


def test_fail_on_regression_ends_the_run_failed_after_recording_it(prefect_server, fresh_ray, tmp_path):
    from flows.benchmark import benchmark

    args = {"config": TINY_BENCHMARK, "store": str(tmp_path / "store"), "run_dir": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    bench = tmp_path / "runs" / "tiny-pipeline"
    benchmark(**args)
    [first] = run_ids(bench)
    _lower_asr(bench / first / "results.json")

    state = benchmark(**args, compare_to="previous", fail_on_regression=True, return_state=True)
    assert state.is_failed(), f"{state.name}: {state.message}"
    assert "REGRESSION: 1 worse" in state.message and f"against run {first}" in state.message, state.message
    runs = run_ids(bench)
    assert len(runs) == 2 and (bench / "latest").read_text().strip() == runs[1]
    failed = json.loads((bench / runs[1] / "results.json").read_text())
    comparison = failed["comparison"]
    assert comparison["base"]["run_id"] == first and comparison["regression"], comparison["counts"]
    assert [(e["attack"], e["metric"]) for e in comparison["entries"] if e["verdict"] == "worse"] == [
        ("badnets", "asr")]
    assert failed["regression_gate"] == {"failed": True, "fail_on_regression": True}

    again = benchmark(**args, compare_to="previous", fail_on_regression=True, return_state=True)
    assert again.is_failed(), f"{again.name}: {again.message}"  # compared with the first run again
    third = json.loads((bench / run_ids(bench)[-1] / "results.json").read_text())
    assert len(run_ids(bench)) == 3 and third["comparison"]["base"]["run_id"] == first

    completed = benchmark(**args, compare_to="previous", return_state=True)  # recorded, not failed
    assert completed.is_completed(), f"{completed.name}: {completed.message}"
    fourth = json.loads((bench / run_ids(bench)[-1] / "results.json").read_text())
    assert fourth["comparison"]["regression"] and fourth["comparison"]["base"]["run_id"] == first
    assert fourth["regression_gate"] == {"failed": False, "fail_on_regression": False}
