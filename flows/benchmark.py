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
from typing import Any, Iterator

from prefect import flow

from infra.ray_runner import ensure_ray
from infra.services import warm_tracking
from infra.storage import Store
from poison_core.config import BenchmarkConfig, load_benchmark
from tasks import prefect_tasks as t
from tasks.report import summarize
from tasks.stages import StageOutput, read_cell

log = logging.getLogger(__name__)


def _config(config: str | BenchmarkConfig) -> BenchmarkConfig:
    return config if isinstance(config, BenchmarkConfig) else load_benchmark(config)


@flow(name="benchmark")
def benchmark(config: str, store: str | None = None, run_dir: str = "runs",
              tracking_uri: str | None = None) -> dict[str, Any]:
    """Run every cell of the benchmark YAML at `config` (a path, or YAML text)."""
    cfg = _config(config)
    root = Store(store).root
    clock = _Clock()
    with clock("ray"):
        ensure_ray(cfg.execution)
    with warm_tracking(tracking_uri, cfg.name, run_dir) as tracking:
        with clock("ingest"):
            dataset = t.ingest(root, cfg)
        with clock("pretrain"):
            surrogates = t.pretrain(root, cfg, dataset.key)
        with clock("craft"):
            poisons = t.craft(root, cfg, dataset.key)
        with clock("retrain"):
            models = t.retrain(root, cfg, dataset.key, poisons)
        with clock("evaluate"):
            cells = t.evaluate(root, cfg, dataset.key, poisons, models)
        computed = {"ingest": int(dataset.computed), "pretrain": _count(surrogates), "craft": _count(poisons),
                    "retrain": _count(models), "evaluate": _count(cells)}
        rows = [read_cell(Store(root), c.key) for c in cells.values()]
        with clock("summarize"):
            tracking.join()
            summary = summarize(root, cfg, dataset.key, rows, {k: v.key for k, v in poisons.items()}, computed,
                                tracking_uri, run_dir)
    compute = {"ingest": dataset.seconds, "pretrain": _seconds(surrogates), "craft": _seconds(poisons),
               "retrain": _seconds(models), "evaluate": _seconds(cells)}
    return {"rows": rows, "summary": summary, "computed": computed, "stage_seconds": clock.seconds,
            "compute_seconds": {k: round(v, 3) for k, v in compute.items()},
            "poisons": {f"{a}/seed{s}": p.key for (a, s), p in poisons.items()},
            "nodes": sorted({o.node for o in [*models.values(), *cells.values()] if o.node})}


def _count(outputs: dict[Any, StageOutput]) -> int:
    return sum(o.computed for o in outputs.values())


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
    return t.ingest(Store(store).root, _config(config)).key


@flow(name="craft")
def craft_flow(config: str, store: str | None = None) -> dict[str, str]:
    """Stages 1-3: store every PoisonSet; returns their keys."""
    cfg, root = _config(config), Store(store).root
    ensure_ray(cfg.execution)
    prefix = t.ingest(root, cfg).key
    t.pretrain(root, cfg, prefix)
    poisons = t.craft(root, cfg, prefix)
    return {f"{a}/seed{s}": p.key for (a, s), p in poisons.items()}


@flow(name="retrain")
def retrain_flow(config: str, store: str | None = None) -> dict[str, str]:
    """Stages 1-4: store every victim; returns their keys."""
    cfg, root = _config(config), Store(store).root
    ensure_ray(cfg.execution)
    prefix = t.ingest(root, cfg).key
    t.pretrain(root, cfg, prefix)
    models = t.retrain(root, cfg, prefix, t.craft(root, cfg, prefix))
    return {f"{a or 'clean'}/{d}/seed{s}": m.key for (a, d, s), m in models.items()}
