"""`belladonna compare BASE NEW`: what changed between two runs, cell by cell, and is it noise?

BASE and NEW are each a run folder, a results.json, a benchmark folder or name (its latest run),
``BENCHMARK/latest|previous|latest~N|RUN_ID`` (tasks.run_history; in a store's history with ``--store
s3://...`` or as ``s3://.../runs/BENCHMARK/...``: tasks.store_history), or an MLflow parent run
(``runs:/RUN_ID`` or a 32-hex run id; its ``results.json`` artifact). Exit 0 when nothing got worse,
1 when something did, 2 on bad input (one line). See docs/compare.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from poison_core.errors import InputError

MLFLOW_RUN = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")


def load_run(arg: str, out: Path, tracking_uri: str | None = None, store: str | None = None) -> dict[str, Any]:
    """The validated results (belladonna.results_file) that `arg` names, as a plain dict: a local run,
    an MLflow parent run, or a run in a store's history (``s3://.../runs/NAME[/SELECTOR]``, or
    ``NAME[/SELECTOR]`` with `store`: tasks.store_history)."""
    from belladonna.results_file import read_results
    from tasks import store_history
    from tasks.run_history import resolve

    match = MLFLOW_RUN.match(arg)
    if match and not Path(arg).exists():
        return _from_mlflow(match.group(1), out, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="belladonna-history-") as tmp:
        remote = store_history.resolve(arg, store, Path(tmp), history_runs=0)
        return read_results(remote if remote is not None else resolve(arg, out)).model_dump()


def _from_mlflow(run_id: str, out: Path, tracking_uri: str | None) -> dict[str, Any]:
    """The results.json artifact of the MLflow parent run `run_id` (logged by the benchmark flow)."""
    from belladonna.results_file import read_results

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(f"MLflow run {run_id}: no tracking store at {uri} (set --tracking-uri)")
    from infra.local_checks import check_tracking_uri

    check_tracking_uri(uri, ", or name another with --tracking-uri")  # damaged: one line, not SQLAlchemy's SQL
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory(prefix="belladonna-compare-") as tmp:
        try:
            path = download_artifacts(run_id=run_id, artifact_path="results.json", dst_path=tmp, tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 - mlflow raises many kinds; one line says which run
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise InputError(f"MLflow run {run_id} at {uri}: no results.json artifact ({first})") from None
        return read_results(Path(path)).model_dump()


def _thresholds(min_abs: float, min_rel: float, alpha: float, per_metric: list[str]):
    from poison_core.compare import DIRECTION, Thresholds, direction

    for name, value, low, high in (("--min-abs-change", min_abs, 0, 1e12), ("--min-rel-change", min_rel, 0, 1e6),
                                   ("--alpha", alpha, 1e-12, 0.5)):
        if not (math.isfinite(value) and low <= value <= high):
            raise InputError(f"{name}: {value!r} is outside {low:g}..{high:g}")
    parsed = {}
    for spec in per_metric:
        name, _, rest = spec.partition("=")
        parts = rest.split(",")
        try:
            values = [float(p) for p in parts if p] + [0.0] * (2 - len([p for p in parts if p]))
        except ValueError:
            values = []
        if direction(name) is None or len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values):
            raise InputError(f"--threshold {spec!r}: expected METRIC=ABS[,REL] with METRIC one of "
                             f"{', '.join(DIRECTION)} (or certified_acc_rN) and non-negative numbers")
        parsed[name] = (values[0], values[1])
    return Thresholds(min_abs=min_abs, min_rel=min_rel, alpha=alpha, per_metric=parsed)


def compare(base: str = typer.Argument(..., help="The earlier run (folder, results.json, NAME[/previous], "
                                       "runs:/MLFLOW_RUN_ID)."),
            new: str = typer.Argument(..., help="The later run, in the same forms."),
            out: Path = typer.Option(Path("runs"), help="Run folder that benchmark names are looked up in."),
            min_abs_change: float = typer.Option(0.0, help="Flag only changes at least this large (absolute)."),
            min_rel_change: float = typer.Option(0.0, help="Flag only changes at least this fraction of the base."),
            threshold: list[str] = typer.Option([], help="Per metric: METRIC=ABS[,REL], e.g. asr=0.05 (repeatable)."),
            alpha: float = typer.Option(0.05, help="Family-wise error rate (Holm over every cell and metric)."),
            as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
            markdown: bool = typer.Option(False, "--markdown", help="Print the comparison as markdown."),
            changes_only: bool = typer.Option(False, help="Show only entries that changed or are not comparable."),
            tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI for runs:/ID arguments."),
            store: Optional[str] = typer.Option(None, help="Look benchmark names up in this store's run history "
                                                "(s3://bucket/prefix: STORE/runs/NAME) instead of --out.")
            ) -> None:
    """Compare two runs per cell and metric: both values, the change with its interval, and a verdict.
    Exit 0 when nothing got worse, 1 when something did, 2 on bad input."""
    from belladonna.cli import console
    from poison_core.compare import compare_results
    from poison_core.compare_format import HEADERS, headline, table_rows, to_markdown

    if as_json and markdown:
        raise InputError("--json and --markdown: choose one output format")
    thresholds = _thresholds(min_abs_change, min_rel_change, alpha, threshold)
    result = compare_results(load_run(base, out, tracking_uri, store), load_run(new, out, tracking_uri, store),
                             thresholds)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif markdown:
        typer.echo(to_markdown(result, changes_only))
    else:
        from rich.table import Table

        table = Table(title=headline(result), caption="; ".join([*result["run"], *result["notes"]]) or None)
        for h in HEADERS:
            table.add_column(h, justify="right" if h in ("base", "new", "change [95 % CI]", "p (Holm)") else "left")
        for row in table_rows(result, changes_only):
            style = {"worse": "red", "better": "green"}.get(row[-1].split(":")[0])
            table.add_row(*row, style=style)
        console.print(table)
    if result["regression"]:
        raise typer.Exit(1)
