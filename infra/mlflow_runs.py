"""A benchmark laid out in MLflow for the person who opens its UI.

* The parent run (one benchmark) holds the headline results: per (attack, defense) and metric,
  ``<attack>.<defense>.<metric>`` (the mean over seeds) with ``..._ci_low``, ``..._ci_high`` and
  ``..._n`` where the metric has an interval, so MLflow's compare view and charts line two nightly
  runs up metric by metric; the summary as an MLflow table (``tables/summary_table.json``); a
  markdown description (the ``mlflow.note.content`` tag) with the results table; tags for the git
  commit, config hash, dataset checksum and user; and the training split as an MLflow dataset input
  whose digest is (the first 32 hex digits of) the split's checksum.
* One nested run per cell, spanning when the cell's work really ran (its victim's training to its
  evaluation), tagged attack / defense / seed / family, with the attack's effective parameters and
  threat model as params, the victim's per-epoch history as metric history (step = epoch) and the
  cell's own figures.

Every metric is logged at display precision (:func:`infra.tracking.display_round`, 4 significant
digits); the exact values are in results.json and the tables. Everything goes through
:class:`infra.tracking.Tracker`'s secret filter.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.tracking import Tracker, display_round, redact, secret_values
from poison_core.metrics import SUMMARY_COLUMNS, metric_kind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
DESCRIPTION_TAG = "mlflow.note.content"
MAX_TAG_LEN = 8000
DIGEST_LEN = 32
HEADLINE = (*(c for c in SUMMARY_COLUMNS if c not in ("attack", "defense", "n_seeds")), "median_certified_radius")


@dataclass
class DatasetRecord:
    """A stored split, as an MLflow dataset input."""

    name: str
    uri: str
    checksum: str
    n_rows: int
    image_shape: tuple[int, ...]
    num_classes: int
    context: str = "train"


@dataclass
class CellRecord:
    """One cell: its row of metrics, when its work ran (seconds since the epoch; None: reused, not
    run now), params and tags, the victim's per-epoch history and its figures (a Figure or a PNG file)."""

    name: str
    row: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Figure | Path] = field(default_factory=dict)


@dataclass
class BenchmarkRecord:
    """The parent run's content."""

    name: str
    summary: list[dict[str, Any]]
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: DatasetRecord | None = None
    figures: dict[str, Figure | Path] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text, written after the tables
    cells: list[CellRecord] = field(default_factory=list)


def headline_metrics(summary: list[dict[str, Any]], names: tuple[str, ...] | None = None) -> dict[str, float]:
    """``<attack>.<defense>.<metric>`` and its ``_ci_low`` / ``_ci_high`` / ``_n`` for each headline
    metric (`names`; default: the results table's, :data:`HEADLINE`). Counts and settings have none;
    every other metric stays in the cell runs and the summary table."""
    names = HEADLINE if names is None else names
    out: dict[str, float] = {}
    for entry in summary:
        prefix = f"{entry['attack']}.{entry['defense']}"
        for name, value in entry.items():
            if (name not in names or metric_kind(name) == "none"
                    or not isinstance(value, (int, float)) or isinstance(value, bool)):
                continue
            out[f"{prefix}.{name}"] = float(value)
            if entry.get(f"{name}_ci") is not None:
                out[f"{prefix}.{name}_ci_low"], out[f"{prefix}.{name}_ci_high"] = map(float, entry[f"{name}_ci"])
            if entry.get(f"{name}_n") is not None:
                out[f"{prefix}.{name}_n"] = float(entry[f"{name}_n"])
    return out


def flat_summary(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows with every interval split into ``<m>_ci_low`` and ``<m>_ci_high`` columns."""
    rows = []
    for entry in summary:
        row: dict[str, Any] = {}
        for name, value in entry.items():
            if name.endswith("_ci") and value is not None:
                row[f"{name}_low"], row[f"{name}_high"] = float(value[0]), float(value[1])
            else:
                row[name] = value
        rows.append(row)
    return rows


def log_benchmark(tracker: Tracker, record: BenchmarkRecord) -> str:
    """Write the parent run and its cell runs; returns the parent's run id."""
    with tracker.parent_run(record.name, params=record.params, tags=record.tags,
                            start_time=_ms(record.started)) as parent:
        tracker.set_tags({DESCRIPTION_TAG: record.description[:MAX_TAG_LEN]})
        tracker.log_metrics({**headline_metrics(record.summary), **record.metrics})
        if record.dataset is not None:
            log_dataset(tracker, record.dataset, parent)
        for cell in record.cells:
            log_cell(tracker, cell, parent, record.dataset)
        _log_figures(tracker, record.figures, parent)
        log_mlflow_table(tracker, flat_summary(record.summary), "tables/summary_table.json", parent)
        for name, rows in record.tables.items():
            tracker.log_table(rows, name)
        for path, text in record.texts.items():
            tracker.log_text(text, path)
    return parent


def log_cell(tracker: Tracker, cell: CellRecord, parent: str, dataset: DatasetRecord | None = None) -> str:
    """One cell run, back-dated to when its work ran; returns its run id."""
    metrics = {k: float(v) for k, v in cell.row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"}
    start = _ms(cell.started)
    end = _ms(cell.ended) if cell.ended is not None and cell.started is not None else start
    with tracker.cell_run(cell.name, params=cell.params, metrics=metrics, tags=cell.tags, parent_run_id=parent,
                          start_time=start, end_time=end) as run_id:
        log_history(tracker, cell.history, run_id, start or int(time.time() * 1000))
        if dataset is not None:
            log_dataset(tracker, dataset, run_id)
        _log_figures(tracker, cell.figures, run_id)
    return run_id


def log_history(tracker: Tracker, history: list[dict[str, Any]], run_id: str, start_ms: int,
                prefix: str = "victim.") -> int:
    """Each numeric field of the per-epoch records as a metric history, step = the record's epoch
    (records without an epoch, e.g. DPA's partition sizes, are skipped); returns the points logged."""
    from mlflow.entities import Metric

    points = []
    for record in history:
        if "epoch" not in record:
            continue
        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                points.append(Metric(f"{prefix}{key}", display_round(float(value)), start_ms + step, step))
    for i in range(0, len(points), 1000):  # MLflow's log_batch takes at most 1000 metrics
        tracker.client.log_batch(run_id, metrics=points[i:i + 1000])
    return len(points)


def log_dataset(tracker: Tracker, dataset: DatasetRecord, run_id: str) -> None:
    """The split as an MLflow dataset input (what the UI's Datasets column and panel show)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("long", "id"), ColSpec("binary", "image"), ColSpec("integer", "label")])
    profile = {"num_rows": dataset.n_rows, "image_shape": list(dataset.image_shape),
               "num_classes": dataset.num_classes, "checksum": dataset.checksum}
    source_type = dataset.uri.split("://", 1)[0] if "://" in dataset.uri else "local"
    entity = Dataset(name=dataset.name, digest=dataset.checksum[:DIGEST_LEN], source_type=source_type,
                     source=json.dumps({"uri": redact(dataset.uri, secret_values())}),
                     schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))
    tracker.client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", dataset.context)])])


def log_mlflow_table(tracker: Tracker, rows: list[dict[str, Any]], artifact_file: str, run_id: str) -> None:
    """Rows as an MLflow table (the artifact viewer shows it as a sortable table)."""
    import pandas as pd

    secrets = secret_values()
    frame = pd.DataFrame([{k: redact(v, secrets) if isinstance(v, str) else v for k, v in row.items()}
                          for row in rows])
    tracker.client.log_table(run_id, data=frame, artifact_file=artifact_file)


def _log_figures(tracker: Tracker, figures: Mapping[str, Figure | Path], run_id: str) -> None:
    """Each figure as ``figures/<name>.png``: a Figure is rendered, a PNG file is uploaded as it is."""
    for name, fig in figures.items():
        if not isinstance(fig, Path):
            tracker.log_figure(fig, name, run_id)
            continue
        with tempfile.TemporaryDirectory() as tmp:  # the artifact takes the file's name
            named = Path(tmp) / f"{name}{fig.suffix}"
            shutil.copyfile(fig, named)
            tracker.client.log_artifact(run_id, str(named), "figures")


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def runs_view_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow 3 UI's page of the experiment's runs, or of one run, in its "Model training" view:
    without ``workflowType=machine_learning`` the 3.x UI opens on its GenAI pages (traces, evaluation
    runs) unless the user switched before (it remembers the choice in the browser)."""
    base = base_url.rstrip("/")
    page = f"runs/{run_id}" if run_id is not None else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def ui_message(experiment: str, run_dir: str | Path, tracking_uri: str | None = None, port: int = 5000) -> str:
    """How to look at a finished benchmark: the exact ``mlflow ui`` command (for a local store) and the
    URL of its runs view and latest parent run."""
    tracker = Tracker(tracking_uri, experiment=experiment, run_dir=run_dir)
    uri = tracker.tracking_uri
    parents = tracker.client.search_runs([tracker.experiment_id], filter_string=f"attributes.run_name = '{experiment}'",
                                         order_by=["attributes.start_time DESC"], max_results=5)
    parent = next((r.info.run_id for r in parents if "mlflow.parentRunId" not in r.data.tags), None)
    if uri.startswith(("http://", "https://")):
        base, command = uri, ""
    else:
        base = f"http://127.0.0.1:{port}"
        artifacts = (Path(run_dir).expanduser().resolve() / "mlartifacts")
        command = (f"MLflow: mlflow ui --backend-store-uri {uri} --default-artifact-root {artifacts.as_uri()} "
                   f"--host 127.0.0.1 --port {port}\n")
    lines = f"{command}runs: {runs_view_url(base, tracker.experiment_id)}"
    if parent is not None:
        lines += f"\nthis benchmark: {runs_view_url(base, tracker.experiment_id, parent)}"
    return lines
