"""The `belladonna` command: exit codes, one-line errors, outputs that pass their audit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from poison_core.config import load_benchmark
from poison_core.data import load_dataset
from poison_core.poisons import audit_file

TINY = """
name: tiny
dataset: {name: digits, n_train: 300, n_test: 100}
victim:
  model: {name: mlp, width: 32}
  train: {epochs: 2, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - name: badnets
  - name: label_flip
    params: {mode: pair, source_class: 1, target_class: 7}
seeds: [3, 4]
"""


def belladonna(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_run_writes_results_and_audited_poison_sets(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    proc = belladonna("run", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "badnets" in proc.stdout and "label_flip" in proc.stdout
    results = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    assert {row["attack"] for row in results["rows"]} == {"badnets", "label_flip"}
    assert 0.0 <= results["rows"][0]["clean_acc"] <= 1.0
    assert set(results["stage_seconds"]) >= {"ingest", "craft", "retrain", "evaluate", "summarize"}
    compute = results["compute_seconds"]
    assert 0 < compute["retrain"] <= 2 * results["seconds"] and compute["pretrain"] == 0
    train = load_dataset(load_benchmark(config).dataset).train
    key = results["poisons"]["label_flip/seed3"]
    ps, _ = audit_file(str(tmp_path / "out" / "store" / key), train, load_benchmark(config))
    assert set(ps.poison_labels) == {7}
    assert (tmp_path / "out" / "mlflow.db").is_file()
    report = belladonna("report", str(tmp_path / "out" / "tiny"))
    assert report.returncode == 0 and "label_flip" in report.stdout
    missing = belladonna("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "has no results.json" in missing.stderr
    from tests.compare_checks import run_again

    run_again(belladonna, TINY, tmp_path / "out", "tiny", tmp_path)  # history, compare, gate, report page


@pytest.mark.parametrize("yaml_text, message", [
    ("name: t\nattacks: [{name: nosuch}]\n", "unknown attack 'nosuch'"),
    ("name: t\nthreat: {epsilon: 999}\nattacks: [{name: badnets}]\n", "threat.epsilon"),
    ("name: t\nthreat: {budget: 2}\nattacks: [{name: badnets}]\n", "threat.budget"),
    ("name: t\nvictim: {model: {name: alexnet}}\nattacks: [{name: badnets}]\n", "unknown model 'alexnet'"),
    ("name: t\ndataset: {name: fashion-mnist, path: /nonexistent}\nattacks: [{name: badnets}]\n", "/nonexistent"),
    ("name: t\nattacks: [\n", "malformed YAML"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    proc = belladonna("run", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config_file_and_listings(tmp_path):
    proc = belladonna("run", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = belladonna("attacks")
    assert proc.returncode == 0 and "badnets" in proc.stdout and "Gu et al." in proc.stdout
    proc = belladonna("models")
    assert proc.returncode == 0 and "resnet18" in proc.stdout
