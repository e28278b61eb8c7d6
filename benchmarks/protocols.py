"""The availability attacks against each victim protocol: attack x protocol over crafting
seeds, the direction of Ren et al.'s TUE table (ICLR 2023, Table 1: error-minimising noise stops a
supervised victim but barely a SimCLR one; TUE hurts both). Writes ``<out>/protocols.json`` (merged
across runs, one entry per attack, protocol and seed) and ``<out>/protocols.md``; with
``--mlflow-uri`` also one MLflow run holding the whole stored table (experiment ``--experiment``,
default ``belladonna-protocols``; params: the setting; metrics: ``<attack>.<protocol>.acc_mean``,
``.acc_std``, ``.n_seeds``; artifact: ``protocols.md``); ``--log-only`` logs the stored table without
measuring anything.

    python3 -m benchmarks.protocols --attacks clean random_noise error_min_class tue --seeds 0 1
    python3 -m benchmarks.protocols --log-only --mlflow-uri sqlite:///runs/protocols/mlflow.db

Setting: Fashion-MNIST, 4,000 training / 2,000 test images (DatasetConfig seed 0), eps 8/255, 100 %
coverage; victims are the width-16 ConvNet with the recipe of the availability efficacy test (8
epochs, batch 64, SGD lr 0.05 cosine). Protocols go through :func:`poison_core.protocols.build_victim`
exactly as a grid cell's do: ``supervised`` from scratch (victim seed 2), ``simclr-linear`` (SimCLR
20 epochs, batch 256, on the poisoned images without labels, then the linear head on frozen
features, with the same recipe), ``relabel`` (the ten classes merged into two groups the attacker did
not know). ``--recipe augmented`` trains every victim (the supervised one, the SimCLR linear head, the
relabelled one) with the shipped configs' crop-and-flip; its rows carry ``"recipe": "augmented"`` and a
``(augmented)`` label. The error-maximising poisons' surrogate is the clean supervised victim (seed 1,
plain recipe under both, so both recipes judge the same poisons). Poisons are cached under ``--cache``,
keyed by the attack's params and the code fingerprint of its member (a changed attack crafts anew), so
every protocol judges the same PoisonSet. One thread, as the tests. Unlearnable Clusters runs with
either encoder (Zhang et al.'s point is a strong encoder that never saw the labels):
``unlearnable_clusters`` a SimCLR encoder trained on the protected images (20 epochs),
``unlearnable_clusters_pretrained`` the ``transfer`` protocol's source model, a width-16 ConvNet
trained supervised on digits (resized to 28x28).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.efficacy import AVAILABILITY, AVAILABILITY_ATTACKS, RECIPES, VICTIM
from poison_core.attacks import ATTACKS as ATTACK_REGISTRY
from poison_core.attacks import CraftContext, make_attack
from poison_core.code_fingerprint import code_fingerprint, member_module
from poison_core.config import DatasetConfig, SSLConfig, ThreatModel, VictimConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.errors import InputError
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
           "tue_ssl_e10": ("tue", {"ssl_weight": 1.0, "epochs": 10}),  # tue_ssl is ~100 min a seed on 1 CPU
           "unlearnable_clusters": ("unlearnable_clusters", {"encoder": {"epochs": 20}}),
           "unlearnable_clusters_pretrained": ("unlearnable_clusters", {
               "encoder_source": "pretrained", "encoder_model": {"name": "convnet", "width": 16},
               "pretrain": {"dataset": {"name": "digits"}}})}
VICTIM_SEED, SURROGATE_SEED = 2, 1
EXPERIMENT = "belladonna-protocols"


def crafted(key: str, seed: int, train: ImageDataset, cache: Path) -> tuple[PoisonSet | None, float]:
    """The attack's PoisonSet for crafting `seed` (read from `cache` when there) and its crafting seconds."""
    if ATTACKS[key] is None:
        return None, 0.0
    name, params = ATTACKS[key]
    path = cache_path(key, seed, cache)
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


def cache_path(key: str, seed: int, cache: Path) -> Path:
    """Where attack `key`'s PoisonSet for crafting `seed` is cached: keyed by its params and the code
    fingerprint of its member module, so an edited attack never serves an earlier craft."""
    name, params = ATTACKS[key] or ("", {})
    code = code_fingerprint([member_module(ATTACK_REGISTRY.get(name))])
    digest = hashlib.sha256(json.dumps([params, code], sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"{key}-seed{seed}-n{N_TRAIN}-eps{EPS}-{digest}.parquet"


def victim_accuracy(protocol: str, train: ImageDataset, test: ImageDataset, poison_set: PoisonSet | None,
                    recipe: str = "plain") -> float:
    victim = PROTOCOLS[protocol]
    victim = victim.model_copy(update={"train": victim.train.model_copy(update=RECIPES[recipe])})
    data = train if poison_set is None else apply(poison_set, train)
    result = make_defense("none").fit(DefenseContext(train=relabelled(data, victim), victim=victim, seed=VICTIM_SEED))
    return evaluate(result.classifier, relabelled(test, victim))["clean_acc"]


def run(attacks: list[str], protocols: list[str], seeds: list[int], cache: Path, out: Path,
        recipe: str = "plain") -> list[dict[str, Any]]:
    """Every (attack, crafting seed, protocol) victim; each row is merged into <out> as soon as it is measured."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=N_TRAIN, n_test=N_TEST, seed=0))
    rows: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for key in attacks:
        for seed in (seeds if ATTACKS[key] is not None else [0]):
            poison_set, craft_s = crafted(key, seed, splits.train, cache)
            for protocol in protocols:
                start = time.perf_counter()
                acc = victim_accuracy(protocol, splits.train, splits.test, poison_set, recipe)
                rows.append({"attack": key, "protocol": protocol, "seed": seed, "acc": acc,
                             "craft_s": round(craft_s, 1), "victim_s": round(time.perf_counter() - start, 1),
                             **({"recipe": recipe} if recipe != "plain" else {})})
                log.info("%s seed %d %s %s: accuracy %.4f (%.0f s)", key, seed, protocol, recipe, acc,
                         rows[-1]["victim_s"])
                merged = write(rows[-1:], out)
    return merged


def load(path: Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The rows stored at `path` (a JSON list of rows, see :func:`check_rows`); InputError if unreadable."""
    if not path.exists():
        if missing_ok:
            return []
        raise InputError(f"{path}: no such file (run `python3 -m benchmarks.protocols --attacks ...` first)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not readable as JSON ({err})") from None
    return check_rows(stored, str(path))


def check_rows(rows: Any, where: str) -> list[dict[str, Any]]:
    """`rows` if it is a list of rows with a known attack and protocol, an int seed and an accuracy in
    [0, 1]; else InputError naming the row and the field."""
    if not isinstance(rows, list):
        raise InputError(f"{where}: expected a JSON list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{where}: row {i} is a {type(row).__name__}, not an object")
        fields = {"attack": (row.get("attack") in ATTACKS, f"one of {', '.join(ATTACKS)}"),
                  "protocol": (row.get("protocol") in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}"),
                  "seed": (type(row.get("seed")) is int and row["seed"] >= 0, "an integer >= 0"),
                  "acc": (type(row.get("acc")) in (int, float) and 0 <= row["acc"] <= 1, "a number in [0, 1]"),
                  "recipe": (row.get("recipe", "augmented") in RECIPES and row.get("recipe") != "plain",
                             "absent (plain) or one of " + ", ".join(r for r in RECIPES if r != "plain"))}
        for field, (ok, allowed) in fields.items():
            if not ok:
                raise InputError(f"{where}: row {i} field {field!r} is {row.get(field)!r}; must be {allowed}")
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Merge `rows` into <out>/protocols.json (same attack, protocol and seed: replaced), render the table.
    Both the stored and the new rows are checked before anything is written; each file is replaced atomically."""
    path = out / "protocols.json"
    stored = load(path, missing_ok=True)
    merged = {(r["attack"], r.get("recipe", "plain"), r["protocol"], r["seed"]): r
              for r in stored + check_rows(rows, "new rows")}
    rows = sorted(merged.values(), key=lambda r: (list(ATTACKS).index(r["attack"]), "recipe" in r,
                                                  r.get("recipe", ""), r["protocol"], r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("protocols.json", json.dumps(rows, indent=1) + "\n"), ("protocols.md", render(rows))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return rows


def table(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """The accuracies of each (attack, protocol) cell, in the rows' order; an augmented row's attack is
    labelled ``<attack> (augmented)``."""
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cells.setdefault((label(r), r["protocol"]), []).append(r["acc"])
    return cells


def label(row: dict[str, Any]) -> str:
    return f"{row['attack']} ({row['recipe']})" if "recipe" in row else row["attack"]


def stats(values: list[float]) -> tuple[float, float | None]:
    """A cell's mean and its sample standard deviation over seeds (ddof 1; None for one seed)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def render(rows: list[dict[str, Any]]) -> str:
    cells = table(rows)
    protocols = [p for p in PROTOCOLS if any(k[1] == p for k in cells)]
    lines = ["# Availability attacks by victim protocol", "", "`python3 -m benchmarks.protocols` (see its docstring). "
             "Victim test accuracy, mean +- std over crafting seeds (n); lower is a stronger attack. `relabel` has "
             "two classes (chance 0.5).", "", "| attack | " + " | ".join(protocols) + " |",
             "| --- |" + " --- |" * len(protocols)]
    for attack in dict.fromkeys(label(r) for r in rows):
        out = []
        for p in protocols:
            v = cells.get((attack, p), [])
            mean, std = stats(v) if v else (0.0, None)
            out.append(f"{mean:.3f}{'' if std is None else f' +- {std:.3f}'} (n={len(v)})" if v else "-")
        lines.append(f"| {attack} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def setting(attacks: set[str]) -> dict[str, Any]:
    """The benchmark's fixed setting and the crafted `attacks`' names and params, logged as the run's params."""
    return {"dataset": "fashion-mnist", "n_train": N_TRAIN, "n_test": N_TEST, "epsilon": EPS, "coverage": 1.0,
            "victim": f"{VICTIM.name} width {VICTIM.width}", "victim_epochs": AVAILABILITY.epochs,
            "victim_seed": VICTIM_SEED, "surrogate_seed": SURROGATE_SEED, "ssl_epochs": SSL.epochs,
            "ssl_batch_size": SSL.batch_size, "relabel_classes": PROTOCOLS["relabel"].relabel_classes,
            "attack": {key: {"name": spec[0], **spec[1]} for key, spec in ATTACKS.items() if spec and key in attacks}}


def log_mlflow(rows: list[dict[str, Any]], uri: str, out: Path, experiment: str = EXPERIMENT) -> str:
    """One MLflow run holding the table (through :class:`infra.tracking.Tracker`; a sqlite store keeps its
    artifacts in ``mlartifacts`` next to the db): params the setting; metrics ``<attack>.<protocol>.acc_mean``,
    ``.n_seeds`` and, over two or more seeds, ``.acc_std``; artifacts ``protocols.md`` (also the run's
    description) and the rows as ``tables/protocols.{json,csv,md}``. Returns the run id."""
    from infra.tracking import Tracker

    run_dir = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None
    tracker = Tracker(uri, experiment=experiment, run_dir=run_dir)
    metrics: dict[str, float] = {}
    for (attack, protocol), values in table(rows).items():
        mean, std = stats(values)
        metrics[f"{attack}.{protocol}.acc_mean"] = mean
        metrics[f"{attack}.{protocol}.n_seeds"] = len(values)
        if std is not None:
            metrics[f"{attack}.{protocol}.acc_std"] = std
    text = render(rows)
    with tracker.parent_run("availability x protocol", params=setting({r["attack"] for r in rows}),
                            tags={"mlflow.note.content": text, "benchmark": "protocols"}) as run_id:
        tracker.log_metrics(metrics)
        tracker.log_text(text, "protocols.md")
        tracker.log_table(rows, "protocols")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), help="required unless --log-only")
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/belladonna-protocols"))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="plain",
                        help="the victims' recipe: plain, or augmented (random crop + flip)")
    parser.add_argument("--mlflow-uri", default=None, help="e.g. sqlite:///runs/mlflow.db")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    parser.add_argument("--log-only", action="store_true",
                        help="measure nothing: log the table stored in <out>/protocols.json to --mlflow-uri")
    args = parser.parse_args(argv)
    if args.log_only and (args.attacks or not args.mlflow_uri):
        parser.error("--log-only takes --mlflow-uri and no --attacks")
    if not args.log_only and not args.attacks:
        parser.error("--attacks is required unless --log-only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.log_only:
            rows = load(args.out / "protocols.json")
            if not rows:
                raise InputError(f"{args.out / 'protocols.json'}: holds no rows")
        else:
            torch.set_num_threads(1)
            rows = run(args.attacks, args.protocols, args.seeds, args.cache, args.out, args.recipe)
    except InputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.mlflow_uri:
        log.info("MLflow run %s in experiment %s", log_mlflow(rows, args.mlflow_uri, args.out, args.experiment),
                 args.experiment)


if __name__ == "__main__":
    main()
