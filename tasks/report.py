"""The summarize stage: the results table and the MLflow record of the benchmark (one parent run,
one nested run per cell: see :mod:`infra.mlflow_runs`), figures (every cell's labelled poisons;
attack x defense heatmaps, rates on a fixed 0-1 scale; DPA's certified accuracy; ABL's loss curves;
accuracy against coverage for availability attacks run at several budgets), the separability table of
availability perturbations (TUE paper, Table 1), and a Prefect markdown artifact."""

from __future__ import annotations

import getpass
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from infra import figures
from infra.mlflow_runs import BenchmarkRecord, CellRecord, DatasetRecord, flat_summary, log_benchmark
from infra.storage import Store, content_hash
from infra.tracking import Tracker
from poison_core.attacks import make_attack
from poison_core.config import BenchmarkConfig
from poison_core.coverage import coverage_curves
from poison_core.defenses import DEFENSES
from poison_core.evaluation import summarize as summarize_rows
from poison_core.metrics import SUMMARY_COLUMNS, format_value
from poison_core.models.io import read_metadata
from poison_core.separability import poison_separability
from tasks.records import describe_counts, reason_counts
from tasks.stages import StageOutput, load_splits, read_poisons

log = logging.getLogger(__name__)
RATE_HEATMAPS = ("clean_acc", "asr", "pair_flip_rate", "target_success")  # fixed 0-1 colour scale
HEATMAP_METRICS = ("acc_drop", *RATE_HEATMAPS)
NOTES = "## Notes"
"""The description's first section heading: what comes before it (the summary line and the results
table) is what MLflow's run page shows above its "Show more"; the regression gate puts its comparison
just above it (tasks.regression_gate.with_comparison)."""
INTERVALS_NOTE = ("Mean over seeds [95 % interval] (n). Targeted success: Wilson interval on the successes "
                  "pooled over the poison keys of every seed (n = keys). Rates and accuracies on test images: "
                  "Student-t interval over seeds (n = seeds; none from a single seed). Counts: no interval.")


def markdown_table(summary: list[dict[str, Any]], escape_brackets: bool = False) -> str:
    """The results as a markdown table with plain column titles and ``0.871 [0.842, 0.897] (n=3)`` cells
    (`escape_brackets` for MLflow's description renderer, which otherwise draws ``[a, b]`` as a link)."""
    columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in summary)]
    lines = ["| " + " | ".join(SUMMARY_COLUMNS[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_escape(format_value(row, c), escape_brackets) for c in columns) + " |"
              for row in summary]
    return "\n".join(lines)


def _escape(text: str, brackets: bool) -> str:
    text = text.replace("|", "\\|")
    return text.replace("[", "\\[").replace("]", "\\]") if brackets else text


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(store: str, cfg: BenchmarkConfig, prefix: str, rows: list[dict[str, Any]],
              poison_keys: dict[tuple, str], computed: dict[str, int], tracking_uri: str | None,
              run_dir: str, outputs: dict[str, dict[tuple, StageOutput]] | None = None,
              stage_seconds: dict[str, float] | None = None,
              reasons: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Aggregate the cells over seeds and record everything in MLflow and Prefect; returns the summary
    and where its MLflow parent run is. `outputs` (the
    craft, retrain and evaluate StageOutputs) date each cell run; `stage_seconds` (the flow's stages so
    far) dates the parent run back to the start of the benchmark; `reasons` (`tasks.records.stage_reasons`)
    say per stage output why it was computed, or that it was reused."""
    reasons = reasons or {}
    summary = summarize_rows(rows)
    st = Store(store)
    splits = load_splits(st, prefix)
    train = splits.train
    poison_sets = {k: read_poisons(st, cfg, prefix, key, train) for k, key in poison_keys.items()}
    started = time.time() - sum((stage_seconds or {}).values()) if stage_seconds else None
    markdown = f"# {cfg.name}\n\n{markdown_table(summary)}\n\n{INTERVALS_NOTE}"
    described = f"{markdown_table(summary, escape_brackets=True)}\n\n{NOTES}\n\n{INTERVALS_NOTE}"
    with tempfile.TemporaryDirectory(prefix="belladonna-figures-") as tmp:
        grids = _poison_grids(cfg, train, poison_sets, Path(tmp))
        cells = [_cell_record(st, cfg, row, poison_sets[(row["attack"], row["seed"])], grids, outputs or {})
                 for row in rows]
        parent_figures, separability = _parent_figures(cfg, summary, poison_sets, train, grids)
        if separability:
            sep_text = "\n\n## Separability of the perturbations\n\n" + separability_table(separability)
            markdown, described = markdown + sep_text, described + sep_text
        dataset = DatasetRecord(f"{cfg.dataset.name}-train", st.uri(prefix, "train.parquet"), train.checksum(),
                                len(train), tuple(train.image_shape), train.num_classes)
        record = BenchmarkRecord(
            name=cfg.name, summary=summary, description=_description(cfg, described, reasons, stage_seconds),
            params=_parent_params(cfg), started=started,
            tags={**_parent_tags(cfg, st, dataset.checksum),
                  **{f"pipeline.reasons.{k}": describe_counts({k: v}) for k, v in reason_counts(reasons).items()}},
            metrics={**{f"pipeline.computed.{k}": float(v) for k, v in computed.items()},
                     **{f"pipeline.seconds.{k}": float(v) for k, v in (stage_seconds or {}).items()}},
            dataset=dataset, figures=parent_figures, cells=cells,
            tables={"summary": flat_summary(summary), "cells": rows,
                    "recomputed": [{"stage": stage, "output": label, "reason": why}
                                   for stage, found in reasons.items() for label, why in found.items()],
                    **({"separability": separability} if separability else {})},
            texts={path: markdown + "\n" for path in ("summary.md", "tables/summary.md")})  # readable, not raw
        tracker = Tracker(tracking_uri, experiment=cfg.name, run_dir=run_dir)
        parent = log_benchmark(tracker, record)
    create_markdown_artifact(markdown=f"{markdown}\n\n{_mlflow_link(tracker, parent)}", key=_artifact_key(cfg.name),
                             description="Belladonna benchmark summary (mean over seeds)")
    return {"summary": summary, "dataset_checksum": dataset.checksum, "mlflow": {"tracking_uri": tracker.tracking_uri,
                                           "experiment_id": tracker.experiment_id, "run_id": parent}}


def separability_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| attack | linear | two-layer MLP | chance |", "|---|---|---|---|"]
    lines += [f"| {r['attack']} | {r['linear']:.3f} | {r['mlp']:.3f} | {r['chance']:.3f} |" for r in rows]
    return "\n".join(lines)


def _radius_keys(row: dict[str, Any], prefix: str = "certified_acc_r") -> list[str]:
    keys = [k for k in row if k.startswith(prefix) and k.removeprefix(prefix).isdigit()]
    return sorted(keys, key=lambda k: int(k.removeprefix(prefix)))


def _mlflow_link(tracker: Tracker, run_id: str) -> str:
    """The artifact's link to the benchmark's MLflow parent run. For a local store the URL is that of
    the UI that ``mlflow ui --backend-store-uri <uri>`` serves on its default port."""
    from infra.mlflow_runs import runs_view_url

    uri = tracker.tracking_uri
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"MLflow run [{run_id}]({runs_view_url(base, tracker.experiment_id, run_id)}) (tracking URI `{uri}`)"


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "benchmark"


def _git_commit() -> str:
    """The commit of the code that ran (with ``-dirty`` for uncommitted changes), or ``unknown``."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _parent_params(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The config, with each attack's *effective* threat model (no top-level threat an attack may not use)."""
    params = cfg.model_dump(mode="json")
    for name in ("threat", "attacks", "defenses"):
        params.pop(name)
    params["attacks"] = ", ".join(a.key for a in cfg.attacks)
    params["defenses"] = ", ".join(d.key for d in cfg.defenses)
    params["attack"] = {a.key: {"name": a.name, "params": a.params,
                                "threat": cfg.threat_for(a).model_dump(mode="json")} for a in cfg.attacks}
    params["defense"] = {d.key: {"name": d.name, "params": d.params} for d in cfg.defenses}
    return params


def _parent_tags(cfg: BenchmarkConfig, store: Store, dataset_checksum: str) -> dict[str, Any]:
    commit = _git_commit()
    return {"store": store.root, "git_commit": commit, "mlflow.source.git.commit": commit,
            "config_hash": content_hash(cfg.model_dump(mode="json")), "dataset_checksum": dataset_checksum,
            "mlflow.user": getpass.getuser(), "benchmark": cfg.name, "victim_protocol": cfg.victim.protocol}


def _description(cfg: BenchmarkConfig, markdown: str, reasons: dict[str, dict[str, str]],
                 stage_seconds: dict[str, float] | None) -> str:
    """The parent run's description: one summary line and the results table first (what the run page
    shows before "Show more"), then the notes."""
    cells = len(cfg.attacks) * len(cfg.defenses) * len(cfg.seeds)
    grid = (f"{cells} cells ({_count(len(cfg.attacks), 'attack')} x {_count(len(cfg.defenses), 'defense')} x "
            f"{_count(len(cfg.seeds), 'seed')}) on {cfg.dataset.name}")
    lines = [f"**{cfg.name}**: {grid}; mean over seeds \\[95 % interval\\] (n).", "", markdown, "",
             "One nested run per cell: open a cell for its training curves and figures.",
             "Computed (not reused), and why: " + describe_counts(reason_counts(reasons)) + "."]
    if stage_seconds:
        lines.append("Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items()) + ".")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _poison_grids(cfg: BenchmarkConfig, train, poison_sets: dict, folder: Path) -> dict[tuple, Path]:
    """One labelled poison grid per (attack, seed), as a PNG every cell of that attack and seed logs."""
    grids = {}
    for (attack, seed), ps in poison_sets.items():
        count = min(8, len(ps))
        if count == 0:
            continue
        fig = figures.poison_grid(train.images[train.positions(ps.ids)], ps.images, n=count,
                                  orig_labels=ps.orig_labels[:count], poison_labels=ps.poison_labels[:count],
                                  title=f"{attack} (seed {seed})", class_names=train.class_names, total=len(ps))
        path = folder / f"{attack}-seed{seed}" / "poisons.png"
        path.parent.mkdir(parents=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        grids[(attack, seed)] = path
    return grids


def _cell_record(store: Store, cfg: BenchmarkConfig, row: dict[str, Any], poison_set, grids: dict,
                 outputs: dict[str, dict[tuple, StageOutput]]) -> CellRecord:
    attack, defense, seed = row["attack"], row["defense"], row["seed"]
    a_cfg = next(a for a in cfg.attacks if a.key == attack)
    d_cfg = next(d for d in cfg.defenses if d.key == defense)
    family = (poison_set.targets or {}).get("kind") or ("backdoor" if poison_set.trigger else "unknown")
    attack_params = poison_set.provenance.get("params") or make_attack(a_cfg.name, a_cfg.params).params.model_dump(
        mode="json")
    params = {"attack": attack, "defense": defense, "seed": seed, "poison_id": row.get("poison_id"),
              "model_id": row.get("model_id"), "attack_name": a_cfg.name, "attack_params": attack_params,
              "threat": poison_set.threat.model_dump(mode="json"), "defense_name": d_cfg.name,
              "defense_params": DEFENSES.get(d_cfg.name).Params.model_validate(d_cfg.params).model_dump(mode="json")}
    retrain = outputs.get("retrain", {}).get((attack, defense, seed))
    evaluate = outputs.get("evaluate", {}).get((attack, defense, seed))
    timed = retrain is not None and evaluate is not None and retrain.started > 0 and evaluate.ended > 0
    craft = outputs.get("craft", {}).get((attack, seed))
    seconds = {f"seconds_{k}": o.seconds for k, o in (("craft", craft), ("retrain", retrain), ("evaluate", evaluate))
               if o is not None}
    tags = {"attack": attack, "defense": defense, "seed": str(seed), "family": family, "mlflow.user": getpass.getuser(),
            "reused": "false" if timed else "true", "victim_protocol": cfg.victim.protocol}
    history = _history(store, row.get("model_id"))
    figs: dict[str, Any] = {}
    if (attack, seed) in grids:
        figs["poisons"] = grids[(attack, seed)]
    abl = [r for r in history if "loss_clean" in r and "loss_poison" in r]
    if abl:
        figs["abl_losses"] = figures.curve([r["epoch"] for r in abl], {
            "clean samples": [r["loss_clean"] for r in abl], "poisoned samples": [r["loss_poison"] for r in abl]},
            xlabel="epoch", ylabel="mean training loss", title=f"ABL: {attack} (seed {seed})")
    radii = _radius_keys(row)
    if radii:
        curves = {"poisoned victim": [row[k] for k in radii]}
        if all(f"baseline_{k}" in row for k in radii):
            curves["no-poison victim"] = [row[f"baseline_{k}"] for k in radii]
        figs["certified_accuracy"] = figures.curve(
            [int(k.removeprefix("certified_acc_r")) for k in radii], curves,
            xlabel="radius (training insertions/deletions)", ylabel="certified accuracy",
            title=f"DPA certified accuracy: {attack} (seed {seed})")
    return CellRecord(name=f"{attack}|{defense}|seed{seed}", row={**row, **seconds}, params=params, tags=tags,
                      started=retrain.started if timed else None, ended=evaluate.ended if timed else None,
                      history=history, figures=figs)


def _history(store: Store, model_key: str | None) -> list[dict[str, Any]]:
    """The victim's per-epoch training history, stored with its weights (see tasks.stages.retrain)."""
    if not model_key:
        return []
    try:
        info = json.loads(read_metadata(store.read_bytes(model_key)).get("defense_info", "{}"))
    except (OSError, ValueError) as exc:
        log.warning("no training history for %s: %s", model_key, exc)
        return []
    return list(info.get("history") or [])


def _parent_figures(cfg: BenchmarkConfig, summary: list[dict[str, Any]], poison_sets: dict, train,
                    grids: dict) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parent's figures and the separability rows of the availability attacks' perturbations
    (first seed), as the TUE paper's table: a linear model's and a two-layer net's held-out accuracy
    on (delta, label)."""
    out: dict[str, Any] = {}
    separability = []
    for attack in cfg.attacks:
        key = (attack.key, cfg.seeds[0])
        if key in grids:
            out[f"poisons_{attack.key}"] = grids[key]
        poison_set = poison_sets[key]
        sep = poison_separability(poison_set, train) if poison_set.targets.get("kind") == "availability" else None
        if sep is not None:
            separability.append({"attack": attack.key, **sep})
    for family, (coverages, by_defense) in coverage_curves(cfg.attacks, cfg.threat, summary).items():
        out[f"coverage_{family}"] = figures.curve(
            coverages, by_defense, xlabel="coverage (fraction of the training set poisoned)",
            ylabel="victim test accuracy", title=f"{family}: accuracy against coverage")
    with_radii = [r for r in summary if _radius_keys(r)]
    if with_radii:  # DPA: certified accuracy against the number of insertions/deletions certified
        radii = _radius_keys(with_radii[0])
        curves = {f"{r['attack']} / {r['defense']}": [r.get(k, float("nan")) for k in radii] for r in with_radii}
        out["certified_accuracy"] = figures.curve([int(k.removeprefix("certified_acc_r")) for k in radii], curves,
                                                  xlabel="radius (training insertions/deletions)",
                                                  ylabel="certified accuracy", title="DPA certified accuracy")
    for metric in HEATMAP_METRICS:
        values = {(r["attack"], r["defense"]): r[metric] for r in summary if metric in r and r[metric] == r[metric]}
        if values:
            scale = {"vmin": 0.0, "vmax": 1.0} if metric in RATE_HEATMAPS else {}
            out[f"heatmap_{metric}"] = figures.heatmap(values, title=f"{SUMMARY_COLUMNS.get(metric, metric)} "
                                                       "(mean over seeds)", **scale)
    return out, separability
