"""Run history beyond the local run folder, on real stores: the history an S3 store keeps beside its
outputs (a moto server on 127.0.0.1; written by the end of a run, read back by `belladonna report` and
`compare`, and the gate's base on a machine with an empty run folder), and the gate's base found
through MLflow's search_runs on a sqlite tracking store (read back with MLflow's own client)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from infra.tracking import Tracker
from poison_core.config import load_benchmark
from tasks import regression_gate, report
from tests.test_compare import CONFIG, results

GATED = CONFIG + "compare: {to: previous}\n"
DAY = 86_400
T0 = 1_735_783_200  # 2025-01-02T02:00:00Z


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the Prefect artifact and event need a flow run; tests/test_nightly.py checks them on a real server
    monkeypatch.setattr(regression_gate, "_record_prefect", lambda *_: None)


def finish(run_dir: Path, day: int, store: str, asr_shift: float = 0.0, mlflow: dict | None = None) -> dict:
    """The end of a run as the flow does it (tasks.regression_gate.record_run) for a run started on `day`."""
    result = results(GATED, asr_shift=asr_shift)
    result.update(store=store, mlflow=mlflow or {}, prefect={"flow_run_id": f"{day:08x}-0000"})
    return regression_gate.record_run(result, load_benchmark(GATED), run_dir / "tiny", T0 + day * DAY)


def belladonna(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_an_s3_store_keeps_the_run_history_that_report_and_compare_read(s3_env, tmp_path):
    first = finish(tmp_path / "a", 0, s3_env.root)
    second = finish(tmp_path / "a", 1, s3_env.root)
    third = finish(tmp_path / "a", 2, s3_env.root, asr_shift=0.3)
    ids = [r["provenance"]["run_id"] for r in (first, second, third)]
    assert ids == sorted(ids) and third["comparison"]["base"]["run_id"] == ids[1]

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix="store/runs/")["Contents"]}
    assert {f"store/runs/tiny/{i}/results.json" for i in ids} | {"store/runs/tiny/latest",
                                                                  "store/runs/tiny/results.json"} <= keys
    assert f"store/runs/tiny/{ids[2]}/report.html" in keys
    latest = s3.get_object(Bucket=s3_env.bucket, Key="store/runs/tiny/latest")["Body"].read().decode()
    assert latest.strip() == ids[2]
    stored = json.loads(s3.get_object(Bucket=s3_env.bucket, Key=f"store/runs/tiny/{ids[2]}/results.json")["Body"]
                        .read())
    assert stored["comparison"]["regression"] and stored["provenance"]["run_id"] == ids[2]

    # a machine that sees only the store: no run folder at all
    worse = belladonna("compare", "tiny/previous", "tiny", "--store", s3_env.root, "--out", str(tmp_path / "none"))
    assert worse.returncode == 1 and "REGRESSION" in worse.stdout, worse.stdout + worse.stderr
    same = belladonna("compare", f"{s3_env.root}/runs/tiny/latest~2", f"{s3_env.root}/runs/tiny/previous")
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    page = tmp_path / "page.html"
    shown = belladonna("report", f"{s3_env.root}/runs/tiny/latest", "--html", str(page))
    assert shown.returncode == 0 and "badnets" in shown.stdout, shown.stderr
    html = page.read_text()
    assert all(i in html for i in ids)  # the trend over the three runs read from the store
    missing = belladonna("report", "nothing/latest", "--store", s3_env.root)
    assert missing.returncode == 2 and "runs/nothing has no completed run" in missing.stderr, missing.stderr

    # the gate on a fresh run folder finds its base in the store's history
    fourth = finish(tmp_path / "fresh", 3, s3_env.root)
    assert fourth["comparison"]["base"]["run_id"] == ids[2]


def test_the_gate_finds_the_previous_run_in_mlflow_when_the_run_folder_has_none(tmp_path):
    """Parent runs of one benchmark on a sqlite store: the newest FINISHED one on the same store with a
    results.json artifact and a gate that did not fail is the base; the description then opens with
    the verdict and the results table, the changes after it, the counts as metrics."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="tiny", run_dir=tmp_path)
    store = "/tmp/store"
    base = results(GATED, run_id="20250101T020000Z-base0000")

    def parent(day: int, where: str, content: dict | None, fail: bool = False) -> str:
        tags = {"benchmark": "tiny", "store": where}
        try:
            with tracker.parent_run("tiny", tags=tags, start_time=(T0 + day * DAY) * 1000) as run_id:
                if content is not None:
                    tracker.log_text(json.dumps(content), "results.json")
                if fail:
                    raise RuntimeError("the run failed")
        except RuntimeError:
            pass
        return run_id

    parent(0, store, base)
    parent(1, "s3://elsewhere/store", results(GATED, run_id="20250102T020000Z-other000"))
    parent(2, store, {**results(GATED, run_id="20250103T020000Z-failed00"), "regression_gate": {"failed": True}})
    parent(3, store, results(GATED, run_id="20250104T020000Z-crashed0"), fail=True)
    parent(4, store, None)  # no results.json artifact
    client = MlflowClient(tracking_uri=uri)
    statuses = [r.info.status for r in client.search_runs([tracker.experiment_id])]
    assert sorted(statuses) == ["FAILED"] + ["FINISHED"] * 4

    new = results(GATED, asr_shift=0.3)
    cfg = load_benchmark(GATED)
    described = f"{report.markdown_table(new['summary'], True)}\n\n{report.NOTES}\n\n{report.INTERVALS_NOTE}"
    with tracker.parent_run("tiny", tags={"benchmark": "tiny", "store": store,
                                          "mlflow.note.content": report._description(cfg, described, {}, None)},
                            start_time=(T0 + 5 * DAY) * 1000) as current:
        pass
    new.update(store=store, mlflow={"tracking_uri": uri, "run_id": current}, prefect={"flow_run_id": "5-0"})
    done = regression_gate.record_run(new, cfg, tmp_path / "fresh" / "tiny", T0 + 5 * DAY)
    assert done["comparison"]["base"]["run_id"] == "20250101T020000Z-base0000" and done["comparison"]["regression"]

    run = client.get_run(current)
    tags, metrics = run.data.tags, run.data.metrics
    assert (tags["regression"], tags["regression.worse"], tags["regression.gate_failed"]) == ("true", "1", "false")
    assert tags["regression.base_run"] == "20250101T020000Z-base0000"
    assert metrics["regression.worse"] == 1.0 and metrics["regression.not_comparable"] == 0.0
    assert metrics["regression.no_significant_change"] >= 1.0
    text = tags["mlflow.note.content"]
    assert text.startswith("**REGRESSION: 1 worse") and "against run 20250101T020000Z-base0000: worse badnets/" \
        "trimmed_loss asr." in text.splitlines()[0]
    order = [text.index(s) for s in ("**tiny**: 16 cells", "| attack | defense | seeds |",
                                     "## Compared with the previous run", "## Notes")]
    assert order == sorted(order), text
    artifacts = {a.path for a in client.list_artifacts(current)}
    assert {"results.json", "comparison.md"} <= artifacts

    # nothing qualifies on another store: no base, and the run is still recorded
    other = results(GATED)
    other.update(store="/tmp/another", mlflow={"tracking_uri": uri, "run_id": current}, prefect={"flow_run_id": "6"})
    assert regression_gate.record_run(other, cfg, tmp_path / "fresh2" / "tiny", T0 + 6 * DAY)["comparison"] is None
