"""The contract every member passes, built-in or plug-in (after scikit-learn's ``check_estimator``).

``check_member("attack", "badnets")`` runs the checks on tiny data (200 digits, a width-4 ConvNet
surrogate) in a second or so and returns the names of the checks passed; the first failure raises
:class:`ContractError` (an AssertionError, so a plain pytest test can call it) naming the member and the
check. ``belladonna check attack|defense|model NAME`` runs the same. A member sets its own quick
settings in the class attribute ``smoke`` (parameters) and, for an attack, ``smoke_threat`` (threat-model
fields, e.g. ``{"epsilon": 32}``); they default to the parameters' defaults and the threat below.

* attack: its parameters refuse an unknown key; a craft stays within the threat model (budget, epsilon on
  the uint8 grid, labels kept under clean-label, ids of the training set, no id twice); the same seed
  gives the same PoisonSet; the PoisonSet survives the audited file format;
* defense: its parameters refuse an unknown key; fitting on a tiny poisoned set gives a predictor of
  finite (N, K) scores; the same seed gives the same scores; the saved predictor loads to the same scores;
* model: ``forward == head(features)`` with ``head`` an ``nn.Linear`` over the feature dimension, for
  1- and 3-channel images; the same seed builds the same weights; the saved weights load to the same outputs.
"""

from __future__ import annotations

import copy
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig

KINDS = ("attack", "defense", "model")
SMOKE_THREAT: dict[str, Any] = {"epsilon": 16, "budget": 0.1}


class ContractError(AssertionError):
    """A member breaks the contract; the message names the member and the check."""


def check_member(kind: str, name: str) -> list[str]:
    """Run `kind`'s contract on the registered (or import-string) member `name`; the checks passed."""
    checks = {"attack": _check_attack, "defense": _check_defense, "model": _check_model}
    if kind not in checks:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    passed: list[str] = []
    with torch.random.fork_rng(devices=[]):
        checks[kind](name, passed)
    return passed


def _require(ok: bool, kind: str, name: str, check: str, detail: str) -> None:
    if not ok:
        raise ContractError(f"{kind} {name!r} fails '{check}': {detail}")


def _run(kind: str, name: str, check: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ContractError:
        raise
    except Exception as exc:  # any failure of the member is a contract failure
        raise ContractError(f"{kind} {name!r} fails '{check}': {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())}") from exc


@lru_cache(maxsize=1)
def _tiny() -> Any:
    from poison_core.data import load_dataset

    return load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))


def _params_refuse_unknown_keys(kind: str, name: str, cls: Any, passed: list[str]) -> dict[str, Any]:
    smoke = dict(getattr(cls, "smoke", None) or {})
    if getattr(cls, "smoke", {}) is None:  # no settings to build it from: its parameters are all there is
        try:
            cls.Params.model_validate({"no_such_parameter": 1})
        except ValidationError as exc:
            if any(e.get("type") == "extra_forbidden" for e in exc.errors()):
                passed.append("params refuse an unknown key")
                return smoke
        _require(False, kind, name, "params refuse an unknown key", "an unknown key was accepted")
    _run(kind, name, "smoke params validate", lambda: cls.Params.model_validate(smoke))
    try:
        cls.Params.model_validate({**smoke, "no_such_parameter": 1})
    except ValidationError:
        passed.append("params refuse an unknown key")
    else:
        _require(False, kind, name, "params refuse an unknown key", "an unknown key was accepted "
                 "(derive Params from AttackParams / DefenseParams: extra='forbid')")
    return smoke


@lru_cache(maxsize=1)
def _surrogate() -> nn.Module:
    """A width-4 ConvNet trained 2 epochs on the tiny set (attacks get a copy: they must not change it)."""
    from poison_core.models import build_model
    from poison_core.training import train_model

    train = _tiny().train
    model = build_model(ModelConfig(name="convnet", width=4), train.image_shape, train.num_classes, seed=0)
    train_model(model, train, TrainConfig(epochs=2, batch_size=64), device="cpu", seed=0)
    return model.eval()


def _check_attack(name: str, passed: list[str]) -> None:
    from poison_core.attacks import ATTACKS, CraftContext
    from poison_core.poisons import audit, from_parquet_bytes, to_parquet_bytes

    cls = ATTACKS.get(name)  # an unknown or broken name is bad input (UnknownNameError, PluginError)
    params = _params_refuse_unknown_keys("attack", name, cls, passed)
    if cls.smoke is None:
        passed.append("craft not checked: the attack declares no smoke settings (it needs inputs of its own)")
        return
    splits = _tiny()
    train = splits.train
    threat = ThreatModel(**{**SMOKE_THREAT, "clean_label": cls.label_policy == "clean",
                            **(getattr(cls, "smoke_threat", {}) or {})})
    def craft() -> Any:
        surrogates = [copy.deepcopy(_surrogate())] if cls.needs_surrogate else []
        ctx = CraftContext(train=train, test=splits.test, threat=threat, seed=0, surrogates=surrogates)
        return cls(params).craft(ctx)

    first = _run("attack", name, "crafts on tiny data", craft)
    passed.append("crafts on tiny data")
    ids = np.asarray(first.ids)
    _require(len(ids) <= threat.max_poisons(len(train)), "attack", name, "budget",
             f"{len(ids)} poisons, the budget allows {threat.max_poisons(len(train))}")
    _require(len(set(ids.tolist())) == len(ids) and set(ids.tolist()) <= set(train.ids.tolist()), "attack", name,
             "ids", "poison ids must be distinct ids of the training set")
    clean = train.images[train.positions(ids)].astype(np.int16)
    if cls(params).changes_only_within_epsilon(threat):
        worst = int(np.abs(first.images.astype(np.int16) - clean).max()) if len(ids) else 0
        _require(worst <= threat.epsilon, "attack", name, "epsilon", f"a pixel moved by {worst} > {threat.epsilon}")
    if threat.clean_label:
        _require(np.array_equal(first.poison_labels, train.labels[train.positions(ids)]), "attack", name,
                 "labels kept under clean-label", "a poison's label differs from its clean label")
    _require(bool(np.all((first.poison_labels >= 0) & (first.poison_labels < train.num_classes))), "attack", name,
             "labels", "a poison label is outside the dataset's classes")
    _run("attack", name, "audit", lambda: audit(first, train))
    passed += ["budget", "ids", "epsilon", "labels", "audit"]
    second = _run("attack", name, "deterministic", craft)
    same = (np.array_equal(first.ids, second.ids) and np.array_equal(first.images, second.images)
            and np.array_equal(first.poison_labels, second.poison_labels))
    _require(same, "attack", name, "deterministic", "the same seed gave different poisons")
    passed.append("deterministic")
    back = _run("attack", name, "file round trip", lambda: from_parquet_bytes(to_parquet_bytes(first)))
    order = np.argsort(first.ids, kind="stable")  # the file keeps poisons in id order
    _require(np.array_equal(back.ids, first.ids[order]) and np.array_equal(back.images, first.images[order])
             and np.array_equal(back.poison_labels, first.poison_labels[order]), "attack", name,
             "file round trip", "the PoisonSet read back differs")
    passed.append("file round trip")


def _check_defense(name: str, passed: list[str]) -> None:
    from poison_core.defenses import DEFENSES, DefenseContext
    from poison_core.defenses.persist import load_classifier, save_classifier

    cls = DEFENSES.get(name)
    params = _params_refuse_unknown_keys("defense", name, cls, passed)
    splits = _tiny()
    train = splits.train.subset(np.arange(120))
    victim = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=32))
    mask = np.arange(len(train)) % 10 == 0

    def fit() -> Any:
        return cls(params).fit(DefenseContext(train=train, victim=victim, seed=0, is_poison=mask))

    result = _run("defense", name, "fits on tiny data", fit)
    scores = _run("defense", name, "predicts", lambda: np.asarray(result.classifier.predict_logits(splits.test.images)))
    _require(scores.shape == (len(splits.test), train.num_classes) and bool(np.isfinite(scores).all()), "defense",
             name, "predicts", f"scores of shape {scores.shape} (expected {(len(splits.test), train.num_classes)}, "
             "finite)")
    passed += ["fits on tiny data", "predicts"]
    again = _run("defense", name, "deterministic", lambda: fit().classifier.predict_logits(splits.test.images))
    _require(np.array_equal(scores, again), "defense", name, "deterministic", "the same seed gave other scores")
    passed.append("deterministic")
    with tempfile.TemporaryDirectory(prefix="belladonna-check-") as tmp:
        uri = str(Path(tmp) / "model.safetensors")
        _run("defense", name, "save and load", lambda: save_classifier(result.classifier, uri,
                                                                       {"history": result.history, "info": {}}))
        loaded, _ = _run("defense", name, "save and load", lambda: load_classifier(
            uri, victim, train.image_shape, train.num_classes, torch.device("cpu")))
        _require(np.allclose(loaded.predict_logits(splits.test.images), scores, atol=1e-5), "defense", name,
                 "save and load", "the loaded predictor scores differently")
    passed.append("save and load")


def _check_model(name: str, passed: list[str]) -> None:
    from poison_core.models import MODELS, Classifier, build_model
    from poison_core.models.io import load_state, state_tensors

    MODELS.get(name)
    shapes: tuple[tuple[int, int, int], ...] = ((8, 8, 1), (32, 32, 3))
    for shape in shapes:
        model = _run("model", name, f"builds for {shape}",
                     lambda: build_model(ModelConfig(name=name), shape, 3, seed=0)).eval()  # noqa: B023  (called at once)
        _require(isinstance(model, Classifier) and isinstance(getattr(model, "head", None), nn.Linear), "model", name,
                 "features/head", "the model must be a Classifier with an nn.Linear head (see poison_core.plugin)")
        x = torch.rand(4, shape[2], shape[0], shape[1])
        with torch.no_grad():
            out, features = model(x), model.features(x)
        _require(tuple(out.shape) == (4, 3), "model", name, "output shape", f"{tuple(out.shape)} for 4 images, 3 classes")
        _require(features.shape == (4, model.head.in_features) and torch.allclose(model.head(features), out, atol=1e-5),
                 "model", name, "features/head", "forward(x) must equal head(features(x))")
        twin = build_model(ModelConfig(name=name), shape, 3, seed=0)
        _require(all(torch.equal(a, b) for a, b in zip(state_tensors(model).values(), state_tensors(twin).values())),
                 "model", name, "deterministic", "the same seed built different weights")
        with tempfile.TemporaryDirectory(prefix="belladonna-check-") as tmp:
            from safetensors.torch import save as save_bytes

            path = Path(tmp) / "m.safetensors"
            path.write_bytes(save_bytes(state_tensors(model)))
            other = build_model(ModelConfig(name=name), shape, 3, seed=1).eval()
            load_state(other, str(path))
            with torch.no_grad():
                _require(torch.allclose(other(x), out, atol=1e-5), "model", name, "save and load",
                         "the loaded weights give other outputs")
    passed += ["builds", "output shape", "features/head", "deterministic", "save and load"]


__all__ = ["ContractError", "KINDS", "check_member"]
