"""One Prefect task per stage. Each fans its jobs out on Ray and returns the stored keys.

The store is the cache (outputs are keyed by content), so Prefect's own result caching is off.
Every task returns StageOutputs, so the flow can count what was computed and what was reused.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.ray_runner import ray_map
from poison_core.attacks import ATTACKS
from poison_core.config import BenchmarkConfig
from tasks import stages
from tasks.recompute import Recompute
from tasks.stages import StageOutput

Key = tuple[Any, ...]


def _options(cfg: BenchmarkConfig, force: bool) -> dict[str, Any]:
    return {"device": cfg.execution.device, "force": force}


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(store: str, cfg: BenchmarkConfig, recompute: Recompute = Recompute()) -> StageOutput:
    """Load, split and store the dataset (in the flow process: it is I/O bound and done once)."""
    return stages.ingest(store, cfg.dataset, cfg.name, force=recompute.forces("ingest"))


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain(store: str, cfg: BenchmarkConfig, prefix: str,
             recompute: Recompute = Recompute()) -> dict[Key, StageOutput]:
    """Train the attacker's surrogates (n_surrogates per seed), one Ray job each; none when no attack
    of the grid needs a surrogate."""
    if not any(ATTACKS.get(a.name).needs_surrogate for a in cfg.attacks):
        return {}
    keys = [(seed, i) for seed in cfg.seeds for i in range(cfg.n_surrogates)]
    calls = [((store, cfg, prefix, seed, i), _options(cfg, recompute.forces("pretrain"))) for seed, i in keys]
    return dict(zip(keys, ray_map(stages.pretrain, calls, cfg.execution)))


@task(name="craft", cache_policy=NO_CACHE)
def craft(store: str, cfg: BenchmarkConfig, prefix: str,
          recompute: Recompute = Recompute()) -> dict[Key, StageOutput]:
    """Craft every (attack, seed) PoisonSet, one Ray job each."""
    keys = [(a.key, seed) for seed in cfg.seeds for a in cfg.attacks]
    by_key = {a.key: a for a in cfg.attacks}
    calls = [((store, cfg, prefix, by_key[a], seed), _options(cfg, recompute.forces("craft", attack=a)))
             for a, seed in keys]
    return dict(zip(keys, ray_map(stages.craft, calls, cfg.execution)))


@task(name="retrain", cache_policy=NO_CACHE)
def retrain(store: str, cfg: BenchmarkConfig, prefix: str, poisons: dict[Key, StageOutput],
            recompute: Recompute = Recompute()) -> dict[Key, StageOutput]:
    """Train every victim, one Ray job each: per (defense, seed) a clean one (attack None) and one
    per attack on its poisoned training set."""
    jobs: list[tuple[Key, tuple]] = []
    for defense in cfg.defenses:
        for seed in cfg.seeds:
            jobs.append(((None, defense.key, seed), (store, cfg, prefix, defense, seed, None)))
            for attack in cfg.attacks:
                poison = poisons[(attack.key, seed)].key
                jobs.append(((attack.key, defense.key, seed), (store, cfg, prefix, defense, seed, poison)))
    calls = [(args, _options(cfg, recompute.forces("retrain", attack=key[0], defense=key[1]))) for key, args in jobs]
    return dict(zip([k for k, _ in jobs], ray_map(stages.retrain, calls, cfg.execution)))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(store: str, cfg: BenchmarkConfig, prefix: str, poisons: dict[Key, StageOutput],
             models: dict[Key, StageOutput], recompute: Recompute = Recompute()) -> dict[Key, StageOutput]:
    """Evaluate every (attack, defense, seed) cell against its clean baseline, one Ray job each."""
    keys = [(a.key, d.key, seed) for a in cfg.attacks for d in cfg.defenses for seed in cfg.seeds]
    calls = [((store, cfg, prefix, a, d, seed, poisons[(a, seed)].key, models[(a, d, seed)].key,
               models[(None, d, seed)].key), _options(cfg, recompute.forces("evaluate", attack=a, defense=d)))
             for a, d, seed in keys]
    return dict(zip(keys, ray_map(stages.evaluate_cell, calls, cfg.execution)))
