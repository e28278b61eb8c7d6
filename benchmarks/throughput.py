"""Crafting throughput of every registered attack on the Fashion-MNIST ConvNet setting, and each
attack's achieved FLOP rate against the CPU's matrix-multiply rate.

The setting is that of ``configs/fashion-mnist-targeted.yaml``: 2,000 training images, the width-16
ConvNet, a 1 % budget (20 poisons) and one target; availability attacks use epsilon 8, targeted
ones 16, dirty-label ones change labels. Surrogates are two ConvNets trained for 2 epochs. Every
craft runs in this process on one torch thread (the in-process ``map`` and actor group), so its
rate compares with the one-thread matrix multiply.

FLOPs are counted by :class:`FlopCount` (torch's ``flop_registry`` formulas, without the module
tracking of ``FlopCounterMode``, which breaks ``autograd.grad``) in a second, untimed craft with the
same seed: matrix multiplies and convolutions, forward, backward and double backward (the
ops that dominate these networks); attacks whose work is elsewhere (sklearn solvers, pure pixel
edits) count no FLOPs and get no rate.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.config import ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import DatasetSplits
from poison_core.models import build_model
from poison_core.seeding import derive_seed
from poison_core.training import train_model

log = logging.getLogger(__name__)

TARGETED = ThreatModel(epsilon=16, budget=0.01, clean_label=True, targets=TargetSelection(n_targets=1))
AVAILABILITY = ThreatModel(epsilon=8, budget=0.01, clean_label=True)
DIRTY = ThreatModel(epsilon=255, budget=0.01, clean_label=False)

# attack -> (params, threat): the targeted config's settings, other attacks at CPU-sized step counts.
NOT_CRAFTED = frozenset({"imported"})
"""Attacks that read poisons from files instead of crafting them: no throughput to measure."""

CASES: dict[str, tuple[dict[str, Any], ThreatModel]] = {
    "witches_brew": ({"steps": 100, "restarts": 2, "augment": False}, TARGETED),
    "metapoison": ({"n_models": 4, "stagger_epochs": 10, "unroll_steps": 2, "steps": 24, "drop_period": 8,
                    "lr": 0.05, "batch_size": 64, "epoch_batches": 16}, TARGETED),
    "poison_frogs": ({"steps": 200, "lr": 0.1}, TARGETED),
    "convex_polytope": ({"steps": 200, "lr": 0.04, "coef_iters": 50}, TARGETED),
    "clean_label_backdoor": ({"steps": 20}, TARGETED),
    "error_min": ({"mode": "sample", "width": 8, "steps": 5, "max_rounds": 5}, AVAILABILITY),
    "error_max": ({"steps": 10, "step_fraction": 0.25}, AVAILABILITY),
    "tue": ({"epochs": 3}, AVAILABILITY),
    "unlearnable_clusters": ({"epochs": 2, "encoder": {"epochs": 2}}, AVAILABILITY),
    "synthetic_noise": ({}, AVAILABILITY),
    "random_noise": ({}, AVAILABILITY),
    "generative": ({"epochs": 5}, AVAILABILITY),
    "pgan": ({"iterations": 50}, DIRTY),
    "bilevel": ({"steps": 5}, DIRTY),
    "influence": ({"steps": 5}, DIRTY),
    "svm_poison": ({}, DIRTY),
    "p_tampering": ({}, DIRTY),
    "label_flip": ({}, DIRTY),
    "random_labels": ({}, DIRTY),
    "badnets": ({}, DIRTY),
    "blend": ({}, DIRTY),
    "sig": ({}, AVAILABILITY),
    "wanet": ({}, DIRTY),
    "bullseye_polytope": ({"steps": 200, "lr": 0.04}, TARGETED),
    "hidden_trigger": ({"steps": 200, "lr": 0.01, "source_class": 1, "target_class": 0}, TARGETED),
    "sleeper_agent": ({"steps": 100, "retrain_every": 50, "retrain": {"epochs": 2}, "source_class": 1,
                       "target_class": 0}, TARGETED),
}


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every dispatched op that torch's flop_registry has a formula for."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def surrogates(splits: DatasetSplits, n: int = 2, width: int = 16, epochs: int = 2) -> list[nn.Module]:
    """`n` ConvNets of `width` trained `epochs` epochs on the clean training set, in eval mode."""
    models = []
    for i in range(n):
        seed = derive_seed(0, "surrogate", i)
        model = build_model(ModelConfig(name="convnet", width=width), splits.train.image_shape,
                            splits.train.num_classes, seed=seed)
        train_model(model, splits.train, TrainConfig(epochs=epochs, batch_size=64), device="cpu", seed=seed)
        models.append(model.eval())
    return models


def craft_once(name: str, params: dict[str, Any], threat: ThreatModel, splits: DatasetSplits,
               models: list[nn.Module], count_flops: bool = False) -> tuple[float, int, int]:
    """(seconds, poisons, counted FLOPs or 0) of one seeded craft of `name` in this process."""
    attack = make_attack(name, params)
    ctx = CraftContext(train=splits.train, test=splits.test, threat=threat, seed=0,
                       surrogates=models if attack.needs_surrogate else [])
    if not count_flops:
        start = time.perf_counter()
        crafted = attack.craft(ctx)
        return time.perf_counter() - start, len(crafted), 0
    with FlopCount() as counter:
        crafted = attack.craft(ctx)
    return 0.0, len(crafted), counter.flops


def steps_of(params: dict[str, Any], name: str) -> int | None:
    """The number of optimisation steps of a craft (x restarts for Witches' Brew), when it has one."""
    defaults = ATTACKS.get(name).Params().model_dump()
    merged = {**defaults, **params}
    for field in ("steps", "iterations", "epochs"):
        if field in merged and isinstance(merged[field], int):
            return merged[field] * int(merged.get("restarts", 1))
    return None


def throughput(splits: DatasetSplits, matmul_gflops: float, only: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per attack: seconds, poisons/s, ms per step, GFLOP counted, GFLOP/s and % of matmul."""
    models = surrogates(splits)
    rows = []
    for name in only or list(CASES):
        params, threat = CASES[name]
        seconds, n_poison, _ = craft_once(name, params, threat, splits, models)
        _, _, flops = craft_once(name, params, threat, splits, models, count_flops=True)
        steps = steps_of(params, name)
        row: dict[str, Any] = {"attack": name, "poisons": n_poison, "seconds": round(seconds, 2),
                               "poisons_per_s": round(n_poison / seconds, 2),
                               "ms_per_step": round(1000 * seconds / steps, 1) if steps else "",
                               "gflop": round(flops / 1e9, 2) if flops else ""}
        if flops:
            rate = flops / seconds / 1e9
            row.update({"gflop_per_s": round(rate, 1), "pct_of_matmul": round(100 * rate / matmul_gflops, 1)})
        rows.append(row)
        log.info("%s: %s", name, row)
    missing = sorted(set(ATTACKS.names()) - set(CASES) - NOT_CRAFTED)
    if missing and only is None:
        raise RuntimeError(f"benchmarks.throughput: no case for attack(s) {', '.join(missing)}")
    return rows
