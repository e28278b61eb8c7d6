"""The benchmark flow, read as a method section:

1. ingest the dataset and fix its seeded train/test split;
2. train the attacker's surrogate models on clean data (when an attack needs them);
3. craft every attack's PoisonSet for every seed (audited on write);
4. retrain the victim under every defense, on clean data and on each poisoned training set;
5. evaluate every (attack, defense, seed) cell against its no-poison baseline;
6. summarize over seeds, with intervals, in MLflow and as a Prefect artifact.

Every stage output is keyed by what determines it, so a rerun reuses whatever is stored.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow

from infra.flow_run_exit import guard_flow_run
from infra.ray_runner import ensure_ray
from infra.warm_up import warm_tracking
from infra.settings import Settings
from infra.storage import Store
from poison_core import presets
from poison_core.config import BenchmarkConfig, load_benchmark
from tasks import prefect_tasks as t
from tasks.preflight import preflight
from tasks.recompute import Recompute
from tasks.records import reason_counts, stage_reasons
from tasks.report import summarize
from tasks.stages import StageOutput, read_cell

log = logging.getLogger(__name__)


def _config(config: str | BenchmarkConfig) -> BenchmarkConfig:
    """A config object, a YAML path, YAML text, or a shipped preset's name (poison_core.presets)."""
    return config if isinstance(config, BenchmarkConfig) else load_benchmark(presets.resolve(config))


def _checked(config: str | BenchmarkConfig, store: str | None, run_dir: str | None = None,
             tracking_uri: str | None = None) -> tuple[BenchmarkConfig, str]:
    """The config and the store root, after the preflight check (nothing started or written yet)."""
    cfg, target = _config(config), Store(store)
    preflight(cfg, target, run_dir, tracking_uri)
    return cfg, target.root


@flow(name="benchmark")
def benchmark(config: str, store: str | None = None, run_dir: str | None = None,
              tracking_uri: str | None = None, recompute: list[str] | None = None,
              compare_to: str | None = None, fail_on_regression: bool | None = None) -> dict[str, Any]:
    """Run every cell of the benchmark `config` (a YAML path, YAML text, or a preset's name such as
    ``nightly``); writes ``run_dir/<name>/results.json`` (what `belladonna report` reads) at the end.
    `run_dir` defaults to ``$BELLADONNA_RUN_DIR`` (else ``./runs``), so a deployment's worker picks it.
    `recompute` names stages, attacks or defenses (or 'all') to recompute although they are stored.
    `compare_to` ('previous') and `fail_on_regression` override the config's ``compare`` section: the
    regression gate (tasks.regression_gate, docs/compare.md)."""
    guard_flow_run("benchmark")  # a worker's flow run: stopped with its worker, it ends Crashed, nothing left
    started = time.time()
    run_dir = run_dir or Settings.from_env().run_dir
    cfg, root = _checked(config, store, run_dir, tracking_uri)
    force = Recompute.parse(recompute, cfg)
    clock = _Clock()
    with clock("ray"):
        ensure_ray(cfg.execution)
    with warm_tracking(tracking_uri, cfg.name, run_dir) as tracking:
        with clock("ingest"):
            dataset = t.ingest(root, cfg, force)
        with clock("pretrain"):
            surrogates = t.pretrain(root, cfg, dataset.key, force)
        with clock("craft"):
            poisons = t.craft(root, cfg, dataset.key, force)
        with clock("retrain"):
            models = t.retrain(root, cfg, dataset.key, poisons, force)
        with clock("evaluate"):
            cells = t.evaluate(root, cfg, dataset.key, poisons, models, force)
        reasons = stage_reasons({"ingest": {cfg.dataset.name: dataset}, "pretrain": surrogates, "craft": poisons,
                                 "retrain": models, "evaluate": cells})
        counts = reason_counts(reasons)
        computed = {stage: sum(tally.values()) for stage, tally in counts.items()}
        rows = [read_cell(Store(root), c.key) for c in cells.values()]
        with clock("summarize"):
            tracking.join()
            recorded = summarize(root, cfg, dataset.key, rows, {k: v.key for k, v in poisons.items()}, computed,
                                tracking_uri, run_dir, outputs={"craft": poisons, "retrain": models,
                                                                "evaluate": cells}, stage_seconds=clock.seconds,
                                reasons=reasons)
    compute = {"ingest": dataset.seconds, "pretrain": _seconds(surrogates), "craft": _seconds(poisons),
               "retrain": _seconds(models), "evaluate": _seconds(cells)}
    result = {"rows": rows, "summary": recorded["summary"], "mlflow": recorded["mlflow"], "computed": computed,
              "computed_reasons": counts, "reasons": reasons,
              "stage_seconds": clock.seconds,
              "compute_seconds": {k: round(v, 3) for k, v in compute.items()},
              "poisons": {f"{a}/seed{s}": p.key for (a, s), p in poisons.items()},
              "nodes": sorted({o.node for o in [*models.values(), *cells.values()] if o.node}),
              "provenance": {"config": cfg.model_dump(mode="json"), "dataset_key": dataset.key,
                             "dataset_fingerprint": recorded.get("dataset_checksum") or dataset.key}}
    return _write_results(result, cfg, root, run_dir, started, compare_to, fail_on_regression)


def _write_results(result: dict[str, Any], cfg: BenchmarkConfig, root: str, run_dir: str, started: float,
                   compare_to: str | None = None, fail_on_regression: bool | None = None) -> dict[str, Any]:
    """Complete the run's record (wall seconds, code version, MLflow parent run, Prefect flow run), run
    the regression gate when asked, and write it atomically to ``run_dir/<name>/<run id>/results.json``
    (and its copy ``run_dir/<name>/results.json``), for a CLI run and a deployment run alike."""
    from prefect.runtime import deployment, flow_run

    from tasks.report import _git_commit

    result.update(seconds=round(time.time() - started, 3), code_version=_git_commit(), store=root,
                  prefect={"flow_run_id": flow_run.id, "flow_run_name": flow_run.name,
                           "deployment": deployment.name})
    from tasks.regression_gate import record_run

    return record_run(result, cfg, Path(run_dir) / cfg.name, started, compare_to, fail_on_regression)


def _seconds(outputs: dict[Any, StageOutput]) -> float:
    """Core compute seconds summed over a stage's jobs (they may have run in parallel)."""
    return sum(o.seconds for o in outputs.values())


class _Clock:
    """Wall seconds per stage, for the run's record."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)


@flow(name="ingest")
def ingest_flow(config: str, store: str | None = None) -> str:
    """Stage 1 alone: store the dataset split; returns its key prefix."""
    guard_flow_run("ingest")
    cfg, root = _checked(config, store)
    return t.ingest(root, cfg).key


@flow(name="craft")
def craft_flow(config: str, store: str | None = None) -> dict[str, str]:
    """Stages 1-3: store every PoisonSet; returns their keys."""
    guard_flow_run("craft")
    cfg, root = _checked(config, store)
    ensure_ray(cfg.execution)
    prefix = t.ingest(root, cfg).key
    t.pretrain(root, cfg, prefix)
    poisons = t.craft(root, cfg, prefix)
    return {f"{a}/seed{s}": p.key for (a, s), p in poisons.items()}


@flow(name="retrain")
def retrain_flow(config: str, store: str | None = None) -> dict[str, str]:
    """Stages 1-4: store every victim; returns their keys."""
    guard_flow_run("retrain")
    cfg, root = _checked(config, store)
    ensure_ray(cfg.execution)
    prefix = t.ingest(root, cfg).key
    t.pretrain(root, cfg, prefix)
    models = t.retrain(root, cfg, prefix, t.craft(root, cfg, prefix))
    return {f"{a or 'clean'}/{d}/seed{s}": m.key for (a, d, s), m in models.items()}
