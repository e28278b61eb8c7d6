"""Ray scaling of the distributed pieces: Witches' Brew restarts (Ray tasks), MetaPoison's model
ensemble (Ray actors) and DPA's base models (Ray tasks), each on a local Ray instance with 1 and
then 2 CPUs (one CPU per job, torch on one thread per job).

Each measurement pins this process to the first `num_cpus` cores (Ray's processes inherit the
affinity: a Ray CPU count alone only limits scheduling, and MetaPoison's actors, which all run at
once, would still spread over every core), starts a fresh Ray instance with `num_cpus` CPUs, warms
its worker processes up
(they import torch and Belladonna before the clock starts), then times only the attack's craft or
the defense's fit. The result of every run is checked to be the same bytes on 1 and 2 CPUs: the
speed-up changes nothing but the wall time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import ExecutionConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig, VictimConfig
from poison_core.data import DatasetSplits
from poison_core.defenses import DefenseContext, make_defense
from poison_core.models import build_model
from poison_core.poisons import to_parquet_bytes
from poison_core.training import train_model

log = logging.getLogger(__name__)
EXECUTION = ExecutionConfig(num_cpus=1, max_retries=0, scheduling="DEFAULT")


def _warm(n_workers: int) -> None:
    """Start `n_workers` worker processes and import the libraries in them before timing."""
    from infra.ray_runner import ray_map

    ray_map(_import_everything, [((i,), {}) for i in range(2 * n_workers)], EXECUTION)


def _import_everything(_: int) -> int:
    import poison_core.attacks
    import poison_core.defenses  # noqa: F401

    time.sleep(0.2)
    return os.getpid()


def _timed(num_cpus: int, run: Callable[[], bytes], repeats: int = 1) -> tuple[float, str]:
    """(median seconds over `repeats` runs, sha256 of the result) of run() on a fresh local Ray
    instance with `num_cpus` CPUs; every repeat must give the same bytes."""
    import ray

    ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < num_cpus:
        raise RuntimeError(f"num_cpus: {num_cpus} asked, this process may use {len(cores)} cores")
    os.sched_setaffinity(0, cores[:num_cpus])
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    try:
        _warm(num_cpus)
        times, digests = [], set()
        for _ in range(repeats):
            start = time.perf_counter()
            digests.add(hashlib.sha256(run()).hexdigest())
            times.append(time.perf_counter() - start)
        if len(digests) != 1:
            raise RuntimeError(f"ray_scaling: {repeats} repeats on {num_cpus} CPU(s) gave "
                               f"{len(digests)} different results")
        return float(np.median(times)), digests.pop()
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, cores)


def _surrogate(splits: DatasetSplits, width: int) -> torch.nn.Module:
    model = build_model(ModelConfig(name="convnet", width=width), splits.train.image_shape,
                        splits.train.num_classes, seed=0)
    train_model(model, splits.train, TrainConfig(epochs=2, batch_size=64), device="cpu", seed=0)
    return model.eval()


def scaling_cases(splits: DatasetSplits, quick: bool) -> dict[str, Callable[[], bytes]]:
    """name -> a function that runs one distributed piece and returns its result's bytes."""
    from infra.ray_runner import ActorFactory, job_map

    surrogate = _surrogate(splits, width=16)
    threat = ThreatModel(epsilon=16, budget=0.01, clean_label=True, targets=TargetSelection(n_targets=1))
    steps = 20 if quick else 160

    def brew() -> bytes:
        ctx = CraftContext(train=splits.train, test=splits.test, threat=threat, seed=0, surrogates=[surrogate],
                           map=job_map(EXECUTION))
        return to_parquet_bytes(make_attack("witches_brew", {"steps": steps, "restarts": 4}).craft(ctx))

    def metapoison() -> bytes:
        actors = ActorFactory(EXECUTION)
        ctx = CraftContext(train=splits.train, test=splits.test, threat=threat, seed=0, surrogates=[surrogate],
                           actors=actors)
        params = {"steps": steps // 8, "n_models": 4, "stagger_epochs": 4, "epoch_batches": 8, "batch_size": 64}
        try:
            return to_parquet_bytes(make_attack("metapoison", params).craft(ctx))
        finally:
            actors.close()

    def dpa() -> bytes:
        victim = VictimConfig(model=ModelConfig(name="convnet", width=16),
                              train=TrainConfig(epochs=4 if quick else 30, batch_size=64))
        result = make_defense("dpa", {"k": 8}).fit(DefenseContext(train=splits.train, victim=victim, seed=0,
                                                                  map=job_map(EXECUTION)))
        votes = result.classifier.votes(splits.test.images)
        return np.ascontiguousarray(votes).tobytes()

    return {"witches_brew_restarts_R4": brew, "metapoison_actors_M4": metapoison, "dpa_partitions_k8": dpa}


def ray_scaling(splits: DatasetSplits, quick: bool = False) -> list[dict[str, Any]]:
    """One row per case: median seconds (of 3 runs; 1 with `quick`) on 1 and 2 CPUs, speed-up, and
    whether the results are identical."""
    rows = []
    repeats = 1 if quick else 3
    for name, run in scaling_cases(splits, quick).items():
        one, digest_one = _timed(1, run, repeats)
        two, digest_two = _timed(2, run, repeats)
        rows.append({"case": name, "seconds_1_worker": round(one, 2), "seconds_2_workers": round(two, 2),
                     "speedup": round(one / two, 2), "identical_results": digest_one == digest_two})
        log.info("%s: 1 worker %.1fs, 2 workers %.1fs, speed-up %.2fx", name, one, two, one / two)
    return rows
