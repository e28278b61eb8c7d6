"""Everything about a benchmark that its config and its dataset decide, checked before any work.

A run that would fail on its config alone (a dirty-label attack under a clean-label threat model, a
budget that allows no poison on this training set, a target class the dataset does not have, a
validation split that leaves no training data, a CUDA or MPS device that torch cannot use on this
machine: see check_local_resources) fails here, with one line naming the field, before a service
starts or a file is written.
"""

from __future__ import annotations

import math
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
        if targets.setups is not None:
            from poison_core.interop import setups as setup_files

            try:
                setup_files.load(targets.setups.path, targets.setups.start, targets.n_targets, train, test)
            except InputError as exc:
                raise type(exc)(f"{scope}.targets.setups: {exc}") from None
        if targets.mode == "fixed":
            missing = sorted(set(targets.target_ids) - {int(i) for i in test.ids})
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
    """Refuse, before anything starts, a job that could never run as configured.

    Everywhere: a CUDA device without GPUs per job, or an index a job cannot see (each Ray job sees
    only the GPUs it asks for, renumbered from cuda:0). On a local Ray instance (no ray_address and no
    RAY_ADDRESS) the jobs run on this machine, so also: a device torch cannot use here (see
    :func:`device_problem`), and more CPUs or GPUs per job than this machine has (the job would wait
    forever). With a cluster the driver's own hardware says nothing about the workers' (a CPU-only
    head node in front of GPU workers is common), so those checks are left to the cluster:
    infra.ray_runner.check_cluster_resources once connected, and torch in the job itself."""
    device = execution.device
    if device.startswith("cuda"):
        if execution.num_gpus == 0:
            raise ConfigError(f"execution.device: {device!r} needs execution.num_gpus > 0 "
                              "(Ray shows a job only the GPUs it asks for; allowed: 0 < num_gpus <= 16)")
        index, per_job = cuda_index(device), math.ceil(execution.num_gpus)
        if index >= per_job and not _ray_keeps_cuda_visible_devices():
            raise ConfigError(f"execution.device: {device!r}, but a job asks for {execution.num_gpus:g} GPU(s) and Ray "
                              f"shows each job only its own, renumbered from cuda:0 (allowed: {_cuda_names(per_job)}; "
                              "or raise execution.num_gpus)")
    if execution.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    problem = device_problem(device)
    if problem:
        raise ConfigError(f"execution.device: {device!r}, but {problem}")
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0
    if execution.num_cpus > cpus:
        raise ConfigError(f"execution.num_cpus: {execution.num_cpus:g} per job, but this machine has {cpus} CPUs "
                          f"(allowed: 0 < num_cpus <= {cpus} without a ray_address)")
    if execution.num_gpus > gpus:
        raise ConfigError(f"execution.num_gpus: {execution.num_gpus:g} per job, but this machine has {gpus} GPUs "
                          f"(allowed: 0 <= num_gpus <= {gpus} without a ray_address)")


def cuda_index(device: str) -> int:
    """The N of 'cuda:N' ('cuda' alone is the current device, 0)."""
    return int(device.partition(":")[2] or 0)


def _cuda_names(count: int) -> str:
    return "cuda, cuda:0" if count == 1 else f"cuda, cuda:0 .. cuda:{count - 1}"


def _ray_keeps_cuda_visible_devices() -> bool:
    """Ray leaves CUDA_VISIBLE_DEVICES alone (every job sees every GPU) when this variable is set."""
    return os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "").lower() in ("1", "true", "yes")


def device_problem(device: str) -> str | None:
    """Why torch cannot use `device` ('cpu', 'cuda', 'cuda:N', 'mps') in this process, or None.

    CUDA: torch built without it (torch.version.cuda is None: a CPU wheel), no CUDA device visible
    (torch.cuda.device_count() == 0: no GPU, no driver, a driver too old for this CUDA, or
    CUDA_VISIBLE_DEVICES hiding them), or N beyond the visible devices. MPS: torch.backends.mps
    not built or not available (Apple silicon with macOS 12.3+ only)."""
    import torch

    if device.startswith("cuda"):
        if torch.version.cuda is None:
            return (f"torch {torch.__version__} is built without CUDA (torch.version.cuda is None); install a CUDA "
                    "build of torch (the cu128 image has one), or use device: cpu")
        count = torch.cuda.device_count()
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU or names none that exists" if visible is not None
                    else "CUDA_VISIBLE_DEVICES is unset: no GPU, no driver, or a driver too old for this CUDA")
            return (f"torch (CUDA {torch.version.cuda}) sees no CUDA device on this machine ({hint}); use device: "
                    "cpu, or a ray_address of a cluster with GPUs")
        index = cuda_index(device)
        if index >= count:
            return f"torch sees {count} CUDA device(s) on this machine (allowed: {_cuda_names(count)})"
    if device == "mps":
        if not torch.backends.mps.is_built():
            return (f"torch {torch.__version__} is built without MPS (torch.backends.mps.is_built() is False); "
                    "use device: cpu")
        if not torch.backends.mps.is_available():
            return ("torch.backends.mps.is_available() is False (MPS needs Apple silicon and macOS 12.3+); "
                    "use device: cpu")
    return None
