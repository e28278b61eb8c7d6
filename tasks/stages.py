"""The pipeline's stages as plain functions over a Store: each reads its inputs from the store and
writes its output under a key derived from everything that determines it (`tasks.keys`), and returns
at once when that output already exists (a rerun after a crash resumes instead of recomputing), unless
`force` asks for a recompute. Each says why it computed (`tasks.records`).

They import no Prefect, so Ray workers run them without starting a Prefect server; the Prefect
tasks in `tasks.prefect_tasks` wrap them. Keys: ``datasets/<name>-<hash>/{train,test}.parquet``,
``poisons/<attack>-<hash>.parquet``, ``models/<defense>-<hash>.safetensors``, ``cells/cell-<hash>.json``;
a craft in progress keeps its checkpoints under ``checkpoints/<poison key>/``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from infra.ray_runner import ActorFactory, job_map
from infra.storage import Store
from poison_core.attacks import make_attack
from poison_core.checkpoint import Checkpointer
from poison_core.config import AttackConfig, BenchmarkConfig, DatasetConfig, DefenseConfig, ThreatModel
from poison_core.data import DatasetSplits, ImageDataset, load_dataset, write_split
from poison_core.defenses import Predictor, make_defense
from poison_core.defenses.persist import load_classifier, save_classifier
from poison_core.experiment import cell_row, craft_context, defense_context, train_surrogate
from poison_core.models import build_model
from poison_core.models.io import check_safetensors, load_state, save_model, state_checksum
from poison_core.errors import AuditError, InputError
from poison_core.poisons import PoisonSet
from poison_core.protocols import relabelled
from poison_core.threat import answering_threats
from tasks import keys
from tasks.keys import StageKey, poison_key, surrogate_key
from tasks.keys import dataset_prefix, model_key  # noqa: F401  (re-exported: callers name stage keys here)
from tasks.records import REUSED, read_record, reason, write_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutput:
    """Where a stage's output lives, whether this call computed it (False: reused) and why
    (`tasks.records`: 'new', 'code changed', ..., or 'reused'), and the seconds spent in its core
    compute (the poison_core call: no store I/O, no orchestration), which began at `started` and ended
    at `ended` (wall clock, seconds since the epoch; 0 when reused)."""

    key: str
    computed: bool
    node: str = ""
    seconds: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    reason: str = REUSED


def _node() -> str:
    """The Ray node this stage ran on ('' outside Ray): lets tests see work spread over nodes."""
    import sys

    if "ray" not in sys.modules:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class _Run:
    """One stage call's bookkeeping: whether the stored output can be reused, why not, and its record."""

    def __init__(self, store: Store, stage: StageKey, check: Callable[[], Any], force: bool,
                 state: Callable[[], str] | None = None) -> None:
        self.store, self.stage = store, stage
        self.previous = read_record(store, stage.slot)
        state = "absent" if force else (state or (lambda: _stored(store, stage.key, check)))()
        self.reusable = state == "ok"
        self.reason = REUSED if self.reusable else reason(self.previous, stage, forced=force,
                                                          damaged=state == "damaged")
        if not self.reusable:
            log.info("%s: computing %s (%s)", stage.slot, stage.key, self.reason)

    def done(self, clock: "_Compute | None" = None) -> StageOutput:
        """The StageOutput, after recording that the slot holds this key."""
        write_record(self.store, self.stage, self.previous)
        if clock is None:
            return StageOutput(self.stage.key, False, _node())
        return StageOutput(self.stage.key, True, _node(), clock.seconds, clock.started, clock.ended, self.reason)


class _Compute:
    """Accumulates the wall seconds of a stage's core compute (what orchestration overhead is
    measured against, see benchmarks/orchestration.py)."""

    def __init__(self) -> None:
        self.seconds = self.started = self.ended = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        start = time.perf_counter()
        self.started = self.started or time.time()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.ended = time.time()


def _stored(store: Store, key: str, check: Callable[[], Any]) -> str:
    """'ok' when the stored output at `key` can be reused (it exists and `check` reads it back),
    'absent' when there is none, 'damaged' when it was there but unreadable (truncated, not the format
    it should be): it is quarantined, so the stage recomputes it. A PoisonSet that reads but breaks its
    audit is not damage: its AuditError stands."""
    if not store.exists(key):
        return "absent"
    try:
        check()
        return "ok"
    except (InputError, ValueError) as exc:
        store.quarantine(key, " ".join(str(exc).split()))
        return "damaged"


def _check_model(store: Store, key: str) -> None:
    check_safetensors(store.read_bytes(key), store.uri(key))


def _check_cell(store: Store, key: str) -> None:
    row = json.loads(store.read_bytes(key))
    if not isinstance(row, dict) or not {"attack", "defense", "seed"} <= set(row):
        raise InputError(f"cell file {store.uri(key)!r} is not a Belladonna cell")


def as_store(store: Store | str) -> Store:
    """Stages take a Store or its root URI (what travels to a Ray worker)."""
    return store if isinstance(store, Store) else Store(store)


def ingest(store: Store | str, cfg: DatasetConfig, benchmark: str = "", force: bool = False) -> StageOutput:
    """Load the dataset with its seeded split and store train/test Parquet."""
    store = as_store(store)
    stage = keys.dataset_stage(cfg, benchmark)
    prefix = stage.key

    def state() -> str:
        found = [_stored(store, key, lambda key=key: store.read_split(key))
                 for key in (f"{prefix}/{split}.parquet" for split in ("test", "train"))]
        return "ok" if found == ["ok", "ok"] else "damaged" if "damaged" in found else "absent"

    run = _Run(store, stage, lambda: None, force, state)
    if run.reusable:
        return run.done()
    clock = _Compute()
    with clock():
        splits = load_dataset(cfg)
    for split, data in (("test", splits.test), ("train", splits.train)):  # train last: it marks completion
        write_split(data, store.uri(prefix, f"{split}.parquet"), store.storage_options)
    return run.done(clock)


def load_splits(store: Store, prefix: str) -> DatasetSplits:
    read = [store.read_split(f"{prefix}/{s}.parquet") for s in ("train", "test")]
    return DatasetSplits(train=read[0], test=read[1])


def pretrain(store: Store | str, cfg: BenchmarkConfig, prefix: str, seed: int, index: int,
             device: str = "cpu", force: bool = False) -> StageOutput:
    """Train surrogate `index` of seed `seed` on the clean training set (the attacker's model)."""
    store = as_store(store)
    stage = keys.surrogate_stage(cfg, prefix, seed, index)
    key = stage.key
    run = _Run(store, stage, lambda: _check_model(store, key), force)
    if run.reusable:
        return run.done()
    splits = load_splits(store, prefix)
    clock = _Compute()
    with clock():
        model = train_surrogate(cfg, splits.train, seed, index, torch.device(device))
    save_model(model, store.uri(key), {"role": "surrogate"}, store.storage_options)
    return run.done(clock)


def load_surrogates(store: Store, cfg: BenchmarkConfig, prefix: str, seed: int, splits: DatasetSplits,
                    device: str) -> tuple[list[torch.nn.Module], list[str]]:
    """The seed's stored surrogates in eval mode, with their state checksums for provenance."""
    models, checksums = [], []
    recipe = cfg.surrogate_or_victim()
    for index in range(cfg.n_surrogates):
        model = build_model(recipe.model, splits.train.image_shape, splits.train.num_classes, seed=0)
        load_state(model, store.uri(surrogate_key(cfg, prefix, seed, index)), store.storage_options)
        models.append(model.to(device).eval())
        checksums.append(state_checksum(model))
    return models, checksums


def expected_threat(cfg: BenchmarkConfig, prefix: str, key: str) -> ThreatModel:
    """The threat model a reader of the PoisonSet at `key` holds it to: that of the grid member of `cfg`
    whose poison key (for one of the seeds) it is, as poison_core.threat decides for every reader. A key
    that is no poison key of this config is an AuditError: the reader has no threat model to audit it against."""
    for attack in cfg.attacks:
        if any(poison_key(cfg, prefix, attack, seed) == key for seed in cfg.seeds):
            (threat,) = answering_threats(cfg, attack.name, member=attack.key, what=key)
            return threat
    raise AuditError(f"{key!r} is not the PoisonSet of any attack and seed of benchmark {cfg.name!r}")


def read_poisons(store: Store, cfg: BenchmarkConfig, prefix: str, key: str, train: ImageDataset) -> PoisonSet:
    """The stored PoisonSet at `key`, audited against `train` and the threat model `cfg` gives its attack."""
    return store.read_poison_set(key, train, expected_threat(cfg, prefix, key))


def craft(store: Store | str, cfg: BenchmarkConfig, prefix: str, attack: AttackConfig, seed: int,
          device: str = "cpu", force: bool = False) -> StageOutput:
    """Craft one attack's PoisonSet for one seed; it is audited before it is written."""
    store = as_store(store)
    stage = keys.poison_stage(cfg, prefix, attack, seed)
    key = stage.key
    splits = load_splits(store, prefix)
    run = _Run(store, stage, lambda: read_poisons(store, cfg, prefix, key, splits.train), force)
    if run.reusable:
        return run.done()
    attacker = make_attack(attack.name, attack.params)
    surrogates, checksums = ([], [])
    if attacker.needs_surrogate:
        surrogates, checksums = load_surrogates(store, cfg, prefix, seed, splits, device)
    actors = ActorFactory(cfg.execution)
    checkpoints = checkpoint_prefix(key)
    ctx = craft_context(cfg, attack, splits, seed, torch.device(device), surrogates, checksums,
                        map=job_map(cfg.execution), actors=actors, retries=cfg.execution.max_retries,
                        checkpoint=Checkpointer(store.uri(checkpoints, "craft.safetensors"),
                                                cfg.execution.checkpoint_every, store.storage_options))
    clock = _Compute()
    try:
        with clock():
            poison_set = attacker.craft(ctx)
    finally:
        actors.close()
    store.write_poison_set(key, poison_set, splits.train)
    for stale in store.list(checkpoints):
        store.delete(stale)
    return run.done(clock)


def checkpoint_prefix(poison_key_: str) -> str:
    """Where the craft of `poison_key_` keeps its checkpoints (removed once the PoisonSet is stored)."""
    stem = poison_key_.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"checkpoints/{stem}"


def retrain(store: Store | str, cfg: BenchmarkConfig, prefix: str, defense: DefenseConfig, seed: int,
            poisons: str | None, device: str = "cpu", force: bool = False) -> StageOutput:
    """Train the victim under `defense` on the clean (poisons=None) or poisoned training set."""
    store = as_store(store)
    stage = keys.model_stage(cfg, prefix, defense, seed, poisons)
    key = stage.key
    run = _Run(store, stage, lambda: _check_model(store, key), force)
    if run.reusable:
        return run.done()
    splits = load_splits(store, prefix)
    poison_set = None if poisons is None else read_poisons(store, cfg, prefix, poisons, splits.train)
    ctx = defense_context(cfg, defense, splits, seed, torch.device(device), poison_set, map=job_map(cfg.execution))
    clock = _Compute()
    with clock():
        result = make_defense(defense.name, defense.params).fit(ctx)
    save_classifier(result.classifier, store.uri(key), {"history": result.history, "info": result.info},
                    store.storage_options)
    return run.done(clock)


def _load_classifier(store: Store, cfg: BenchmarkConfig, key: str, splits: DatasetSplits,
                     device: str) -> tuple[Predictor, dict[str, Any]]:
    return load_classifier(store.uri(key), cfg.victim, splits.train.image_shape, splits.train.num_classes,
                           torch.device(device), store.storage_options)


def evaluate_cell(store: Store | str, cfg: BenchmarkConfig, prefix: str, attack: str, defense: str, seed: int,
                  poisons: str, model: str, clean_model: str, device: str = "cpu", force: bool = False) -> StageOutput:
    """Metrics of the poisoned victim and of the clean victim (baseline_*) against the attack's goal."""
    store = as_store(store)
    stage = keys.cell_stage(cfg, attack, defense, seed, poisons, model, clean_model)
    key = stage.key
    run = _Run(store, stage, lambda: _check_cell(store, key), force)
    if run.reusable:
        return run.done()
    splits = load_splits(store, prefix)
    poison_set = read_poisons(store, cfg, prefix, poisons, splits.train)
    poisoned, info = _load_classifier(store, cfg, model, splits, device)
    clean, _ = _load_classifier(store, cfg, clean_model, splits, device)
    clock = _Compute()
    with clock():
        row = cell_row(attack, defense, seed, poisoned, clean, relabelled(splits.test, cfg.victim), poison_set,
                       info.get("info", {}))
    row.update({"poison_id": poisons, "model_id": model})
    store.write_bytes(key, json.dumps(row, sort_keys=True).encode())
    return run.done(clock)


def read_cell(store: Store, key: str) -> dict[str, Any]:
    return json.loads(store.read_bytes(key))
