"""The benchmark method in one place, without orchestration (Prefect/Ray wrap these steps later).

For each seed: craft every attack's PoisonSet against the clean training set; for each defense,
train the victim on clean data (the no-poison baseline) and on each poisoned training set, and
evaluate both against the attack's goal. The victim's seed is derived from the cell so that it
differs from the attacker's crafting seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.config import AttackConfig, BenchmarkConfig, DefenseConfig
from poison_core.data import DatasetSplits, ImageDataset, load_dataset
from poison_core.defenses import DefenseContext, DefenseResult, Predictor, make_defense
from poison_core.evaluation import evaluate, summarize
from poison_core.models import build_model
from poison_core.models.weights import load_weights
from poison_core.models.io import state_checksum
from poison_core.poisons import PoisonSet, apply, poison_mask
from poison_core.protocols import check_goal, relabelled
from poison_core.seeding import derive_seed
from poison_core.training import train_model

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    """Per-cell rows, the per-(attack, defense) summary, the PoisonSets and seconds per stage."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    poison_sets: dict[tuple[str, int], PoisonSet] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def _tick(self, stage: str, start: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - start


def train_surrogate(cfg: BenchmarkConfig, train: ImageDataset, seed: int, index: int,
                    device: torch.device) -> nn.Module:
    """Surrogate `index` of `seed`: the attacker's model, trained on clean data, in eval mode."""
    recipe, surrogate_seed = cfg.surrogate_or_victim(), derive_seed(seed, "surrogate", index)
    model = build_model(recipe.model, train.image_shape, train.num_classes, seed=surrogate_seed)
    if recipe.model.weights is not None:
        load_weights(model, recipe.model.weights, field="surrogate.model.weights")
    model = model.to(device)
    train_model(model, train, recipe.train, device=device, seed=surrogate_seed)
    return model.eval()


def pretrain_surrogates(cfg: BenchmarkConfig, splits: DatasetSplits, seed: int,
                        device: torch.device) -> list[nn.Module]:
    """The attacker's n_surrogates models for `seed`."""
    return [train_surrogate(cfg, splits.train, seed, i, device) for i in range(cfg.n_surrogates)]


def craft(cfg: BenchmarkConfig, attack: AttackConfig, splits: DatasetSplits, seed: int,
          device: torch.device, surrogates: list[nn.Module] | None = None) -> PoisonSet:
    """Craft one attack's PoisonSet for one seed (surrogates trained here when it needs them)."""
    attacker = make_attack(attack.name, attack.params)
    if attacker.needs_surrogate and surrogates is None:
        surrogates = pretrain_surrogates(cfg, splits, seed, device)
    models = list(surrogates or [])
    return attacker.craft(craft_context(cfg, attack, splits, seed, device, models, [state_checksum(m) for m in models]))


def craft_context(cfg: BenchmarkConfig, attack: AttackConfig, splits: DatasetSplits, seed: int, device: torch.device,
                  surrogates: Sequence[nn.Module] = (), checksums: Sequence[str] = (), **orchestration: Any) -> CraftContext:
    """The CraftContext of one (attack, seed): the attack's threat model and its crafting seed derived from
    the cell. The one builder of it: the in-process benchmark here and the stages (tasks.stages, which add
    Ray-backed `map` / `actors`, checkpoints and retries through `orchestration`) both call it."""
    return CraftContext(train=splits.train, test=splits.test, threat=cfg.threat_for(attack),
                        seed=derive_seed(seed, "craft", attack.key), device=device,
                        surrogates=surrogates, surrogate_checksums=checksums,
                        surrogate_recipe=cfg.surrogate_or_victim().train, **orchestration)


def train_defended(cfg: BenchmarkConfig, defense: DefenseConfig, splits: DatasetSplits, seed: int,
                   device: torch.device, poison_set: PoisonSet | None = None) -> DefenseResult:
    """Train the victim under `defense` on the clean or poisoned training set."""
    return make_defense(defense.name, defense.params).fit(defense_context(cfg, defense, splits, seed, device, poison_set))


def defense_context(cfg: BenchmarkConfig, defense: DefenseConfig, splits: DatasetSplits, seed: int,
                    device: torch.device, poison_set: PoisonSet | None = None, **orchestration: Any) -> DefenseContext:
    """The DefenseContext of one (defense, seed) on the clean (poison_set None) or poisoned training set:
    the PoisonSet applied (its goal checked against the victim protocol), the protocol's relabelling and
    the victim's seed derived from the cell. The one builder of it, for this module and tasks.stages."""
    train, mask = splits.train, None
    if poison_set is not None:
        check_goal(cfg.victim, poison_set.provenance.get("attack", "?"), poison_set.targets, poison_set.trigger)
        train, mask = apply(poison_set, splits.train), poison_mask(poison_set, splits.train)
    return DefenseContext(train=relabelled(train, cfg.victim), victim=cfg.victim,
                          seed=derive_seed(seed, "victim", defense.key), device=device, is_poison=mask, **orchestration)


def run_benchmark(cfg: BenchmarkConfig, *, device: torch.device | None = None,
                  on_cell: Callable[[dict[str, Any]], None] | None = None) -> BenchmarkResult:
    """Run every (attack, defense, seed) cell of `cfg` in this process, in order."""
    device = device or torch.device("cpu")
    result = BenchmarkResult()
    start = time.perf_counter()
    splits = load_dataset(cfg.dataset)
    result._tick("ingest", start)
    log.info("dataset %s: %d train / %d test", cfg.dataset.name, len(splits.train), len(splits.test))
    for seed in cfg.seeds:
        start = time.perf_counter()
        needs = any(ATTACKS.get(a.name).needs_surrogate for a in cfg.attacks)
        surrogates = pretrain_surrogates(cfg, splits, seed, device) if needs else None
        result._tick("pretrain", start)
        start = time.perf_counter()
        for attack in cfg.attacks:
            result.poison_sets[(attack.key, seed)] = craft(cfg, attack, splits, seed, device, surrogates)
        result._tick("craft", start)
        for defense in cfg.defenses:
            start = time.perf_counter()
            clean = train_defended(cfg, defense, splits, seed, device)
            result._tick("retrain", start)
            for attack in cfg.attacks:
                poison_set = result.poison_sets[(attack.key, seed)]
                start = time.perf_counter()
                poisoned = train_defended(cfg, defense, splits, seed, device, poison_set)
                result._tick("retrain", start)
                start = time.perf_counter()
                row = cell_row(attack.key, defense.key, seed, poisoned.classifier, clean.classifier,
                               relabelled(splits.test, cfg.victim), poison_set, poisoned.info)
                result._tick("evaluate", start)
                result.rows.append(row)
                if on_cell is not None:
                    on_cell(row)
    result.summary = summarize(result.rows)
    return result


def cell_row(attack: str, defense: str, seed: int, poisoned: Predictor, clean: Predictor, test: ImageDataset,
             poison_set: PoisonSet, defense_info: dict[str, float] | None = None) -> dict[str, Any]:
    """One cell's metrics next to the no-poison baseline (`baseline_*`) and the accuracy drop."""
    got = evaluate(poisoned, test, poison_set)
    base = evaluate(clean, test, poison_set)
    row: dict[str, Any] = {"attack": attack, "defense": defense, "seed": seed, "n_poison": len(poison_set)}
    row.update(got)
    row.update({f"baseline_{k}": v for k, v in base.items()})
    row["acc_drop"] = base["clean_acc"] - got["clean_acc"]
    row.update({f"defense_{k}": v for k, v in (defense_info or {}).items()})
    return row
