"""The availability attacks against each victim protocol (issue 22): attack x protocol over crafting
seeds, the direction of Ren et al.'s TUE table (ICLR 2023, Table 1: error-minimising noise stops a
supervised victim but barely a SimCLR one; TUE hurts both). Writes ``<out>/protocols.json`` (merged
across runs, one entry per attack, protocol and seed) and ``<out>/protocols.md``; with
``--mlflow-uri`` also one MLflow run holding the table (params: the setting; metrics:
``<attack>.<protocol>.acc_mean``; artifact: ``protocols.md``).

    python3 -m benchmarks.protocols --attacks clean random_noise error_min_class tue --seeds 0 1

Setting: Fashion-MNIST, 4,000 training / 2,000 test images (DatasetConfig seed 0), eps 8/255, 100 %
coverage; victims are the width-16 ConvNet with the recipe of the availability efficacy test (8
epochs, batch 64, SGD lr 0.05 cosine). Protocols go through :func:`poison_core.protocols.build_victim`
exactly as a grid cell's do: ``supervised`` from scratch (victim seed 2), ``simclr-linear`` (SimCLR
20 epochs, batch 256, on the poisoned images without labels, then the linear head on frozen
features, with the same recipe), ``relabel`` (the ten classes merged into two groups the attacker did
not know). The error-maximising poisons' surrogate is the clean supervised victim (seed 1). Poisons
are cached under ``--cache`` so every protocol judges the same PoisonSet. One thread, as the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.efficacy import AVAILABILITY, AVAILABILITY_ATTACKS, VICTIM
from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, SSLConfig, ThreatModel, VictimConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.evaluation import evaluate
from poison_core.poisons import PoisonSet, apply, from_parquet_bytes, to_parquet_bytes
from poison_core.protocols import relabelled

log = logging.getLogger("benchmarks.protocols")

N_TRAIN, N_TEST, EPS = 4000, 2000, 8
SSL = SSLConfig(epochs=20, batch_size=256)
PROTOCOLS = {
    "supervised": VictimConfig(model=VICTIM, train=AVAILABILITY),
    "simclr-linear": VictimConfig(model=VICTIM, train=AVAILABILITY, protocol="simclr-linear", ssl=SSL),
    "relabel": VictimConfig(model=VICTIM, train=AVAILABILITY, protocol="relabel", relabel_classes=2),
}
ATTACKS = {"clean": None, **AVAILABILITY_ATTACKS,
           "tue_ssl": ("tue", {"ssl_weight": 1.0}),
           "unlearnable_clusters": ("unlearnable_clusters", {"encoder": {"epochs": 20}})}
VICTIM_SEED, SURROGATE_SEED = 2, 1


def crafted(key: str, seed: int, train: ImageDataset, cache: Path) -> tuple[PoisonSet | None, float]:
    """The attack's PoisonSet for crafting `seed` (read from `cache` when there) and its crafting seconds."""
    if ATTACKS[key] is None:
        return None, 0.0
    name, params = ATTACKS[key]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{key}-seed{seed}-n{N_TRAIN}-eps{EPS}-{digest}.parquet"
    if path.exists():
        return from_parquet_bytes(path.read_bytes()), 0.0
    surrogate = make_defense("none").fit(DefenseContext(train=train, victim=PROTOCOLS["supervised"],
                                                        seed=SURROGATE_SEED)).classifier.model
    start = time.perf_counter()
    ctx = CraftContext(train=train, threat=ThreatModel(epsilon=EPS, budget=1.0, clean_label=True), seed=seed,
                       surrogates=[surrogate])
    poison_set = make_attack(name, params).craft(ctx)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_parquet_bytes(poison_set))
    return poison_set, seconds


def victim_accuracy(protocol: str, train: ImageDataset, test: ImageDataset, poison_set: PoisonSet | None) -> float:
    victim = PROTOCOLS[protocol]
    data = train if poison_set is None else apply(poison_set, train)
    result = make_defense("none").fit(DefenseContext(train=relabelled(data, victim), victim=victim, seed=VICTIM_SEED))
    return evaluate(result.classifier, relabelled(test, victim))["clean_acc"]


def run(attacks: list[str], protocols: list[str], seeds: list[int], cache: Path, out: Path) -> list[dict[str, Any]]:
    """Every (attack, crafting seed, protocol) victim; each row is merged into <out> as soon as it is measured."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=N_TRAIN, n_test=N_TEST, seed=0))
    rows: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for key in attacks:
        for seed in (seeds if ATTACKS[key] is not None else [0]):
            poison_set, craft_s = crafted(key, seed, splits.train, cache)
            for protocol in protocols:
                start = time.perf_counter()
                acc = victim_accuracy(protocol, splits.train, splits.test, poison_set)
                rows.append({"attack": key, "protocol": protocol, "seed": seed, "acc": acc,
                             "craft_s": round(craft_s, 1), "victim_s": round(time.perf_counter() - start, 1)})
                log.info("%s seed %d %s: accuracy %.4f (%.0f s)", key, seed, protocol, acc, rows[-1]["victim_s"])
                merged = write(rows[-1:], out)
    return merged


def write(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Merge `rows` into <out>/protocols.json (same attack, protocol and seed: replaced), render the table."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "protocols.json"
    stored = json.loads(path.read_text()) if path.exists() else []
    merged = {(r["attack"], r["protocol"], r["seed"]): r for r in stored + rows}
    rows = sorted(merged.values(), key=lambda r: (list(ATTACKS).index(r["attack"]), r["protocol"], r["seed"]))
    path.write_text(json.dumps(rows, indent=1) + "\n")
    (out / "protocols.md").write_text(render(rows))
    return rows


def table(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cells.setdefault((r["attack"], r["protocol"]), []).append(r["acc"])
    return cells


def render(rows: list[dict[str, Any]]) -> str:
    cells = table(rows)
    protocols = [p for p in PROTOCOLS if any(k[1] == p for k in cells)]
    lines = ["# Availability attacks by victim protocol", "", "`python3 -m benchmarks.protocols` (see its docstring). "
             "Victim test accuracy, mean +- std over crafting seeds (n); lower is a stronger attack. `relabel` has "
             "two classes (chance 0.5).", "", "| attack | " + " | ".join(protocols) + " |",
             "| --- |" + " --- |" * len(protocols)]
    for attack in [a for a in ATTACKS if any(k[0] == a for k in cells)]:
        out = []
        for p in protocols:
            v = cells.get((attack, p), [])
            std = f" +- {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""
            out.append(f"{np.mean(v):.3f}{std} (n={len(v)})" if v else "-")
        lines.append(f"| {attack} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def log_mlflow(rows: list[dict[str, Any]], uri: str, out: Path) -> str:
    """One MLflow run holding the table: the setting as params, each cell's mean as a metric."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("belladonna-protocols")
    with mlflow.start_run(run_name="availability x protocol") as run:
        mlflow.log_params({"dataset": "fashion-mnist", "n_train": N_TRAIN, "n_test": N_TEST, "epsilon": EPS,
                           "victim": f"{VICTIM.name} width {VICTIM.width}", "ssl_epochs": SSL.epochs})
        for (attack, protocol), values in table(rows).items():
            mlflow.log_metric(f"{attack}.{protocol}.acc_mean", float(np.mean(values)))
            mlflow.log_metric(f"{attack}.{protocol}.n_seeds", len(values))
        mlflow.log_artifact(str(out / "protocols.md"))
        mlflow.log_table({k: [r[k] for r in rows] for k in ("attack", "protocol", "seed", "acc")}, "protocols.json")
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), required=True)
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/belladonna-protocols"))
    parser.add_argument("--mlflow-uri", default=None, help="e.g. sqlite:///runs/mlflow.db")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    rows = run(args.attacks, args.protocols, args.seeds, args.cache, args.out)
    if args.mlflow_uri:
        log.info("MLflow run %s", log_mlflow(rows, args.mlflow_uri, args.out))


if __name__ == "__main__":
    main()
