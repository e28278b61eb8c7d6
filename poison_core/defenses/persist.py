"""Store a defended classifier as one safetensors file and rebuild it: a single model, or an
ensemble (DPA) whose members are saved as one ModuleList. The metadata says which."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from poison_core.config import VictimConfig
from poison_core.defenses.base import EnsembleClassifier, Predictor, ModelClassifier
from poison_core.protocols import victim_skeleton
from poison_core.errors import InputError
from poison_core.models.io import load_state, read_metadata, save_model, tensor_names
from poison_core.io import read_bytes


def save_classifier(classifier: Predictor, uri: str, info: dict[str, Any],
                    storage_options: dict[str, Any] | None = None) -> None:
    """Write the classifier's weights with its kind, member count and the defense's info."""
    if isinstance(classifier, ModelClassifier):
        module, kind, members = classifier.model, "single", 1
    elif isinstance(classifier, EnsembleClassifier):
        module, kind, members = nn.ModuleList(classifier.models), "ensemble", len(classifier.models)
    else:
        raise NotImplementedError(f"cannot store a {type(classifier).__name__}")
    meta = {"kind": kind, "members": str(members), "defense_info": json.dumps(info, default=float)}
    save_model(module, uri, meta, storage_options)


MAX_MEMBERS = 4096
"""Most ensemble members a stored classifier may hold (DPA's largest partition counts are in the thousands)."""


def stored_members(data: bytes, meta: dict[str, str], uri: str) -> int:
    """The member count `meta` claims, once checked against the tensors the file really holds (an ensemble's
    tensor names start with the member's index) and bounded by MAX_MEMBERS; else one InputError line."""
    kind, claimed = meta.get("kind", "single"), meta.get("members", "1")
    if kind not in ("single", "ensemble"):
        raise InputError(f"model file {uri!r}: metadata kind {kind[:40]!r} is neither 'single' nor 'ensemble'")
    if not (isinstance(claimed, str) and claimed.isdigit() and len(claimed) <= 6 and 1 <= int(claimed) <= MAX_MEMBERS):
        raise InputError(f"model file {uri!r}: metadata members {claimed[:40]!r} is not a count in 1..{MAX_MEMBERS}")
    members = int(claimed)
    if kind == "single":
        if members != 1:
            raise InputError(f"model file {uri!r}: a single model claims {members} members")
        return 1
    try:
        names = tensor_names(data)
    except ValueError as exc:
        raise InputError(f"model file {uri!r} is not a readable safetensors file: {exc}") from None
    held = {name.split(".", 1)[0] for name in names}
    if held != {str(i) for i in range(members)}:
        raise InputError(f"model file {uri!r}: metadata claims {members} ensemble members, its tensors hold "
                         f"{len(held)}")
    return members


def load_classifier(uri: str, victim: VictimConfig, image_shape: tuple[int, int, int], num_classes: int,
                    device: torch.device, storage_options: dict[str, Any] | None = None
                    ) -> tuple[Predictor, dict[str, Any]]:
    """Rebuild what save_classifier wrote; returns (classifier, defense info)."""
    data = read_bytes(uri, storage_options)
    meta = read_metadata(data)
    members = stored_members(data, meta, uri)  # checked against the file's tensors before any model is built
    models = [victim_skeleton(victim, image_shape, num_classes) for _ in range(members)]
    module: nn.Module = models[0] if meta.get("kind", "single") == "single" else nn.ModuleList(models)
    load_state(module, uri, storage_options)
    for model in models:
        model.to(device).eval()
    classifier: Predictor = (ModelClassifier(models[0], device) if module is models[0]
                              else EnsembleClassifier(models, device))
    return classifier, json.loads(meta.get("defense_info", "{}"))
