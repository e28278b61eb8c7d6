"""`belladonna`: run benchmarks and list the registered attacks, defenses, models and datasets.

Exit codes: 0 success; 2 bad input (one line on stderr naming the problem); 1 any other failure.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from belladonna.lifecycle.standing import app as standing_app
from belladonna.check_cli import check_member_command
from belladonna.store_cli import app as store_app
from poison_core.errors import AuditError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)
log = logging.getLogger("belladonna")

QUICKSTART = "quickstart"


def _source(config: Optional[Path]) -> str | Path:
    """What a config argument names: a YAML file, or a shipped preset's YAML text (``nightly``; the
    quick-start when none is given), through the one lookup the flows use (poison_core.presets)."""
    from poison_core import presets

    return presets.preset_text(QUICKSTART) if config is None else presets.resolve(str(config))


def _text(config: Optional[Path]) -> str:
    """The config's YAML text, which travels to the flow."""
    from poison_core.config import read_yaml_text

    source = str(_source(config))
    return read_yaml_text(source) if config is not None and source == str(config) else source


def _load(config: Optional[Path]):
    """Validate the config (a YAML file or a preset's name; the quick-start when none is given), its member
    names and parameters included (poison_core.members)."""
    from poison_core.config import load_benchmark
    from poison_core.members import check_names

    cfg = load_benchmark(_source(config))
    check_names(cfg)
    return cfg


def _supervise(logs: Path, name: str) -> None:
    """Around a flow: a log file, Ctrl-C within seconds, a watcher (belladonna.lifecycle.supervise)."""
    from belladonna import lifecycle

    lifecycle.supervise(logs, name, lambda line: err_console.print(line, markup=False, soft_wrap=True))


def _sweep_on_stop(target: Any) -> None:
    """Remove what earlier killed writers left in the store, and what this command's would if a signal
    stops it (infra.storage.Store.sweep_orphans)."""
    from belladonna import lifecycle

    target.sweep_orphans()
    lifecycle.at_stop(target.sweep_orphans)


def _quiet_services() -> None:
    """Local defaults for the services the flow starts (a user's explicit setting wins)."""
    for name, value in {"RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                        "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_LOGGING_LEVEL": "WARNING",
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
        os.environ.setdefault(name, value)


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="Benchmark YAML or preset name (quickstart, nightly); "
                                             "default: the digits quick-start."),
        out: Path = typer.Option(Path("runs"), help="Run folder: MLflow store, results.json, default store."),
        store: Optional[str] = typer.Option(None, help="Store root (path or s3://bucket/prefix); "
                                            "default: $BELLADONNA_STORE or OUT/store."),
        recompute: list[str] = typer.Option([], help="Recompute although stored (repeatable): a stage (ingest, "
                                            "pretrain, craft, retrain, evaluate: it and the stages after it), "
                                            "an attack or defense of the grid, or 'all'. Deletes nothing.")) -> None:
    """Run a benchmark grid (every attack x defense x seed) as a Prefect flow on Ray.

    The last line is the command's wall time. Uses OUT's standing services (`belladonna services
    start`) while they answer."""
    from belladonna import lifecycle

    timeline = lifecycle.begin()  # first: its exit handler runs after every other one
    from infra.storage import Store
    from tasks.preflight import preflight
    from tasks.recompute import Recompute

    cfg = _load(config)
    Recompute.parse(recompute, cfg)
    target = Store(store or os.environ.get("BELLADONNA_STORE") or str(out / "store"))
    preflight(cfg, target, out)
    root = target.root
    _sweep_on_stop(target)
    used = lifecycle.use_standing(out)
    _quiet_services()
    _supervise(out / "logs", cfg.name)
    services = lifecycle.start_services(cfg.execution)
    from flows.benchmark import benchmark

    services.wait()
    timeline.mark("start-up")
    flow_started = time.time()
    with err_console.status(f"{cfg.name}: {len(cfg.attacks) * len(cfg.defenses) * len(cfg.seeds)} cells"):
        result = lifecycle.off_main_thread(benchmark, config=_text(config), store=root,  # writes results.json
                                         run_dir=str(out.resolve()), recompute=list(recompute) or None)
    _report_quarantined(target, flow_started)
    timeline.mark("flow")
    console.print(_table(result["summary"], title=f"{cfg.name}: mean over {len(cfg.seeds)} seed(s)"))
    from infra.mlflow_runs import ui_message
    from tasks.records import describe_counts

    counts = describe_counts(result["computed_reasons"])

    using = "".join(f"; {name} {where} (belladonna services)" for name, where in used.items())
    console.print(f"computed (not reused): {counts}; store {root}{using}", highlight=False)
    console.print(ui_message(cfg.name, out.resolve()), markup=False, highlight=False, soft_wrap=True)
    timeline.mark("report")
    lifecycle.finish(timeline, lambda line: console.print(line, highlight=False))  # printed at exit


def _report_quarantined(store, started: float) -> None:
    """One warning (terminal and OUT/logs) per stored output that a stage found damaged, moved aside and
    recomputed during this flow: the stage's own warning went to its Ray worker's log only."""
    for key, reason in store.quarantined_since(started):
        log.warning("damaged stored output quarantined and recomputed: %s (%s)", store.uri(key), reason)


COLUMNS = ("attack", "defense", "n_seeds", "clean_acc", "baseline_clean_acc", "acc_drop", "asr", "baseline_asr",
           "pair_flip_rate", "target_success")


def _table(summary: list[dict[str, Any]], title: str) -> Table:
    """The results with plain column titles; each cell reads ``0.871 [0.842, 0.897] (n=3)``: the mean
    over seeds, its 95 % interval and the n it is over (poison_core.metrics.format_value)."""
    from poison_core.metrics import SUMMARY_COLUMNS, format_value

    present = [c for c in COLUMNS if any(c in row for row in summary)]
    table = Table(title=title, caption="mean [95 % interval] (n: seeds; poison keys for targets hit)")
    for c in present:
        table.add_column(SUMMARY_COLUMNS.get(c, c), justify="left" if c in ("attack", "defense") else "right",
                         no_wrap=c in ("attack", "defense"))
    for row in summary:
        table.add_row(*[format_value(row, c) for c in present])
    return table


def _listing(kind: str) -> None:
    from poison_core.attacks import ATTACKS
    from poison_core.data import DATASETS
    from poison_core.defenses import DEFENSES
    from poison_core.models import MODELS

    registry = {"attacks": ATTACKS, "defenses": DEFENSES, "models": MODELS, "datasets": DATASETS}[kind]
    table = Table(title=kind)
    for col in ("name", "origin", "paper", "summary"):
        table.add_column(col)
    for entry in registry.entries():
        table.add_row(entry.name, entry.origin, entry.paper, entry.summary)
    for name, why in registry.broken().items():
        table.add_row(name, "BROKEN", "", why)
    console.print(table)


stage_app = typer.Typer(help="Run one stage (and what it needs) as its own Prefect flow.")
app.add_typer(stage_app, name="stage")
app.add_typer(standing_app, name="services")
app.add_typer(store_app, name="store")
app.command("check")(check_member_command)


def _stage(name: str, config: Path, store: Optional[str]) -> None:
    from belladonna import lifecycle
    from infra.storage import Store
    from tasks.preflight import preflight

    target = Store(store)
    cfg = _load(config)
    preflight(cfg, target)
    root = target.root
    _sweep_on_stop(target)
    lifecycle.use_standing(Path("runs"))
    _quiet_services()
    _supervise(Path("runs") / "logs", f"{cfg.name}-{name}")
    services = lifecycle.start_services(cfg.execution)
    from flows import benchmark as flows

    flow = {"ingest": flows.ingest_flow, "craft": flows.craft_flow, "retrain": flows.retrain_flow}[name]
    services.wait()
    flow_started = time.time()
    out = lifecycle.off_main_thread(flow, config=_text(config), store=root)
    _report_quarantined(target, flow_started)
    items = out.items() if isinstance(out, dict) else [("dataset", out)]
    for what, key in items:
        console.print(f"{what}\t{root}/{key}", markup=False, highlight=False)


STORE_HELP = "Store root (path or s3://bucket/prefix); default: $BELLADONNA_STORE or ./runs/store."


@stage_app.command("ingest")
def stage_ingest(config: Path, store: Optional[str] = typer.Option(None, help=STORE_HELP)) -> None:
    """Load and split the dataset into the store."""
    _stage("ingest", config, store)


@stage_app.command("craft")
def stage_craft(config: Path, store: Optional[str] = typer.Option(None, help=STORE_HELP)) -> None:
    """Craft every attack's PoisonSet (after ingest and surrogate pretraining)."""
    _stage("craft", config, store)


@stage_app.command("retrain")
def stage_retrain(config: Path, store: Optional[str] = typer.Option(None, help=STORE_HELP)) -> None:
    """Train every victim, clean and poisoned, under every defense."""
    _stage("retrain", config, store)


@app.command()
def report(run_folder: str = typer.Argument(..., help="A run folder, its results.json, a benchmark folder or name "
                                            "(its latest run), BENCHMARK/latest|previous|RUN_ID, or "
                                            "s3://.../runs/BENCHMARK[/latest|...] (a store's run history)."),
           out: Path = typer.Option(Path("runs"), help="Run folder that benchmark names are looked up in."),
           html: Optional[Path] = typer.Option(None, help="Also write a self-contained HTML report page here."),
           store: Optional[str] = typer.Option(None, help="Look benchmark names up in this store's run history "
                                               "(s3://bucket/prefix: STORE/runs/NAME) instead of --out.")
           ) -> None:
    """Print the results table of a finished run (and write its HTML page with --html)."""
    import tempfile

    from belladonna.results_file import read_results
    from tasks import store_history
    from tasks.run_history import resolve

    with tempfile.TemporaryDirectory(prefix="belladonna-history-") as tmp:
        remote = store_history.resolve(run_folder, store, Path(tmp))
        path = remote if remote is not None else resolve(run_folder, out)
        result = read_results(path)  # a FIFO, a folder, bad UTF-8 or JSON, wrong types: one line, exit 2
        summary = [row.model_dump() for row in result.summary]
        console.print(_table(summary, title=f"{path.parent.name}"))
        for stage, seconds in result.stage_seconds.items():
            console.print(f"{stage:>10}: {seconds:7.1f}s", highlight=False)
        if html is not None:
            from tasks.html_report import write_report_for

            console.print(f"report page: {write_report_for(path, html)}", highlight=False)


@app.command()
def audit(poisons: Path = typer.Argument(..., help="A PoisonSet Parquet file (local path or fsspec URI)."),
          config: Path = typer.Argument(..., help="The benchmark YAML whose dataset the poisons claim.")) -> None:
    """Audit a PoisonSet against the config's threat model for its attack and its clean training set."""
    from poison_core.data import load_dataset
    from poison_core.poisons import additive_linf, audit_file

    cfg = _load(config)
    train = load_dataset(cfg.dataset).train
    ps, threat = audit_file(str(poisons), train, cfg)
    linf = additive_linf(ps, train)  # from the colour-shifted base when the poisons have a colour part
    console.print(f"ok: {len(ps)} poisons of {len(train)} (budget {threat.budget}), L-inf {linf}/255 "
                  f"<= {threat.epsilon}/255, {int(ps.flipped.sum())} labels changed", highlight=False)


from belladonna.interop_cli import export_poisons, import_poisons  # noqa: E402  (the commands' bodies)

app.command("import")(import_poisons)
app.command("export")(export_poisons)

from belladonna.compare_cli import compare  # noqa: E402

app.command("compare")(compare)


@app.command()
def attacks() -> None:
    """List the registered attacks with their paper."""
    _listing("attacks")


@app.command()
def defenses() -> None:
    """List the registered defenses with their paper."""
    _listing("defenses")


@app.command()
def models() -> None:
    """List the registered model architectures."""
    _listing("models")


@app.command()
def datasets() -> None:
    """List the registered dataset loaders."""
    _listing("datasets")


@app.command()
def validate(config: Path) -> None:
    """Validate a benchmark YAML and its dataset without running it (the checks `run` makes first)."""
    from tasks.preflight import preflight

    cfg = _load(config)
    preflight(cfg)
    console.print(f"{config}: valid benchmark {cfg.name!r} with "
                  f"{len(cfg.attacks) * len(cfg.defenses) * len(cfg.seeds)} cells")


def main() -> None:
    """Console entry point: maps bad input to exit 2 and other failures to exit 1, one line each."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown command or option, missing argument
        exc.show()
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as raised:  # the last line of defense: it prints one line
        from belladonna.lifecycle import log_file

        exc = _root_cause(raised)
        if log_file() is not None:  # the traceback goes to the log file only
            log.error("failed", exc_info=raised)
        where = f" (traceback: {log_file()})" if log_file() else ""
        if isinstance(exc, (InputError, AuditError)):
            err_console.print(f"error: {_one_line(exc)}", markup=False, soft_wrap=True)
            sys.exit(2)
        err_console.print(f"failed: {type(exc).__name__}: {_one_line(exc)}{where}", markup=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _root_cause(exc: BaseException) -> BaseException:
    """The user's error inside Ray's RayTaskError wrapper (its `cause`), else `exc` itself."""
    for _ in range(5):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            return exc
        exc = cause
    return exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    main()
