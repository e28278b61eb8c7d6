"""Store a defended classifier as one safetensors file and rebuild it: a single model, or an
ensemble (DPA) whose members are saved as one ModuleList. The metadata says which."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from poison_core.config import VictimConfig
from poison_core.defenses.base import Classifier, EnsembleClassifier, ModelClassifier
from poison_core.protocols import victim_skeleton
from poison_core.models.io import load_state, read_metadata, save_model
from poison_core.io import read_bytes


def save_classifier(classifier: Classifier, uri: str, info: dict[str, Any],
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


def load_classifier(uri: str, victim: VictimConfig, image_shape: tuple[int, int, int], num_classes: int,
                    device: torch.device, storage_options: dict[str, Any] | None = None
                    ) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild what save_classifier wrote; returns (classifier, defense info)."""
    meta = read_metadata(read_bytes(uri, storage_options))
    members = int(meta.get("members", "1"))
    models = [victim_skeleton(victim, image_shape, num_classes) for _ in range(members)]
    module: nn.Module = models[0] if meta.get("kind", "single") == "single" else nn.ModuleList(models)
    load_state(module, uri, storage_options)
    for model in models:
        model.to(device).eval()
    classifier: Classifier = (ModelClassifier(models[0], device) if module is models[0]
                              else EnsembleClassifier(models, device))
    return classifier, json.loads(meta.get("defense_info", "{}"))
