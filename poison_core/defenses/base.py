"""The Defense protocol: (possibly poisoned) training data -> a trained classifier.

A *training* defense changes how the victim is trained (DPA, ABL, augmentation, adversarial
training, trimmed loss); a *filter* defense returns a keep mask and the victim trains on what is
kept. Both return a DefenseResult whose classifier the evaluation queries with uint8 images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from poison_core.config import StrictModel, VictimConfig
from poison_core.data.dataset import ImageDataset
from poison_core.registry import Registry


class DefenseParams(StrictModel):
    """Base of every defense's parameter model: a StrictModel (frozen, unknown keys forbidden, no bools for numbers)."""


class Predictor(Protocol):
    """Anything that maps uint8 NHWC images to (N, K) logits or scores."""

    def predict_logits(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class ModelClassifier:
    """A single trained torch model as a Predictor."""

    model: nn.Module
    device: torch.device

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        from poison_core.training import predict_logits

        return predict_logits(self.model, images, device=self.device)


@dataclass
class EnsembleClassifier:
    """k models that vote: `votes` counts each class's votes, `predict_logits` returns those counts
    with ties broken towards the smaller label (Levine & Feizi, ICLR 2021, Eq. 1), so argmax of the
    result is the plurality vote."""

    models: list[nn.Module]
    device: torch.device

    def votes(self, images: np.ndarray) -> np.ndarray:
        from poison_core.training import predict_logits

        counts = None
        for model in self.models:
            pred = predict_logits(model, images, device=self.device).argmax(axis=1)
            one_hot = np.eye(model.head.out_features, dtype=np.int64)[pred]
            counts = one_hot if counts is None else counts + one_hot
        return counts

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        counts = self.votes(images).astype(np.float64)
        k = counts.shape[1]
        return counts - np.arange(k)[None, :] / (2.0 * k)  # fractional penalty: ties go to the smaller label


def sequential_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    """The default `DefenseContext.map`: fn(*args) for each args tuple, in order, in this process."""
    return [fn(*args) for args in calls]


@dataclass
class DefenseContext:
    """The training data a defense sees, the victim recipe, seed and device.

    is_poison is the ground truth, given only so filters can report precision/recall; a defense
    must never use it to decide anything. `map` runs independent jobs (e.g. DPA's k base models);
    orchestration passes a Ray-backed map, the default runs them one after another.
    """

    train: ImageDataset
    victim: VictimConfig
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_poison: np.ndarray | None = None
    map: Callable[[Callable[..., Any], Sequence[tuple]], list[Any]] = sequential_map


@dataclass
class DefenseResult:
    classifier: Predictor
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)


class Defense(ABC):
    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    smoke: ClassVar[dict[str, Any]] = {}
    """Parameters for a fit of a second or so on 120 digits (`poison_core.contract`)."""

    def __init__(self, params: DefenseParams | dict[str, Any] | None = None) -> None:
        # Typed Any: it is an instance of the member's own `Params` model, whose fields the member reads.
        self.params: Any = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})

    @abstractmethod
    def fit(self, ctx: DefenseContext) -> DefenseResult:
        """Train (and possibly filter) on ctx.train; return the defended classifier."""


DEFENSES: Registry[type[Defense]] = Registry("defense", group="belladonna.defenses")
DEFENSES.check = lambda obj: None if isinstance(obj, type) and issubclass(obj, Defense) else (
    f"{obj!r} is not a Defense subclass (poison_core.plugin.Defense or FilterDefense)")


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: register a Defense subclass under its `name` with its paper and summary."""
    return DEFENSES.register(cls.name, paper=cls.paper, summary=cls.summary)(cls)


def make_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    return DEFENSES.get(name)(params)


class FilterDefense(Defense):
    """A data filter: `keep_mask` decides which training samples to keep; the victim trains on them.
    With ground truth in ctx.is_poison, `fit` reports detection precision, recall and kept fraction."""

    @abstractmethod
    def keep_mask(self, ctx: DefenseContext) -> np.ndarray:
        """Boolean (N,) mask over ctx.train: True = keep."""

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        keep = np.asarray(self.keep_mask(ctx), dtype=bool)
        if keep.shape != (len(ctx.train),) or not keep.any():
            raise ValueError(f"{self.name}: keep mask must be ({len(ctx.train)},) with at least one kept sample")
        result = train_victim(ctx, ctx.train.subset(np.flatnonzero(keep)))
        result.info.update(detection_scores(keep, ctx.is_poison))
        return result


def detection_scores(keep: np.ndarray, is_poison: np.ndarray | None) -> dict[str, float]:
    """Kept fraction and, with ground truth, precision/recall of flagging (removing) the poisons."""
    info = {"kept_fraction": float(keep.mean())}
    if is_poison is not None and is_poison.any():
        removed = ~keep
        true_pos = float((removed & is_poison).sum())
        info["filter_precision"] = float(true_pos / removed.sum()) if removed.any() else 0.0
        info["filter_recall"] = true_pos / float(is_poison.sum())
    return info


def train_victim(ctx: DefenseContext, data: ImageDataset, hooks=None) -> DefenseResult:
    """Build the victim (seeded, under its protocol) and train it on `data`: the shared training step."""
    from poison_core.protocols import build_victim
    from poison_core.training import train_model

    model = build_victim(ctx.victim, data, ctx.seed, ctx.device)
    history = train_model(model, data, ctx.victim.train, device=ctx.device, seed=ctx.seed, hooks=hooks)
    return DefenseResult(ModelClassifier(model, ctx.device), history=list(history.epochs))
