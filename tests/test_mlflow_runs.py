"""What a user finds in MLflow, read back through the MLflow client: on a sqlite store, on a real
`mlflow server` on 127.0.0.1, and after a real benchmark flow (parent metrics and description, cell
tags and params, per-epoch metric history, the dataset input, every figure, real cell durations)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from infra import figures
from infra.mlflow_runs import BenchmarkRecord, CellRecord, DatasetRecord, headline_metrics, log_benchmark, ui_message
from infra.tracking import Tracker
from poison_core.evaluation import summarize
from tests.helpers import tiny_dataset

CHECKSUM = "ab" * 32


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def record(tmp_path: Path) -> BenchmarkRecord:
    """Two seeds of one backdoor cell under DPA-like metrics, with a history, ABL curves and a poison grid."""
    now = time.time()
    rows = [{"attack": "badnets", "defense": "abl", "seed": s, "clean_acc": 0.9 + s / 100, "asr": 0.5 + s / 10,
             "n_poison": 15, "certified_acc_r0": 0.8, "certified_acc_r1": 0.6} for s in (0, 1)]
    train = tiny_dataset(n=8, shape=(8, 8, 1))
    poisoned = np.clip(train.images.astype(int) + 40, 0, 255).astype(np.uint8)
    grid = figures.poison_grid(train.images, poisoned, n=4, orig_labels=[1, 2, 3, 4], poison_labels=[0, 0, 0, 4],
                               title="badnets")
    png = tmp_path / "grid" / "poisons.png"
    png.parent.mkdir()
    grid.savefig(png)
    cells = []
    for s, row in enumerate(rows):
        history = [{"epoch": e, "loss": 2.0 - e / 2, "train_acc": 0.3 + e / 10, "loss_clean": 1.0 - e / 10,
                    "loss_poison": 0.5 + e / 10, "stage": "train"} for e in range(3)]
        abl = figures.curve([0, 1, 2], {"clean": [1, 0.9, 0.8], "poison": [0.5, 0.6, 0.7]})
        certified = figures.curve([0, 1], {"poisoned victim": [0.8, 0.6]})
        cells.append(CellRecord(name=f"badnets|abl|seed{s}", row=row, started=now - 60 + 20 * s,
                                ended=now - 50 + 20 * s, history=history,
                                params={"attack_params": {"target_class": 0, "patch_size": 3},
                                        "threat": {"epsilon": 255, "budget": 0.05}},
                                tags={"attack": "badnets", "defense": "abl", "seed": str(s), "family": "backdoor"},
                                figures={"poisons": png, "abl_losses": abl, "certified_accuracy": certified}))
    summary = summarize(rows)
    return BenchmarkRecord(
        name="mlflow-view", summary=summary, description="# mlflow-view\n\n| attack | clean accuracy |\n",
        params={"attack": {"badnets": {"threat": {"epsilon": 255}}}},
        tags={"git_commit": "abc123", "config_hash": "cfg1", "dataset_checksum": CHECKSUM, "mlflow.user": "tester"},
        started=now - 90, metrics={"pipeline.computed.craft": 2.0},
        dataset=DatasetRecord("digits-train", str(tmp_path / "train.parquet"), CHECKSUM, 300, (8, 8, 1), 10),
        figures={"poisons_badnets": png, "heatmap_asr": figures.heatmap({("badnets", "abl"): 0.55}, vmin=0, vmax=1)},
        cells=cells)


def check(client: MlflowClient, experiment_id: str, parent_id: str) -> None:
    parent = client.get_run(parent_id)
    metrics = parent.data.metrics
    assert metrics["badnets.abl.clean_acc"] == pytest.approx(0.905)
    assert metrics["badnets.abl.clean_acc_ci_low"] < 0.905 < metrics["badnets.abl.clean_acc_ci_high"]
    assert metrics["badnets.abl.clean_acc_n"] == 2 and "badnets.abl.n_poison" not in metrics
    assert parent.data.tags["mlflow.note.content"].startswith("# mlflow-view")
    assert {"git_commit": "abc123", "config_hash": "cfg1", "dataset_checksum": CHECKSUM}.items() <= \
        parent.data.tags.items()
    assert parent.info.user_id == "tester"
    assert parent.data.params["attack.badnets.threat.epsilon"] == "255" and "threat.epsilon" not in parent.data.params
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "digits-train" and dataset.dataset.digest == CHECKSUM[:32]
    assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": "train"}
    assert {"figures/poisons_badnets.png", "figures/heatmap_asr.png"} <= \
        {a.path for a in client.list_artifacts(parent_id, "figures")}
    assert "tables/summary_table.json" in {a.path for a in client.list_artifacts(parent_id, "tables")}
    assert parent.info.end_time - parent.info.start_time >= 85_000  # back-dated to the benchmark's start

    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["tags.seed ASC"])
    assert [c.data.tags["seed"] for c in children] == ["0", "1"]
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert (tags["attack"], tags["defense"], tags["family"]) == ("badnets", "abl", "backdoor")
        assert params["attack_params.patch_size"] == "3" and params["threat.budget"] == "0.05"
        assert child.info.end_time - child.info.start_time == pytest.approx(10_000, abs=2)  # the cell's real span
        history = client.get_metric_history(child.info.run_id, "victim.loss")
        assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.0)]
        assert len(client.get_metric_history(child.info.run_id, "victim.train_acc")) == 3
        assert child.inputs.dataset_inputs[0].dataset.digest == CHECKSUM[:32]
        assert {a.path for a in client.list_artifacts(child.info.run_id, "figures")} == {
            "figures/poisons.png", "figures/abl_losses.png", "figures/certified_accuracy.png"}


def test_headline_metric_names_for_the_compare_view():
    summary = summarize([{"attack": "a", "defense": "d", "seed": s, "asr": 0.5, "n_poison": 3} for s in (0, 1)])
    assert headline_metrics(summary) == {"a.d.asr": 0.5, "a.d.asr_ci_low": 0.5, "a.d.asr_ci_high": 0.5,
                                         "a.d.asr_n": 2.0}


def test_benchmark_record_on_a_sqlite_store(tmp_path):
    tracker = Tracker(experiment="mlflow-view", run_dir=tmp_path)
    parent = log_benchmark(tracker, record(tmp_path))
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    check(client, tracker.experiment_id, parent)
    message = ui_message("mlflow-view", tmp_path)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in message
    assert f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning" in message
    assert f"#/experiments/{tracker.experiment_id}/runs/{parent}" in message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free 127.0.0.1 port (own process group, so its workers stop with it)."""
    port = free_port()
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"),
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test started, by its leader's PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_benchmark_record_on_a_real_mlflow_server(tmp_path):
    proc, url = start_mlflow_server(tmp_path)
    try:
        tracker = Tracker(url, experiment="mlflow-view", run_dir=tmp_path / "run")
        parent = log_benchmark(tracker, record(tmp_path))
        check(MlflowClient(tracking_uri=url), tracker.experiment_id, parent)
        with urllib.request.urlopen(f"{url}/get-artifact?path=figures/poisons_badnets.png&run_uuid={parent}") as r:
            assert r.read().startswith(b"\x89PNG")  # what the UI's artifact view fetches
        message = ui_message("mlflow-view", tmp_path / "run", tracking_uri=url)
        assert "mlflow ui" not in message and f"{url}/#/experiments/{tracker.experiment_id}/runs/{parent}" in message
    finally:
        stop_server(proc)


STAGED = """
name: staged-cells
dataset: {name: digits, n_train: 200, n_test: 80, seed: 0}
victim:
  model: {name: mlp, width: 16}
  train: {epochs: 3, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - {name: label_flip, params: {mode: random}, threat: {epsilon: 0, budget: 0.2, clean_label: false}}
  - {name: badnets, params: {target_class: 0, patch_size: 2}}
defenses: [{name: none}, {name: abl, params: {isolation_epochs: 1, unlearning_epochs: 1}}, {name: dpa, params: {k: 2}}]
seeds: [0, 1]
"""


@pytest.mark.slow
def test_summarize_records_the_cells_that_ran(tmp_path, monkeypatch):
    """The stages run in this process (no Prefect, no Ray), then the summarize task's body: every cell
    run spans its victim's training to its evaluation, carries the victim's history and its figures."""
    from poison_core.config import load_benchmark
    from tasks import report, stages

    monkeypatch.setattr(report, "create_markdown_artifact", lambda **_: None)
    cfg, root = load_benchmark(STAGED), str(tmp_path / "store")
    prefix = stages.ingest(root, cfg.dataset).key
    poisons = {(a.key, s): stages.craft(root, cfg, prefix, a, s) for s in cfg.seeds for a in cfg.attacks}
    models, cells = {}, {}
    for d in cfg.defenses:
        for s in cfg.seeds:
            models[(None, d.key, s)] = stages.retrain(root, cfg, prefix, d, s, None)
            for a in cfg.attacks:
                models[(a.key, d.key, s)] = stages.retrain(root, cfg, prefix, d, s, poisons[(a.key, s)].key)
    for a in cfg.attacks:
        for d in cfg.defenses:
            for s in cfg.seeds:
                cells[(a.key, d.key, s)] = stages.evaluate_cell(
                    root, cfg, prefix, a.key, d.key, s, poisons[(a.key, s)].key, models[(a.key, d.key, s)].key,
                    models[(None, d.key, s)].key)
    rows = [stages.read_cell(stages.as_store(root), c.key) for c in cells.values()]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = report.summarize.fn(root, cfg, prefix, rows, {k: v.key for k, v in poisons.items()},
                                  {"craft": 4}, tracking, str(tmp_path),
                                  outputs={"craft": poisons, "retrain": models, "evaluate": cells},
                                  stage_seconds={"ingest": 1.0, "craft": 2.0, "retrain": 30.0, "evaluate": 3.0})
    summary, logged = summary["summary"], summary["mlflow"]
    assert {(r["attack"], r["defense"]) for r in summary} == {(a.key, d.key) for a in cfg.attacks
                                                                 for d in cfg.defenses}
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert logged["run_id"] == parent.info.run_id and logged["experiment_id"] == experiment.experiment_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 12
    assert parent.info.end_time - parent.info.start_time >= 36_000  # back-dated by the stages' seconds
    assert "| attack | defense | seeds | clean accuracy |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["attack.label_flip.threat.epsilon"] == "0" and "threat.epsilon" not in \
        parent.data.params
    assert parent.data.tags["dataset_checksum"].startswith(parent.inputs.dataset_inputs[0].dataset.digest)
    assert "badnets.none.asr_ci_low" in parent.data.metrics and "badnets.none.n_poison" not in parent.data.metrics
    summary_md = client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path / "dl"))
    assert "(n=2)" in Path(summary_md).read_text()
    for child in children:
        tags = child.data.tags
        key = (tags["attack"], tags["defense"], int(tags["seed"]))
        retrain, evaluate = models[key], cells[key]
        assert child.info.start_time == int(retrain.started * 1000) and child.info.end_time == int(evaluate.ended * 1000)
        assert tags["family"] == {"badnets": "backdoor", "label_flip": "availability"}[tags["attack"]]
        assert tags["victim_protocol"] == parent.data.tags["victim_protocol"] == "supervised"
        assert child.data.params["threat.budget"] == {"badnets": "0.05", "label_flip": "0.2"}[tags["attack"]]
        figures_ = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert "figures/poisons.png" in figures_
        assert ("figures/abl_losses.png" in figures_) == (tags["defense"] == "abl")
        assert ("figures/certified_accuracy.png" in figures_) == (tags["defense"] == "dpa")
        if tags["defense"] != "dpa":  # DPA's history is its partitions, not epochs
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "victim.loss")]
            assert steps == sorted(steps) and len(steps) >= 3


def significant_digits(value: float) -> int:
    return len(format(abs(value), ".15g").split("e")[0].replace(".", "").lstrip("0").rstrip("0"))


def test_metrics_are_logged_at_display_precision_with_their_intervals_beside_them(tmp_path):
    """What the run page's metrics table shows: 4 significant digits, not 16, and each headline value
    followed by its own interval bounds and n when the names are sorted (as the UI lists them)."""
    rows = [{"attack": "badnets", "defense": "none", "seed": s, "clean_acc": 0.906458797 + s / 3000,
             "asr": 1 / 3 + s / 7, "acc_drop": 0.0011135857461024856 * (s + 1), "seconds_retrain": 123.456789}
            for s in (0, 1, 2)]
    summary = summarize(rows)
    cell = CellRecord(name="badnets|none|seed0", row=rows[0],
                      history=[{"epoch": e, "loss": 2 / 3 + e / 7} for e in range(3)])
    tracker = Tracker(experiment="precision", run_dir=tmp_path)
    parent = log_benchmark(tracker, BenchmarkRecord(name="precision", summary=summary, description="x",
                                                    metrics={"pipeline.seconds.craft": 8.09912345},
                                                    cells=[cell]))
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    metrics = client.get_run(parent).data.metrics
    assert metrics["badnets.none.clean_acc"] == 0.9068 and metrics["pipeline.seconds.craft"] == 8.099
    assert metrics["badnets.none.asr_n"] == 3.0
    assert all(significant_digits(v) <= 4 for v in metrics.values()), metrics
    names = sorted(metrics)
    for metric in ("badnets.none.asr", "badnets.none.clean_acc", "badnets.none.acc_drop"):
        at = names.index(metric)
        assert names[at:at + 4] == [metric, f"{metric}_ci_high", f"{metric}_ci_low", f"{metric}_n"]
        assert metrics[f"{metric}_ci_low"] <= metrics[metric] <= metrics[f"{metric}_ci_high"]
    (child,) = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.metrics["clean_acc"] == 0.9065 and child.data.metrics["seconds_retrain"] == 123.5
    assert [m.value for m in client.get_metric_history(child.info.run_id, "victim.loss")] == [0.6667, 0.8095, 0.9524]
