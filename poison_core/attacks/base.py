"""The Attack protocol: a template method that owns every invariant, so members write only `_craft`.

After torchattacks' `Attack` and Geiping et al.'s `witch_base`: the base validates the threat
model for the attack's label policy, computes the budgeted poison count floor(budget * n), seeds
numpy and torch from `ctx.seed` without touching global RNG state, packs the result with its
provenance and audits it before returning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from poison_core.checkpoint import Checkpointer
from poison_core.config import StrictModel, ThreatModel, TrainConfig
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.poisons import PoisonSet, audit
from poison_core.registry import Registry


class AttackParams(StrictModel):
    """Base of every attack's parameter model: a StrictModel (frozen, unknown keys forbidden, no bools for numbers)."""


class ActorGroup(Protocol):
    """Stateful workers that each hold a model (MetaPoison's staggered ensemble): `call` runs the
    method on every worker with that worker's arguments and returns the results in worker order."""

    def call(self, method: str, args_per_worker: Sequence[tuple]) -> list[Any]: ...


class LocalActorGroup:
    """The in-process ActorGroup: plain objects, called one after another."""

    def __init__(self, factory: Callable[..., Any], init_args: Sequence[tuple]) -> None:
        self.workers = [factory(*args) for args in init_args]

    def call(self, method: str, args_per_worker: Sequence[tuple]) -> list[Any]:
        if len(args_per_worker) != len(self.workers):
            raise ValueError(f"{len(args_per_worker)} argument tuples for {len(self.workers)} workers")
        return [getattr(w, method)(*args) for w, args in zip(self.workers, args_per_worker)]


def local_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    """The default CraftContext.map: fn(*args) for each args tuple, in order, in this process."""
    return [fn(*args) for args in calls]


@dataclass
class CraftContext:
    """Everything an attack may use: clean train (and test) data, threat model, seed, device, surrogates.

    `map` runs independent jobs (Witches' Brew restarts) and `actors` builds stateful workers
    (MetaPoison's model ensemble); orchestration passes Ray-backed versions, the defaults run in
    this process. Results must not depend on which is used. Long attacks save their state to
    `checkpoint` when it is due and resume from it (poison_core.checkpoint); `retries` bounds how
    often an attack rebuilds lost stateful workers.
    """

    train: ImageDataset
    threat: ThreatModel
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    test: ImageDataset | None = None
    surrogates: Sequence[nn.Module] = ()
    surrogate_checksums: Sequence[str] = ()
    map: Callable[[Callable[..., Any], Sequence[tuple]], list[Any]] = local_map
    actors: Callable[[Callable[..., Any], Sequence[tuple]], ActorGroup] = LocalActorGroup
    checkpoint: Checkpointer | None = None
    retries: int = 2
    surrogate_recipe: TrainConfig | None = None
    """The recipe the surrogates were trained with (the benchmark's surrogate, else victim, recipe): what an
    attack that retrains models while crafting uses by default, as its reference does (Sleeper Agent)."""


@dataclass
class Crafted:
    """What a member's `_craft` returns: positional indices into ctx.train, new pixels and labels."""

    positions: np.ndarray
    images: np.ndarray
    poison_labels: np.ndarray
    targets: dict[str, Any] = field(default_factory=dict)
    trigger: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    """What the craft itself found out and the PoisonSet's provenance records (e.g. error_min's
    `stop_criterion_met`), beside the attack, params, seed and checksums the base adds."""
    color: np.ndarray | None = None
    """Per-poison colour parameters (MetaPoison's ReColorAdv option), in `positions` order; None: none."""


class Attack(ABC):
    """Crafts a PoisonSet from (surrogates, train data, threat model, seed)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams
    label_policy: ClassVar[Literal["clean", "dirty", "any"]] = "any"
    needs_surrogate: ClassVar[bool] = False
    perturbation_only: ClassVar[bool] = False
    smoke: ClassVar[dict[str, Any] | None] = {}
    """Parameters for a craft of a second or so on 200 digits (`poison_core.contract`); None when the attack
    cannot craft without inputs of its own (files to import)."""
    smoke_threat: ClassVar[dict[str, Any]] = {}
    """Threat-model fields the contract check's craft needs (default epsilon 16, budget 0.1)."""
    """Whether each poison differs from its clean image only by a pixel change within threat.epsilon (plus a
    new label where the attack changes labels): under epsilon 0 and clean labels such an attack changes
    nothing, and check_threat refuses it rather than run a benchmark of unchanged data."""

    def __init__(self, params: AttackParams | dict[str, Any] | None = None) -> None:
        # Typed Any: it is an instance of the member's own `Params` model, whose fields the member reads.
        self.params: Any = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})

    def check_threat(self, threat: ThreatModel) -> None:
        """Refuse threat models this attack cannot honour (e.g. clean-label for a label flip)."""
        if self.label_policy == "dirty" and threat.clean_label:
            raise ConfigError(f"threat.clean_label: {self.name} changes labels; set clean_label: false")
        if self.label_policy == "clean" and not threat.clean_label:
            raise ConfigError(f"threat.clean_label: {self.name} is a clean-label attack; set clean_label: true")
        if threat.epsilon == 0 and threat.clean_label and self.changes_only_within_epsilon(threat):
            raise ConfigError(f"threat.epsilon: 0 leaves {self.name} nothing to change: its poisons differ from the "
                              "clean images only within epsilon and keep their labels (allowed: 1 <= epsilon <= 255)")

    def changes_only_within_epsilon(self, threat: ThreatModel) -> bool:
        """Whether every change to an image is bounded by threat.epsilon (default: `perturbation_only`);
        an attack with a second kind of change (a colour shift) overrides it."""
        return self.perturbation_only

    def check_dataset(self, train: ImageDataset) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Refuse parameters that do not fit this dataset (class ids, trigger size); runs before any work."""

    def craft(self, ctx: CraftContext) -> PoisonSet:
        self.check_threat(ctx.threat)
        self.check_dataset(ctx.train)
        if self.needs_surrogate and not ctx.surrogates:
            raise ConfigError(f"attack {self.name!r} needs at least one surrogate model")
        n_poison = ctx.threat.max_poisons(len(ctx.train))
        if n_poison < 1:
            raise ConfigError(f"threat.budget: {ctx.threat.budget} of {len(ctx.train)} samples allows no poison "
                              f"(need budget >= {1 / len(ctx.train):.2g})")
        rng = np.random.default_rng(ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            crafted = self._craft(ctx, n_poison, rng)
        pos = np.asarray(crafted.positions, dtype=np.int64)
        poison_set = PoisonSet(
            ids=ctx.train.ids[pos], images=np.asarray(crafted.images, dtype=np.uint8),
            orig_labels=ctx.train.labels[pos], poison_labels=crafted.poison_labels,
            threat=ctx.threat, n_train=len(ctx.train), targets=crafted.targets, trigger=crafted.trigger,
            provenance={"attack": self.name, "params": self.params.model_dump(mode="json"), "seed": ctx.seed,
                        "dataset": ctx.train.name, "dataset_checksum": ctx.train.checksum(),
                        "surrogate_checksums": list(ctx.surrogate_checksums), **crafted.provenance},
            color=crafted.color)
        audit(poison_set, ctx.train)
        return poison_set

    @abstractmethod
    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        """Choose at most `n_poison` training samples and return their poisoned pixels and labels."""


ATTACKS: Registry[type[Attack]] = Registry("attack", group="belladonna.attacks")
ATTACKS.check = lambda obj: None if isinstance(obj, type) and issubclass(obj, Attack) else (
    f"{obj!r} is not an Attack subclass (poison_core.plugin.Attack)")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an Attack subclass under its `name` with its paper and summary."""
    return ATTACKS.register(cls.name, paper=cls.paper, summary=cls.summary)(cls)


def make_attack(name: str, params: dict[str, Any] | None = None) -> Attack:
    return ATTACKS.get(name)(params)
