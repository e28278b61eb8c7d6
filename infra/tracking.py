"""MLflow tracking: one parent run per benchmark, one real nested run per cell, and no secret ever logged.

Every param, tag, metric name, table and text goes through a filter first: a name containing KEY,
SECRET, TOKEN, PASSWORD or CREDENTIAL is dropped, and a value equal to (or, for values of 6+ chars,
containing) the value of any environment variable with such a name is redacted. Runs are created with
:class:`mlflow.MlflowClient` (no global fluent state); nesting is MLflow's own ``mlflow.parentRunId``
tag, so the UI and ``search_runs`` see real child runs. The default backend is
``sqlite:///<run_dir>/mlflow.db`` (MLflow 3 refuses a plain file store), artifacts under
``<run_dir>/mlartifacts``. mlflow is imported when a Tracker starts, after its documented switch
``MLFLOW_DISABLE_TELEMETRY`` is set (unless the user set it): MLflow reads it when it is first imported.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.settings import Settings
from infra.storage import check_key
from infra.local_checks import check_tracking_uri
from infra.tracking_db import db_error, is_db_error, moved_from, moved_name, sqlite_path
from poison_core.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
REDACTED = "[redacted]"
MIN_EQUAL_LEN = 3
MIN_CONTAINED_LEN = 6
MAX_PARAM_LEN = 6000
SIGNIFICANT = 4


def display_round(value: float, significant: int = SIGNIFICANT) -> float:
    """`value` as the MLflow UI should show it: `significant` significant digits, but never fewer than
    its integer digits (0.906458797 -> 0.9065, 0.0123456 -> 0.01235, 123.456 -> 123.5, 12345.6 -> 12346);
    integers, 0, NaN and infinities unchanged. The UI prints a metric's float as stored (16 digits), and
    the exact values are in results.json and the tables."""
    if not math.isfinite(value) or value == 0 or value == int(value):
        return value
    return round(value, max(0, significant - 1 - math.floor(math.log10(abs(value)))))


def is_secret_name(name: str) -> bool:
    """True for names that look like they hold a credential (``aws_secret_access_key``, ``api_token``...)."""
    return bool(SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Values of environment variables whose names look secret (the material that must never be logged)."""
    env = os.environ if environ is None else environ
    return frozenset(v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_EQUAL_LEN)


def redact(text: str, secrets: frozenset[str]) -> str:
    """`text` with every secret value replaced (whole-value matches for short secrets)."""
    if text in secrets:
        return REDACTED
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_CONTAINED_LEN and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"threat": {"epsilon": 8}}`` -> ``{"threat.epsilon": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def scrub(values: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, str]:
    """Flattened string values with secret-named keys dropped and secret values redacted."""
    clean: dict[str, str] = {}
    for key, value in flatten(values).items():
        if is_secret_name(key):
            log.warning("not logging %r: the name looks like a credential", key)
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        clean[key] = redact(text, secrets)
    return clean


class Tracker:
    """MLflow runs for one experiment. ``Tracker()`` uses ``MLFLOW_TRACKING_URI`` or ``<run_dir>/mlflow.db``."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "belladonna", *,
                 run_dir: str | Path | None = None, artifact_location: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow reads it when first imported
        import mlflow

        settings = Settings.from_env(**({"run_dir": str(run_dir)} if run_dir is not None else {}))
        self.run_dir = Path(settings.run_dir).expanduser().resolve()
        self.tracking_uri = tracking_uri or settings.tracking_uri
        db = sqlite_path(self.tracking_uri)
        self._own_folder = False  # the default store: the run folder's database and mlartifacts
        if db is not None:
            check_tracking_uri(self.tracking_uri)  # damaged: one line naming the file, before MLflow opens it
            db.parent.mkdir(parents=True, exist_ok=True)
            self._own_folder = artifact_location is None and db.resolve() == self.run_dir / "mlflow.db"
            artifact_location = artifact_location or (self.run_dir / "mlartifacts").as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        try:
            self.experiment_id = self._experiment(experiment, artifact_location)
        except Exception as exc:
            if db is None or not is_db_error(exc):
                raise
            raise db_error(exc, db) from None
        self._active: ContextVar[tuple[str, ...]] = ContextVar(f"belladonna_runs_{id(self)}", default=())

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, experiment_id={self.experiment_id!r})"

    @property
    def active_run_id(self) -> str | None:
        """The innermost run opened by this tracker in the current context, if any."""
        stack = self._active.get()
        return stack[-1] if stack else None

    @contextmanager
    def parent_run(self, name: str, params: Mapping[str, Any] | None = None,
                   tags: Mapping[str, Any] | None = None, start_time: int | None = None) -> Iterator[str]:
        """A top-level run (one benchmark); yields its run id. FAILED if the block raises.
        `start_time` (ms since the epoch) back-dates the run to when the benchmark really began."""
        with self._run(name, params, None, tags, parent=None, start_time=start_time) as run_id:
            yield run_id

    @contextmanager
    def cell_run(self, name: str, params: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None,
                 parent_run_id: str | None = None, start_time: int | None = None,
                 end_time: int | None = None) -> Iterator[str]:
        """A run nested under `parent_run_id` or the open parent run (one cell); yields its run id.
        `start_time` / `end_time` (ms since the epoch) record when the cell's work really ran."""
        parent = parent_run_id or self.active_run_id
        if parent is None:
            raise RuntimeError("cell_run needs an open parent_run or an explicit parent_run_id")
        with self._run(name, params, metrics, tags, parent=parent, start_time=start_time,
                       end_time=end_time) as run_id:
            yield run_id

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import Param

        clean = scrub(params, secret_values())
        for key, value in clean.items():
            if len(value) > MAX_PARAM_LEN:
                log.warning("param %r truncated to %d characters", key, MAX_PARAM_LEN)
                clean[key] = value[:MAX_PARAM_LEN]
        self.client.log_batch(self._run_id(run_id), params=[Param(k, v) for k, v in clean.items()])

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        clean = scrub(tags, secret_values())
        self.client.log_batch(self._run_id(run_id), tags=[RunTag(k, v) for k, v in clean.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Numbers as MLflow metrics, rounded for display (:func:`display_round`); secret-named ones dropped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in flatten(metrics).items():
            if is_secret_name(key):
                log.warning("not logging metric %r: the name looks like a credential", key)
                continue
            try:
                batch.append(Metric(key, display_round(float(value)), now, step or 0))
            except (TypeError, ValueError):
                raise InputError(f"metric {key!r} is not a number: {type(value).__name__}") from None
        self.client.log_batch(self._run_id(run_id), metrics=batch)

    def log_figure(self, fig: Figure, name: str, run_id: str | None = None) -> str:
        """Save `fig` as ``figures/<name>.png`` (or the extension `name` has); returns the artifact path."""
        path = _artifact_path("figures", name, ".png")
        self.client.log_figure(self._run_id(run_id), fig, path, save_kwargs={"dpi": 120, "bbox_inches": "tight"})
        return path

    def log_table(self, rows: list[Mapping[str, Any]], name: str, run_id: str | None = None) -> list[str]:
        """Rows as ``tables/<name>.json``, ``.csv`` and ``.md`` (secret columns dropped); returns the paths."""
        secrets = secret_values()
        clean = [_scrub_row(row, secrets) for row in rows]
        columns = list(dict.fromkeys(k for row in clean for k in row))
        text_rows = [{k: "" if v is None else str(v) for k, v in row.items()} for row in clean]
        base = _artifact_path("tables", name, "")
        texts = {f"{base}.json": json.dumps(clean, indent=2, default=str),
                 f"{base}.csv": _csv(text_rows, columns), f"{base}.md": _markdown(text_rows, columns)}
        for path, text in texts.items():
            self.client.log_text(self._run_id(run_id), text, path)
        return list(texts)

    def log_text(self, text: str, name: str, run_id: str | None = None) -> str:
        """`text` (secrets redacted) as the artifact `name` (e.g. ``notes/summary.md``)."""
        path = check_key(name)
        self.client.log_text(self._run_id(run_id), redact(text, secret_values()), path)
        return path

    def _run_id(self, run_id: str | None) -> str:
        chosen = run_id or self.active_run_id
        if chosen is None:
            raise RuntimeError("no open run: pass run_id or log inside parent_run / cell_run")
        return chosen

    @contextmanager
    def _run(self, name: str, params: Mapping[str, Any] | None, metrics: Mapping[str, float] | None,
             tags: Mapping[str, Any] | None, parent: str | None, start_time: int | None = None,
             end_time: int | None = None) -> Iterator[str]:
        secrets = secret_values()
        run_tags = scrub(tags or {}, secrets)
        if parent is not None:
            run_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, start_time=start_time, tags=run_tags,
                                     run_name=redact(name, secrets))
        run_id = run.info.run_id
        token = self._active.set((*self._active.get(), run_id))
        status = "FAILED"
        try:
            if params:
                self.log_params(params, run_id)
            if metrics:
                self.log_metrics(metrics, run_id=run_id)
            yield run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._active.reset(token)
            self.client.set_terminated(run_id, status, end_time=end_time if status == "FINISHED" else None)
            log.info("run %s (%s) %s", name, run_id, status.lower())

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        old = moved_from(found.artifact_location, self.run_dir) if found is not None and self._own_folder else None
        if found is not None and old is not None:  # a moved or copied run folder: never write into the old one
            kept = moved_name(name, old)
            self.client.rename_experiment(found.experiment_id, kept)
            log.warning("MLflow: %s was moved or copied from %s; experiment %r goes on in this folder (%s), its "
                        "earlier runs are experiment %r", self.run_dir, old, name, artifact_location, kept)
            found = None
        if found is not None:
            if "mlflow.experimentKind" not in found.tags:  # created by an older version
                self.client.set_experiment_tag(found.experiment_id, "mlflow.experimentKind", "custom_model_development")
            return found.experiment_id
        try:
            # the kind makes MLflow 3's UI open on the runs ("Model training") view, not on GenAI traces
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException:  # created concurrently by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


def _scrub_row(row: Mapping[str, Any], secrets: frozenset[str]) -> dict[str, Any]:
    """Like :func:`scrub`, but numbers, booleans and None keep their JSON type."""
    clean: dict[str, Any] = {}
    for key, value in flatten(row).items():
        if is_secret_name(key):
            continue
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        plain = value is None or isinstance(value, (bool, int, float))
        clean[key] = value if plain and str(value) not in secrets else redact(str(value), secrets)
    return clean


def _artifact_path(folder: str, name: str, default_ext: str) -> str:
    key = check_key(folder, name)
    return key if "." in key.rsplit("/", 1)[-1] or not default_ext else key + default_ext


def _csv(rows: list[dict[str, str]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _markdown(rows: list[dict[str, str]], columns: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
