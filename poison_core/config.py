"""Typed configs: pydantic v2 models, frozen, unknown keys forbidden, bounds on every number.

A benchmark is one YAML file (``load_benchmark``). Any validation error becomes one
:class:`ConfigError` line naming the field, the problem, the allowed range and the value given,
e.g. ``threat.epsilon: Input should be less than or equal to 255 (allowed: 0 <= epsilon <= 255; got 300)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError,
                      field_validator, model_serializer, model_validator)

from poison_core.compare_config import CompareConfig
from poison_core.config_errors import format_validation_error
from poison_core.errors import ConfigError, InputError
from poison_core.paths import read_text
from poison_core.strict_numbers import refuse_bools

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_CONFIG_BYTES = 4 * 2**20
"""Largest benchmark YAML (a grid of hundreds of cells is a few KiB)."""
MAX_YAML_DEPTH = 32
"""Deepest nesting a benchmark YAML may have (the config schema itself is under 8 levels deep)."""


class StrictModel(BaseModel):
    """Base of every config: immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """``true`` is not 1: a bool where a number is meant is refused (poison_core.strict_numbers)."""
        return refuse_bools(cls, data)


class DatasetConfig(StrictModel):
    """Which dataset, where from, and how it is split and subsampled (all by `seed`)."""

    name: str = "digits"
    path: str | None = None
    download: bool = False
    n_train: int | None = Field(None, gt=0, le=10_000_000)
    n_test: int | None = Field(None, gt=0, le=10_000_000)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from poison_core.data import DATASETS

        DATASETS.entry(name)
        return name


def _registered_model(name: str) -> str:
    from poison_core.models import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS.names())}")
    return name


ModelName = Annotated[str, AfterValidator(_registered_model)]
"""A name in the model registry: the victim's, and that of the models attacks build themselves."""


class ModelConfig(StrictModel):
    """An architecture from the model registry (a built-in or plug-in name, or an import string such as
    ``torchvision.models:resnet18``); `width` scales channels where the model has them; `weights` is a
    safetensors file (path or URI) the model starts from instead of a random initialisation
    (`poison_core.models.weights`)."""

    name: ModelName = "convnet"
    width: int | None = Field(None, ge=1, le=1024)
    weights: str | None = Field(None, min_length=1, max_length=4096)


class TrainConfig(StrictModel):
    """A training recipe: optimizer, schedule, epochs. Defaults suit the small CPU ConvNet.

    compile: run the training forward and backward through ``torch.compile`` (TorchInductor). On
    one CPU thread the width-16 ConvNet's step goes from 25 to 17 ms (1.43x) after a ~23 s compile,
    so it pays from a few thousand steps on; off by default (the CPU configs train a few hundred).

    augment: the recipe's data augmentation (poison_core.augmentation). 'crop-flip' is what every
    reference victim trains with (forest/victims/training.py ``augmentations=True``; Unlearnable
    Examples' dataset.py; Sleeper Agent; ABL; WaNet; DPA): a random crop of the image zero-padded by
    `crop_padding` px (None: 4 px from 32 px images up, 2 px at 28 px as forest does for MNIST, see
    :func:`poison_core.augmentation.default_padding`) and a horizontal flip with probability 1/2 when
    `flip`. Off ('none') by default so that the small test victims keep their numbers; the shipped
    configs turn it on. When off, the three fields are left out of the dump, so recipes without
    augmentation serialise (and hash) as they did before.
    """

    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["none", "cosine", "step", "forest"] = "cosine"
    compile: bool = False
    augment: Literal["none", "crop-flip"] = "none"
    crop_padding: int | None = Field(None, ge=0, le=64)
    flip: bool = True

    @model_serializer(mode="wrap")
    def _dump_augmentation_only_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.augment == "none":
            for name in ("augment", "crop_padding", "flip"):
                data.pop(name, None)
        return data


class PretrainConfig(StrictModel):
    """The source task of the `transfer` and `finetune` protocols: a supervised model of the victim's
    architecture trained on another dataset (its images resized to the victim's image shape)."""

    dataset: DatasetConfig
    train: TrainConfig = TrainConfig()
    seed: int = Field(0, ge=0, le=2**32 - 1)


class SSLConfig(StrictModel):
    """The `simclr-linear` protocol's self-supervised pretraining: SimCLR (Chen et al., ICML 2020) on the
    victim's (poisoned) training images without labels; head and recipe of TUE's SimCLR code
    (projection 128, temperature 0.5, Adam lr 1e-3); epochs and batch sized for the CPU ConvNet."""

    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(256, ge=4, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10)
    temperature: float = Field(0.5, gt=0, le=10)
    projection_dim: int = Field(128, ge=2, le=4096)


PROTOCOLS = ("supervised", "simclr-linear", "transfer", "finetune", "relabel")
Protocol = Literal["supervised", "simclr-linear", "transfer", "finetune", "relabel"]


class VictimConfig(StrictModel):
    """A victim (or surrogate): an architecture, its training recipe and how it learns (`protocol`).

    protocol (poison_core.protocols): `supervised` trains from scratch on the training labels;
    `simclr-linear` pretrains the body with SimCLR on the training images (no labels, `ssl`) and
    trains a linear probe on frozen features; `transfer` freezes a body pretrained on another dataset
    (`pretrain`) and trains the linear head ('Just How Toxic', Schwarzschild et al., ICML 2021, Sec. 3);
    `finetune` starts from that body and trains every layer; `relabel` trains from scratch on labels
    the attacker did not know: the classes merged into `relabel_classes` groups by a seeded draw
    (the label-agnostic victim of Unlearnable Clusters, Zhang et al., CVPR 2023). The protocol's
    fields are left out of the dump for `supervised`, so such victims hash as they did before.
    """

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    protocol: Protocol = "supervised"
    pretrain: PretrainConfig | None = None
    ssl: SSLConfig = SSLConfig()
    relabel_classes: int = Field(2, ge=2, le=100_000)
    relabel_seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _protocol_has_what_it_needs(self) -> "VictimConfig":
        if self.protocol in ("transfer", "finetune") and self.pretrain is None and self.model.weights is None:
            raise ValueError(f"protocol {self.protocol!r} needs pretrain, a source dataset "
                             "(e.g. pretrain: {dataset: {name: digits}}), or model.weights, a trained model")
        return self

    @model_serializer(mode="wrap")
    def _dump_protocol_fields_only_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        used = {"supervised": (), "simclr-linear": ("ssl",), "transfer": ("pretrain",),
                "finetune": ("pretrain",), "relabel": ("relabel_classes", "relabel_seed")}[self.protocol]
        for name in ("protocol", "pretrain", "ssl", "relabel_classes", "relabel_seed"):
            if name not in used and not (name == "protocol" and self.protocol != "supervised"):
                data.pop(name, None)
        return data

    def supervised(self) -> "VictimConfig":
        """This architecture and recipe under the plain supervised protocol, from a random initialisation
        (what a surrogate uses unless `surrogate` is given: the attacker does not hold the victim's weights)."""
        return VictimConfig(model=self.model.model_copy(update={"weights": None}), train=self.train)


class SetupsFile(StrictModel):
    """A file of poison keys drawn by someone else: the 'Just How Toxic' benchmark's
    ``poison_setups/*.pickle`` (Schwarzschild et al., ICML 2021; aks2203/poisoning-benchmark, how_to.md),
    a list of {"target class", "target index", "base class", "base indices"} dicts. The keys used are
    setups ``start`` .. ``start + n_targets - 1`` (poison_core.interop.setups)."""

    format: Literal["benchmark"] = "benchmark"
    path: str = Field(min_length=1, max_length=4096)
    start: int = Field(0, ge=0, le=100_000)


class TargetSelection(StrictModel):
    """How targeted attacks pick (target test image, adversarial class, base class) keys: a seeded
    ``random`` draw, ``fixed`` test ids, or ``setups``, another tool's keys read from a file (targets,
    classes and the bases themselves). A selection without a setups file dumps (and hashes) as before."""

    mode: Literal["random", "fixed", "setups"] = "random"
    n_targets: int = Field(1, ge=1, le=100_000)
    target_ids: tuple[int, ...] = ()
    adversarial_class: int | None = Field(None, ge=0)
    base_class: int | None = Field(None, ge=0)
    setups: SetupsFile | None = None

    @model_validator(mode="after")
    def _fixed_needs_ids(self) -> "TargetSelection":
        if self.mode == "fixed" and not self.target_ids:
            raise ValueError("targets.target_ids must name at least one test id when mode is 'fixed'")
        if (self.mode == "setups") != (self.setups is not None):
            raise ValueError("targets.setups (a file of keys, e.g. {path: cifar10_transfer_learning.pickle}) is "
                             "given exactly when mode is 'setups'")
        if self.mode == "setups":
            for name in ("target_ids", "adversarial_class", "base_class"):
                if getattr(self, name) not in (None, ()):
                    raise ValueError(f"targets.{name}: the setups file gives every key's target and classes; "
                                     f"leave {name} unset when mode is 'setups'")
        return self

    @model_serializer(mode="wrap")
    def _dump_without_setups(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.setups is None:
            data.pop("setups", None)
        return data


class ThreatModel(StrictModel):
    """The attacker's power (Goldblum et al., 'Dataset Security for ML', 2022, Sec. 2).

    epsilon: L-inf bound on the uint8 grid, in /255 (0..255). budget: fraction of the training set
    the attacker controls, in (0, 1]. clean_label: poisons keep their true labels.

    color_epsilon: bound of a colour perturbation (ReColorAdv, Laidlaw & Feizi, NeurIPS 2019, Sec. 3;
    MetaPoison's reference applies one, -epscolor 0.04): the largest shift of any point of the colour
    grid along any channel of its colour space (poison_core.recolor: YUV, or grey), as a fraction
    of that channel's range, in [0, 1]. 0 (the default) allows no colour perturbation; with a colour part
    the L-inf bound `epsilon` applies to the poison minus the colour-shifted image. A zero color_epsilon
    is left out of the dump, so threat models without one serialise (and hash) as they did before.
    """

    epsilon: int = Field(16, ge=0, le=255)
    budget: float = Field(0.01, gt=0, le=1)
    clean_label: bool = False
    knowledge: Literal["white", "grey", "black"] = "white"
    targets: TargetSelection = TargetSelection()
    color_epsilon: float = Field(0.0, ge=0, le=1)

    @model_serializer(mode="wrap")
    def _dump_without_zero_color(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.color_epsilon == 0:
            data.pop("color_epsilon", None)
        return data

    def max_poisons(self, n_train: int) -> int:
        """The largest poison count this budget allows on `n_train` samples: floor(budget * n)."""
        return int(math.floor(self.budget * n_train + 1e-9))


class _Named(StrictModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(None, pattern=NAME_PATTERN)

    @property
    def key(self) -> str:
        """The member's name in the grid: `id` when given (two configs of one attack), else `name`."""
        return self.id or self.name

    def _registry(self):  # pragma: no cover - overridden
        raise NotImplementedError

    @model_validator(mode="after")
    def _params_match_member(self) -> "_Named":
        cls = self._registry().get(self.name)
        try:
            cls.Params.model_validate(self.params)
        except ValidationError as exc:
            raise ValueError(f"params of {self.name!r}: {format_validation_error(exc, cls.Params)}") from None
        return self

    def parsed_params(self) -> BaseModel:
        """The params validated against the member's own parameter model."""
        return self._registry().get(self.name).Params.model_validate(self.params)


class AttackConfig(_Named):
    """An attack by registry name, its parameters, and optionally its own threat model."""

    threat: ThreatModel | None = None

    def _registry(self):
        from poison_core.attacks import ATTACKS

        return ATTACKS


class DefenseConfig(_Named):
    """A defense by registry name and its parameters."""

    def _registry(self):
        from poison_core.defenses import DEFENSES

        return DEFENSES


class RuntimeEnvConfig(StrictModel):
    """The part of a Ray ``runtime_env`` every job of a run gets (Ray's runtime environments docs): code that
    the cluster's image does not have, e.g. a plug-in: ``py_modules`` (local package folders or wheels,
    uploaded by Ray), ``pip`` (requirements installed per job), ``working_dir`` (a folder uploaded and made
    the jobs' working directory), ``env_vars`` (added to those the driver forwards)."""

    py_modules: tuple[str, ...] = Field((), max_length=64)
    pip: tuple[str, ...] = Field((), max_length=256)
    working_dir: str | None = None
    env_vars: dict[str, str] = Field(default_factory=dict)

    def as_ray(self) -> dict[str, Any]:
        """The ``runtime_env`` mapping Ray takes (empty fields left out)."""
        out: dict[str, Any] = {"py_modules": list(self.py_modules), "pip": list(self.pip),
                               "working_dir": self.working_dir, "env_vars": dict(self.env_vars)}
        return {k: v for k, v in out.items() if v}


class ExecutionConfig(StrictModel):
    """Where and with what each job runs: Ray address (None: RAY_ADDRESS, else a local instance),
    CPUs and GPUs per job, retries of a failed job, Ray's scheduling strategy (SPREAD puts jobs on
    every node rather than packing the first), the torch device inside a job, how often (in
    steps or rounds) long attacks checkpoint their crafting state to the store, and the Ray
    `runtime_env` every job gets (plug-ins the cluster's image does not have)."""

    ray_address: str | None = None
    num_cpus: float = Field(1.0, gt=0, le=256)
    num_gpus: float = Field(0.0, ge=0, le=16)
    max_retries: int = Field(2, ge=0, le=10)
    checkpoint_every: int = Field(10, ge=1, le=100_000)
    scheduling: Literal["SPREAD", "DEFAULT"] = "SPREAD"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    runtime_env: RuntimeEnvConfig = RuntimeEnvConfig()


class BenchmarkConfig(StrictModel):
    """A grid of cells: every attack x every defense x every seed on one dataset and victim."""

    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetConfig = DatasetConfig()
    victim: VictimConfig = VictimConfig()
    surrogate: VictimConfig | None = None
    n_surrogates: int = Field(1, ge=1, le=64)
    threat: ThreatModel = ThreatModel()
    attacks: tuple[AttackConfig, ...] = Field(min_length=1, max_length=256)
    defenses: tuple[DefenseConfig, ...] = Field(default_factory=lambda: (DefenseConfig(name="none"),),
                                                min_length=1, max_length=256)
    seeds: tuple[int, ...] = Field((0,), min_length=1, max_length=1000)
    execution: ExecutionConfig = ExecutionConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in seeds if not 0 <= s <= 2**32 - 1]
        if bad:
            raise ValueError(f"seed {bad[0]} is outside 0..4294967295")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @model_validator(mode="after")
    def _grid_names_unique(self) -> "BenchmarkConfig":
        for field_name in ("attacks", "defenses"):
            keys = [member.key for member in getattr(self, field_name)]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup:
                raise ValueError(f"{field_name}: {dup!r} appears twice; give each an `id`")
        return self

    def threat_for(self, attack: AttackConfig) -> ThreatModel:
        return attack.threat or self.threat

    @model_validator(mode="after")
    def _surrogate_is_supervised(self) -> "BenchmarkConfig":
        if self.surrogate is not None and self.surrogate.protocol != "supervised":
            raise ValueError("surrogate.protocol: the attacker's surrogates train supervised; "
                             "set the protocol on victim")
        return self

    def surrogate_or_victim(self) -> VictimConfig:
        """The attacker's recipe: `surrogate`, else the victim's architecture and recipe, supervised."""
        return self.surrogate or self.victim.supervised()


def load_benchmark(source: str | Path) -> BenchmarkConfig:
    """Load a benchmark from a YAML file path (or YAML text starting with a newline or '{')."""
    text = read_yaml_text(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # yaml's composer recurses once per level of nesting
        raise ConfigError(f"malformed YAML: nested deeper than Python's recursion limit allows "
                          f"(a benchmark needs fewer than {MAX_YAML_DEPTH} levels)") from None
    if _depth(raw) > MAX_YAML_DEPTH:
        raise ConfigError(f"malformed YAML: nested more than {MAX_YAML_DEPTH} levels deep")
    if not isinstance(raw, dict):
        raise ConfigError(f"benchmark config must be a YAML mapping, got {type(raw).__name__}")
    return parse_config(BenchmarkConfig, raw)


def parse_config(model: type[StrictModel], raw: Any) -> Any:
    """Validate `raw` against `model`, turning any error into one ConfigError line."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model)) from None
    except InputError as exc:  # registry lookups inside validators
        raise ConfigError(str(exc)) from None


def read_yaml_text(source: str | Path) -> str:
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        return source
    try:
        return read_text(source, "config file", limit=MAX_CONFIG_BYTES)
    except InputError as exc:  # a FIFO, a folder, invalid UTF-8, a huge file: one line naming the path
        raise ConfigError(str(exc)) from None


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of parsed YAML, stopping once it passes MAX_YAML_DEPTH (no deep recursion)."""
    if level > MAX_YAML_DEPTH or not isinstance(value, (dict, list)):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(child, level + 1) for child in children), default=level + 1)
