"""benchmarks.protocols without training anything: the stored attack x protocol table merges as
documented, and ``--log-only`` puts it into a real MLflow sqlite store (read back with MlflowClient)
or refuses a missing or malformed table with one line and no run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from benchmarks.protocols import EXPERIMENT, main, render, write
from poison_core.errors import InputError

ROWS = [{"attack": "clean", "protocol": "supervised", "seed": 0, "acc": 0.84, "craft_s": 0.0, "victim_s": 30.0},
        {"attack": "clean", "protocol": "relabel", "seed": 0, "acc": 0.91, "craft_s": 0.0, "victim_s": 27.0},
        *({"attack": "error_min_class", "protocol": "simclr-linear", "seed": s, "acc": acc, "craft_s": 100.0 + s,
           "victim_s": 400.0} for s, acc in enumerate((0.70, 0.72))),
        *({"attack": "tue", "protocol": "supervised", "seed": s, "acc": acc, "craft_s": 50.0, "victim_s": 20.0}
          for s, acc in enumerate((0.30, 0.33, 0.36)))]


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def only_run(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_log_only_puts_the_stored_table_into_mlflow(tmp_path):
    out = tmp_path / "results"
    write(ROWS, out)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    main(["--log-only", "--out", str(out), "--mlflow-uri", uri, "--experiment", "protocols-test"])
    client = MlflowClient(tracking_uri=uri)
    run = only_run(client, "protocols-test")
    assert run.info.status == "FINISHED"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "store")
    metrics = run.data.metrics
    for attack, protocol in {(r["attack"], r["protocol"]) for r in ROWS}:
        accs = [r["acc"] for r in ROWS if (r["attack"], r["protocol"]) == (attack, protocol)]
        name = f"{attack}.{protocol}"
        # MLflow holds them at display precision (4 significant digits: infra.tracking.display_round)
        assert metrics[f"{name}.acc_mean"] == pytest.approx(np.mean(accs), rel=5e-4)
        assert metrics[f"{name}.n_seeds"] == len(accs)
        if len(accs) > 1:
            assert metrics[f"{name}.acc_std"] == pytest.approx(np.std(accs, ddof=1), rel=5e-4)
        else:
            assert f"{name}.acc_std" not in metrics
    assert len(metrics) == 4 * 2 + 2  # four cells (mean, n_seeds), two of them over seeds (std)
    params = run.data.params
    assert params["dataset"] == "fashion-mnist" and params["n_train"] == "4000" and params["epsilon"] == "8"
    assert params["ssl_epochs"] == "20" and params["attack.error_min_class.mode"] == "class"
    stored_md = (out / "protocols.md").read_text()
    assert client.download_artifacts(run.info.run_id, "protocols.md", str(tmp_path)) and \
        (tmp_path / "protocols.md").read_text() == stored_md
    assert run.data.tags["mlflow.note.content"] == stored_md
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "tables/protocols.json", str(tmp_path)))
                       .read_text())
    assert len(table) == len(ROWS)
    assert {(r["attack"], r["protocol"], r["seed"], r["acc"]) for r in table} == \
        {(r["attack"], r["protocol"], r["seed"], r["acc"]) for r in ROWS}


def test_log_only_uses_the_default_experiment(tmp_path):
    write(ROWS[:2], tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["--log-only", "--out", str(tmp_path), "--mlflow-uri", uri])
    run = only_run(MlflowClient(tracking_uri=uri), EXPERIMENT)
    assert EXPERIMENT == "belladonna-protocols"
    assert run.data.metrics["clean.supervised.acc_mean"] == pytest.approx(0.84)


def test_write_replaces_the_same_attack_protocol_and_seed(tmp_path):
    write(ROWS, tmp_path)
    rerun = {**ROWS[2], "acc": 0.50}  # error_min_class / simclr-linear / seed 0 measured again
    merged = write([rerun], tmp_path)
    stored = json.loads((tmp_path / "protocols.json").read_text())
    assert stored == merged and len(stored) == len(ROWS)
    cell = [r["acc"] for r in stored if (r["attack"], r["protocol"]) == ("error_min_class", "simclr-linear")]
    assert cell == [0.50, 0.72]
    assert f"{np.mean(cell):.3f} +- {np.std(cell, ddof=1):.3f} (n=2)" in (tmp_path / "protocols.md").read_text()
    assert (tmp_path / "protocols.md").read_text() == render(stored)
    before = {name: (tmp_path / name).read_text() for name in ("protocols.json", "protocols.md")}
    with pytest.raises(InputError, match=r"row 0 field 'acc' is 1\.5; must be a number in \[0, 1\]"):
        write([{**ROWS[0], "acc": 1.5}], tmp_path)
    with pytest.raises(InputError, match="field 'attack' is 'no_such_attack'"):
        write([{**ROWS[0], "attack": "no_such_attack"}], tmp_path)
    assert {name: (tmp_path / name).read_text() for name in before} == before  # nothing half-written


@pytest.mark.parametrize(("stored", "says"), [
    (None, "no such file"),
    ("{not json", "not readable as JSON"),
    ('{"attack": "clean"}', "expected a JSON list of rows"),
    ('[{"attack": "clean", "protocol": "supervised", "seed": 0}]', "row 0 field 'acc' is None"),
    ('[{"attack": "clean", "protocol": "transfer", "seed": 0, "acc": 0.8}]', "row 0 field 'protocol' is 'transfer'"),
    ("[]", "holds no rows"),
])
def test_log_only_refuses_a_missing_or_malformed_table(tmp_path, capsys, stored, says):
    if stored is not None:
        (tmp_path / "protocols.json").write_text(stored)
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-only", "--out", str(tmp_path), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err and str(tmp_path / "protocols.json") in err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, not even a store


def test_augmented_rows_sit_beside_plain_ones_and_a_bad_recipe_is_refused(tmp_path):
    augmented = [{**row, "recipe": "augmented", "acc": row["acc"] - 0.05} for row in ROWS[:2]]
    rows = write(ROWS[:2] + augmented, tmp_path)
    assert len(rows) == 4  # same attack, protocol and seed under two recipes: two rows, not one replaced
    text = (tmp_path / "protocols.md").read_text()
    assert "| clean | 0.840 (n=1) | 0.910 (n=1) |\n| clean (augmented) | 0.790 (n=1) | 0.860 (n=1) |" in text
    for bad in ("plain", "noisy", 3):
        with pytest.raises(InputError, match="field 'recipe'"):
            write([{**ROWS[0], "recipe": bad}], tmp_path)


def test_the_craft_cache_is_keyed_by_the_attack_code(tmp_path, monkeypatch):
    import benchmarks.protocols as protocols

    first = protocols.cache_path("tue", 0, tmp_path)
    assert first == protocols.cache_path("tue", 0, tmp_path) != protocols.cache_path("tue", 1, tmp_path)
    monkeypatch.setattr(protocols, "code_fingerprint", lambda modules: "an edited attack")
    assert protocols.cache_path("tue", 0, tmp_path) != first
