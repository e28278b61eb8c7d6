"""The summarize stage: the results table, MLflow runs (one parent, one nested run per cell),
figures (poisons per attack; attack x defense heatmaps; DPA's certified accuracy; accuracy against
coverage for availability attacks run at several budgets), the separability table of availability
perturbations (TUE paper, Table 1), and a Prefect markdown artifact."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from infra import figures
from infra.storage import Store
from infra.tracking import Tracker
from poison_core.config import BenchmarkConfig
from poison_core.coverage import coverage_curves
from poison_core.evaluation import summarize as summarize_rows
from poison_core.separability import poison_separability
from tasks.stages import load_splits

log = logging.getLogger(__name__)
HEATMAP_METRICS = ("acc_drop", "asr")


def markdown_table(summary: list[dict[str, Any]]) -> str:
    columns = [c for c in ("attack", "defense", "n_seeds", "clean_acc", "baseline_clean_acc", "acc_drop", "asr",
                           "baseline_asr", "pair_flip_rate", "target_success") if any(c in r for r in summary)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(store: str, cfg: BenchmarkConfig, prefix: str, rows: list[dict[str, Any]],
              poison_keys: dict[tuple, str], computed: dict[str, int], tracking_uri: str | None,
              run_dir: str) -> list[dict[str, Any]]:
    """Aggregate the cells over seeds and record everything in MLflow and Prefect."""
    summary = summarize_rows(rows)
    tracker = Tracker(tracking_uri, experiment=cfg.name, run_dir=run_dir)
    with tracker.parent_run(cfg.name, params=cfg.model_dump(mode="json"), tags={"store": Store(store).root}):
        tracker.log_metrics({f"computed_{k}": float(v) for k, v in computed.items()})
        for row in rows:
            params = {k: row[k] for k in ("attack", "defense", "seed", "poison_id", "model_id")}
            metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "seed"}
            with tracker.cell_run(f"{row['attack']}|{row['defense']}|seed{row['seed']}", params=params,
                                  metrics=metrics):
                pass
        separability = _log_figures(tracker, Store(store), cfg, prefix, summary, poison_keys)
        tracker.log_table(summary, "summary")
        tracker.log_table(rows, "cells")
        markdown = f"# {cfg.name}\n\n{markdown_table(summary)}"
        if separability:
            tracker.log_table(separability, "separability")
            markdown += "\n\n## Separability of the perturbations\n\n" + separability_table(separability)
    create_markdown_artifact(markdown=markdown, key=_artifact_key(cfg.name),
                             description="Belladonna benchmark summary (mean over seeds)")
    return summary


def separability_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| attack | linear | two-layer MLP | chance |", "|---|---|---|---|"]
    lines += [f"| {r['attack']} | {r['linear']:.3f} | {r['mlp']:.3f} | {r['chance']:.3f} |" for r in rows]
    return "\n".join(lines)


def _radius_keys(row: dict[str, Any]) -> list[str]:
    keys = [k for k in row if k.startswith("certified_acc_r") and not k.endswith("_ci")]
    return sorted(keys, key=lambda k: int(k.removeprefix("certified_acc_r")))


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "benchmark"


def _log_figures(tracker: Tracker, store: Store, cfg: BenchmarkConfig, prefix: str,
                 summary: list[dict[str, Any]], poison_keys: dict[tuple, str]) -> list[dict[str, Any]]:
    """Log every figure; returns the separability rows of the availability attacks' perturbations
    (first seed), as the TUE paper's table: a linear model's and a two-layer net's held-out accuracy
    on (delta, label)."""
    import matplotlib.pyplot as plt

    train = load_splits(store, prefix).train
    separability = []
    for attack in cfg.attacks:
        poison_set = store.read_poison_set(poison_keys[(attack.key, cfg.seeds[0])], train)
        clean = train.images[train.positions(poison_set.ids)]
        fig = figures.poison_grid(clean, poison_set.images, n=min(8, len(poison_set)))
        tracker.log_figure(fig, f"poisons_{attack.key}")
        plt.close(fig)
        sep = poison_separability(poison_set, train) if poison_set.targets.get("kind") == "availability" else None
        if sep is not None:
            separability.append({"attack": attack.key, **sep})
    for family, (coverages, by_defense) in coverage_curves(cfg.attacks, cfg.threat, summary).items():
        fig = figures.curve(coverages, by_defense, xlabel="coverage (fraction of the training set poisoned)",
                            ylabel="victim test accuracy", title=f"{family}: accuracy against coverage")
        tracker.log_figure(fig, f"coverage_{family}")
        plt.close(fig)
    curves = {f"{r['attack']} / {r['defense']}": [r[k] for k in _radius_keys(r)] for r in summary if _radius_keys(r)}
    if curves:  # DPA: certified accuracy against the number of insertions/deletions certified
        radii = [int(k.removeprefix("certified_acc_r")) for k in _radius_keys(next(r for r in summary
                                                                                 if _radius_keys(r)))]
        fig = figures.curve(radii, curves, xlabel="radius (training insertions/deletions)",
                            ylabel="certified accuracy", title="DPA certified accuracy")
        tracker.log_figure(fig, "certified_accuracy")
        plt.close(fig)
    for metric in HEATMAP_METRICS:
        values = {(r["attack"], r["defense"]): r[metric] for r in summary if metric in r and not np.isnan(r[metric])}
        if values:
            fig = figures.heatmap(values, title=f"{metric} (mean over seeds)")
            tracker.log_figure(fig, f"heatmap_{metric}")
            plt.close(fig)
    return separability
