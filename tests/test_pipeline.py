"""The pipeline end to end: a real Prefect server and flow runs, a real local Ray instance, an MLflow
sqlite store, and the store on a real S3 endpoint (moto server on 127.0.0.1); then resume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.benchmark import benchmark
from infra.storage import Store
from poison_core.attacks import CraftContext, make_attack
from poison_core.config import load_benchmark
from poison_core.data import load_dataset
from poison_core.poisons import to_parquet_bytes
from poison_core.seeding import derive_seed
from tests.pipeline_helpers import TINY_BENCHMARK


SECRET = "Zq9-very-secret-value-4711"


@pytest.mark.slow
def test_quickstart_flow_on_ray_with_s3_store_and_mlflow(prefect_server, fresh_ray, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any secret; it must leak nowhere
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET + "-token")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = benchmark(config=TINY_BENCHMARK, store=s3_env.root, run_dir=str(tmp_path),
                      tracking_uri=tracking, return_state=True)
    assert state.is_completed()
    result = state.result()
    cfg = load_benchmark(TINY_BENCHMARK)
    assert result["computed"] == {"ingest": 1, "pretrain": 0, "craft": 4, "retrain": 6, "evaluate": 4}
    assert len(result["rows"]) == 4 and all(0 <= r["clean_acc"] <= 1 for r in result["rows"])

    # PoisonSets in S3 are byte-identical to crafting again here from the same seed and split.
    store = Store(s3_env.root)
    train = load_dataset(cfg.dataset).train
    for attack in cfg.attacks:
        for seed in cfg.seeds:
            key = result["poisons"][f"{attack.key}/seed{seed}"]
            assert key.startswith("poisons/") and store.exists(key)
            ctx = CraftContext(train=train, threat=cfg.threat_for(attack), seed=derive_seed(seed, "craft", attack.key))
            again = make_attack(attack.name, attack.params).craft(ctx)
            stored = store.read_bytes(key)
            assert stored == to_parquet_bytes(replace(again, provenance={**again.provenance, "store_key": key}))
            back = store.read_poison_set(key, train, cfg.threat_for(attack))
            assert np.array_equal(back.images, again.images[np.argsort(again.ids)])

    # MLflow: one parent run, one nested run per cell with metrics and params, figures and tables.
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert all("clean_acc" in r.data.metrics and r.data.params["poison_id"].startswith("poisons/") for r in children)
    assert any("asr" in r.data.metrics for r in children)
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/poisons_badnets.png", "figures/poisons_label_flip.png", "figures/heatmap_acc_drop.png",
            "figures/heatmap_asr.png"} <= figures
    tables = {f.path for f in client.list_artifacts(parent.info.run_id, "tables")}
    assert "tables/summary.md" in tables

    # The summary is also a Prefect markdown artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client_:
        artifacts = client_.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-pipeline"])))
    assert artifacts and "badnets" in artifacts[0].data

    # Secrets from the environment appear nowhere in the MLflow store (database and artifacts).
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in scanned) and any(p.suffix == ".png" for p in scanned)
    for path in scanned:
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_resume_recomputes_only_the_missing_cell(prefect_server, fresh_ray, tmp_path):
    root = str(tmp_path / "store")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = benchmark(config=TINY_BENCHMARK, store=root, run_dir=str(tmp_path), tracking_uri=tracking)
    store = Store(root)
    cells = store.list("cells")
    assert len(cells) == 4
    store.delete(cells[0])
    second = benchmark(config=TINY_BENCHMARK, store=root, run_dir=str(tmp_path), tracking_uri=tracking)
    assert second["computed"] == {"ingest": 0, "pretrain": 0, "craft": 0, "retrain": 0, "evaluate": 1}
    assert sorted(map(str, second["rows"])) == sorted(map(str, first["rows"]))
    model = next(k for k in store.list("models"))
    store.delete(model)
    third = benchmark(config=TINY_BENCHMARK, store=root, run_dir=str(tmp_path), tracking_uri=tracking)
    assert third["computed"]["retrain"] == 1 and third["computed"]["craft"] == 0


@pytest.mark.slow
def test_defenses_in_the_pipeline_dpa_certificate_and_filters(prefect_server, fresh_ray, tmp_path):
    config = TINY_BENCHMARK.replace("seeds: [0, 1]", "seeds: [0]") + (
        "defenses: [{name: none}, {name: dpa, params: {k: 3}}, {name: trimmed_loss},"
        " {name: spectral_signatures}]\n")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = benchmark(config=config, store=str(tmp_path / "store"), run_dir=str(tmp_path), tracking_uri=tracking)
    assert result["computed"]["evaluate"] == 8
    dpa_rows = [r for r in result["rows"] if r["defense"] == "dpa"]
    assert dpa_rows and all(0 <= r["certified_acc_r1"] <= r["certified_acc_r0"] <= 1 for r in dpa_rows)
    filtered = [r for r in result["rows"] if r["defense"] == "spectral_signatures"]
    assert all(0 <= r["defense_filter_recall"] <= 1 for r in filtered)
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny-pipeline")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/certified_accuracy.png" in figures


AVAILABILITY_BENCHMARK = """
name: tiny-availability
dataset: {name: digits, n_train: 300, n_test: 120, seed: 0}
victim:
  model: {name: mlp, width: 32}
  train: {epochs: 2, batch_size: 64}
threat: {epsilon: 16, budget: 1.0, clean_label: true}
attacks:
  - {name: synthetic_noise, id: synthetic-50, params: {patch: 2}, threat: {epsilon: 16, budget: 0.5, clean_label: true}}
  - {name: synthetic_noise, id: synthetic-100, params: {patch: 2}}
  - {name: random_noise}
seeds: [0]
"""


@pytest.mark.slow
def test_availability_coverage_curve_and_separability_table_in_mlflow(prefect_server, fresh_ray, tmp_path):
    """Attacks that differ only in budget give an accuracy-against-coverage figure; every availability
    attack's perturbations get a separability row (synthetic noise far more separable than random)."""
    import json

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = benchmark(config=AVAILABILITY_BENCHMARK, store=str(tmp_path / "store"), run_dir=str(tmp_path),
                       tracking_uri=tracking)
    assert result["computed"]["evaluate"] == 3
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny-availability")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/coverage_synthetic_noise.png" in figures
    assert not any("coverage_random_noise" in f for f in figures)  # one budget: no curve
    local = client.download_artifacts(parent.info.run_id, "tables/separability.json", str(tmp_path / "dl"))
    rows = {r["attack"]: r for r in json.loads(open(local).read())}
    assert set(rows) == {"synthetic-50", "synthetic-100", "random_noise"}
    assert rows["synthetic-100"]["linear"] > 0.9 and rows["random_noise"]["linear"] < 0.5
