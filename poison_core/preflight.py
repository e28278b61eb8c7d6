"""Everything about a benchmark that its config and its dataset decide, checked before any work.

A run that would fail on its config alone (a dirty-label attack under a clean-label threat model, a
budget that allows no poison on this training set, a target class the dataset does not have, a
validation split that leaves no training data, a CUDA device on a machine without one) fails here,
with one line naming the field, before a service starts or a file is written.
"""

from __future__ import annotations

import os

from poison_core.config import BenchmarkConfig, ExecutionConfig
from poison_core.data.dataset import DatasetSplits
from poison_core.errors import ConfigError, InputError


def check_benchmark(cfg: BenchmarkConfig, splits: DatasetSplits) -> None:
    """Raise a one-line InputError (field first) unless every cell of `cfg` can run on `splits`: the
    victim builds for its images and classes, every attack accepts its threat model, its parameters
    fit the dataset, its budget allows a poison and its target classes exist."""
    from poison_core.attacks import make_attack

    train, test = splits.train, splits.test
    if len(train) < 2:
        raise ConfigError(_too_few_training_samples(cfg, splits))
    from poison_core.models import build_model

    for field, recipe in (("victim", cfg.victim), ("surrogate", cfg.surrogate)):
        if recipe is not None:
            try:
                build_model(recipe.model, train.image_shape, train.num_classes, seed=0)
            except InputError as exc:
                raise type(exc)(f"{field}.model: {exc} (dataset {cfg.dataset.name!r}: "
                                f"{train.num_classes} classes, images {train.image_shape})") from None
    if cfg.victim.protocol == "relabel":
        from poison_core.protocols import relabel_map

        relabel_map(train.num_classes, cfg.victim.relabel_classes, cfg.victim.relabel_seed)
    for attack in cfg.attacks:
        field = f"attacks.{attack.key}"
        threat = cfg.threat_for(attack)
        scope = f"{field}.threat" if attack.threat is not None else "threat"
        attacker = make_attack(attack.name, attack.params)
        try:
            attacker.check_threat(threat)
            attacker.check_dataset(train)
        except InputError as exc:
            raise type(exc)(f"{field}: {exc}") from None
        if threat.max_poisons(len(train)) < 1:
            raise ConfigError(f"{scope}.budget: {threat.budget} of {len(train)} training samples allows no poison "
                              f"(allowed: {1 / len(train):.2g} <= budget <= 1)")
        targets = threat.targets
        for name in ("adversarial_class", "base_class"):
            value = getattr(targets, name)
            if value is not None and value >= train.num_classes:
                raise ConfigError(f"{scope}.targets.{name}: {value} is outside 0..{train.num_classes - 1} "
                                  f"(dataset {cfg.dataset.name!r} has {train.num_classes} classes)")
        if targets.mode == "fixed":
            missing = sorted(set(targets.target_ids) - set(int(i) for i in test.ids))
            if missing:
                raise ConfigError(f"{scope}.targets.target_ids: test id {missing[0]} is not in the test split "
                                  f"({len(test)} samples)")
    check_local_resources(cfg.execution)


def _too_few_training_samples(cfg: BenchmarkConfig, splits: DatasetSplits) -> str:
    """The line for a training split of under 2 samples, blaming the setting that made it so."""
    ds, left = cfg.dataset, len(splits.train)
    if ds.val_fraction > 0 and splits.val is not None and len(splits.val):
        return (f"dataset.val_fraction: {ds.val_fraction} leaves {left} training sample(s) of dataset {ds.name!r}; "
                "need at least 2 (allowed: 0 <= val_fraction < 1)")
    if ds.n_train is not None:
        return f"dataset.n_train: {ds.n_train} leaves {left} training sample(s); need at least 2 (allowed: n_train >= 2)"
    return f"dataset: {ds.name!r} has {left} training sample(s); need at least 2"


def check_local_resources(execution: ExecutionConfig) -> None:
    """On a local Ray instance (no cluster address), a job that asks for more CPUs or GPUs than this
    machine has, or a CUDA device it lacks, would wait forever: refuse it now. A cluster's resources
    are checked once connected (infra.ray_runner.check_cluster_resources)."""
    if execution.device.startswith("cuda") and execution.num_gpus == 0:
        raise ConfigError(f"execution.device: {execution.device!r} needs execution.num_gpus > 0 "
                          "(Ray shows a job only the GPUs it asks for; allowed: 0 < num_gpus <= 16)")
    if execution.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0
    if execution.num_cpus > cpus:
        raise ConfigError(f"execution.num_cpus: {execution.num_cpus:g} per job, but this machine has {cpus} CPUs "
                          f"(allowed: 0 < num_cpus <= {cpus} without a ray_address)")
    if execution.num_gpus > gpus:
        raise ConfigError(f"execution.num_gpus: {execution.num_gpus:g} per job, but this machine has {gpus} GPUs "
                          f"(allowed: 0 <= num_gpus <= {gpus} without a ray_address)")
    if execution.device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"execution.device: {execution.device!r}, but torch sees no CUDA GPU on this machine "
                          "(use device: cpu, or a ray_address of a cluster with GPUs)")
