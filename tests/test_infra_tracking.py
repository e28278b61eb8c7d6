"""MLflow tracking on a temporary SQLite store: nested runs, artifacts, secret filtering; figure builders."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from infra.figures import curve, heatmap, poison_grid
from infra.tracking import REDACTED, Tracker, is_secret_name, redact, scrub
from poison_core.errors import InputError
from tests.helpers import tiny_dataset

SECRET = "supersecret123"


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database: copying it spares each test the schema migrations (seconds)."""
    folder = tmp_path_factory.mktemp("template")
    Tracker(experiment="template", run_dir=folder)
    return folder / "mlflow.db"


@pytest.fixture
def tracker(tmp_path, migrated_db) -> Tracker:
    shutil.copyfile(migrated_db, tmp_path / "mlflow.db")
    return Tracker(experiment="test-bench", run_dir=tmp_path)


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_parent_run_with_two_nested_cells_reads_back(tracker, tmp_path):
    assert tracker.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    with tracker.parent_run("bench", params={"benchmark": "quick", "threat": {"epsilon": 8}}) as parent:
        for seed in (0, 1):
            with tracker.cell_run(f"badnets-none-{seed}", params={"attack": "badnets", "seed": seed},
                                  metrics={"clean_acc": 0.9}, tags={"cell": f"c{seed}"}) as cell:
                assert tracker.active_run_id == cell
                tracker.log_metrics({"asr": 0.25 * (seed + 1)})
                tracker.log_metrics({"loss": np.float32(0.5)}, step=3)
        tracker.log_figure(curve([1, 2], {"asr": [0.1, 0.2]}, "budget", "asr", "t"), "asr-curve")
        paths = tracker.log_table([{"attack": "badnets", "asr": 0.5, "n": np.int64(3)}], "summary")
    assert tracker.active_run_id is None

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    by_seed = {r.data.params["seed"]: r for r in children}
    assert by_seed["1"].data.metrics == {"clean_acc": 0.9, "asr": 0.5, "loss": 0.5}
    assert by_seed["0"].data.tags["cell"] == "c0"
    top = client.get_run(parent)
    assert top.data.params["threat.epsilon"] == "8" and "mlflow.parentRunId" not in top.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent, "figures")}
    assert artifacts == {"figures/asr-curve.png"}
    assert paths == ["tables/summary.json", "tables/summary.csv", "tables/summary.md"]
    local = tmp_path / "mlartifacts"
    assert json.loads(next(local.rglob("summary.json")).read_text()) == [{"attack": "badnets", "asr": 0.5, "n": 3}]
    assert next(local.rglob("asr-curve.png")).read_bytes().startswith(b"\x89PNG")
    assert "| badnets | 0.5 | 3 |" in next(local.rglob("summary.md")).read_text()


def test_secrets_never_reach_the_mlflow_store(tracker, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdef-987")
    leaky = {"aws_secret_access_key": SECRET, "endpoint": f"http://host/?sig={SECRET}", "note": SECRET,
             "nested": {"password": "hunter22"}, "api_key": "k", "attack": "badnets", "other": "tok-abcdef-987"}
    with (tracker.parent_run(f"bench-{SECRET}", params=leaky, tags=leaky) as parent,
          tracker.cell_run("cell", params=leaky, metrics={"SECRET_score": 1.0, "acc": 0.5})):
        tracker.log_text(f"credentials: {SECRET}\n", "notes/log.txt")
        tracker.log_table([{**leaky, "asr": 0.1}], "cells")
        tracker.set_tags({"token": SECRET, "ok": "yes"})
    run = MlflowClient(tracking_uri=tracker.tracking_uri).get_run(parent)
    assert run.data.params["attack"] == "badnets" and run.data.params["note"] == REDACTED
    assert run.data.params["endpoint"] == f"http://host/?sig={REDACTED}"
    assert not {"aws_secret_access_key", "nested.password", "api_key"} & set(run.data.params)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "log.txt" for p in files)
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
        assert b"tok-abcdef-987" not in data and b"hunter22" not in data, path


def test_failed_cell_is_marked_failed_and_cells_need_a_parent(tracker):
    with pytest.raises(RuntimeError, match="needs an open parent_run"), tracker.cell_run("orphan"):
        pass
    with tracker.parent_run("bench") as parent:
        with pytest.raises(ZeroDivisionError), tracker.cell_run("boom") as cell:
            1 / 0  # noqa: B018
        with tracker.cell_run("explicit", parent_run_id=parent) as other:
            pass
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.get_run(cell).info.status == "FAILED"
    assert client.get_run(other).data.tags["mlflow.parentRunId"] == parent
    with pytest.raises(InputError, match="metric 'acc' is not a number"):
        tracker.log_metrics({"acc": "high"}, run_id=parent)


def test_secret_filter_rules():
    assert is_secret_name("AWS_SECRET_ACCESS_KEY") and is_secret_name("db_password") and is_secret_name("apiToken")
    assert not is_secret_name("epsilon")
    secrets = frozenset({SECRET, "abc"})
    assert redact("abc", secrets) == REDACTED and redact("abcd", secrets) == "abcd"
    assert scrub({"a": {"credential": "x"}, "b": [1, 2]}, secrets) == {"b": "[1, 2]"}


def test_importing_infra_has_no_side_effects():
    code = ("import os, sys, infra, infra.settings, infra.storage, infra.tracking, infra.figures\n"
            "bad = sorted(m for m in sys.modules if m in ('mlflow', 'matplotlib.pyplot', 's3fs', 'boto3'))\n"
            "print(','.join(bad), os.environ.get('MLFLOW_DISABLE_TELEMETRY'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "None"


def test_figures_render():
    train = tiny_dataset(n=16, shape=(8, 8, 3))
    poisoned = np.clip(train.images.astype(int) + 4, 0, 255).astype(np.uint8)
    grid = poison_grid(train.images, poisoned, n=5)
    assert len(grid.axes) == 15 and png_bytes(grid).startswith(b"\x89PNG")
    gray = tiny_dataset(n=4)
    assert len(poison_grid(gray.images, gray.images, n=8).axes) == 12
    hm = heatmap({("badnets", "none"): 0.9, ("badnets", "dpa"): 0.1, ("flip", "none"): float("nan")}, "asr", ".1f")
    texts = {t.get_text() for t in hm.axes[0].texts}
    assert texts == {"0.9", "0.1"} and png_bytes(hm)
    fig = curve([0.01, 0.05], {"gm": [0.1, 0.3]}, "budget", "p(adv)", "effect", bands={"gm": ([0, 0.2], [0.2, 0.4])})
    assert png_bytes(fig)
    with pytest.raises(InputError, match="equal shape"):
        poison_grid(train.images, poisoned[:3])
    with pytest.raises(InputError, match="series 'gm' has 1 points"):
        curve([1, 2], {"gm": [1]})
    with pytest.raises(InputError, match="no"):
        heatmap({})


def test_poison_grid_names_the_attack_and_shows_label_changes():
    """A label flip changes no pixel: only the column titles (original -> poison label) show it."""
    train = tiny_dataset(n=4)
    grid = poison_grid(train.images, train.images, n=3, orig_labels=[1, 2, 3], poison_labels=[7, 2, 0],
                       title="label_flip", class_names=[str(i) for i in range(10)])
    titles = [ax.get_title() for ax in grid.axes[:3]]
    assert titles == ["1 -> 7", "2", "3 -> 0"]
    assert grid.get_suptitle().startswith("label_flip: 3 poisons") and "2 labels changed" in grid.get_suptitle()
    of_many = poison_grid(train.images, train.images, n=3, title="label_flip (seed 0)", total=404)
    assert of_many.get_suptitle().startswith("label_flip (seed 0): 3 of 404 poisons shown, L-inf 0/255")


def test_rate_heatmap_has_a_fixed_zero_one_scale():
    fig = heatmap({("badnets", "none"): 0.95, ("badnets", "abl"): 1.0}, "asr", vmin=0.0, vmax=1.0)
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    auto = heatmap({("badnets", "none"): 0.95, ("badnets", "abl"): 1.0}, "asr")
    assert auto.axes[0].images[0].get_clim() == (0.95, 1.0)
