"""A victim's (or surrogate's) initial weights from the user's own safetensors file (``model.weights``).

The file is a state dict saved with ``safetensors.torch.save_file`` (never a pickle), on a local path or
any fsspec URI (S3 included). Its keys are the model's own, or, for an adapted module
(`poison_core.models.adapter`), the wrapped module's (``conv1.weight``, ``fc.weight``: what
``torchvision.models.resnet18().state_dict()`` gives). Every layer must be there with its shape; only the
head may differ in shape (another number of classes: it keeps its fresh initialisation). Anything else is
one ConfigError line naming the layer. The file's content digest is part of the output keys
(`tasks.keys`).
"""

from __future__ import annotations

import logging

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from poison_core.errors import ConfigError
from poison_core.io import read_bytes

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, uri: str, field: str = "victim.model.weights") -> None:
    """Initialise `model` in place from the safetensors file at `uri`."""
    try:
        tensors = safetensors_load(read_bytes(uri))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ConfigError(f"{field}: {uri!r} is not a readable safetensors file ({exc})") from None
    rename = getattr(model, "state_key", None)
    if rename is not None and not any(k.startswith(("body.", "head.")) for k in tensors):
        tensors = {rename(k): v for k, v in tensors.items()}
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, target in expected.items():
        if name not in tensors:
            if name.startswith("head."):
                continue
            raise ConfigError(f"{field}: layer {name!r} is missing from {uri!r}")
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(target.shape):
            if name.startswith("head."):
                continue
            raise ConfigError(f"{field}: layer {name!r} has shape {tuple(tensor.shape)} in {uri!r}, "
                              f"the model's is {tuple(target.shape)}")
        state[name] = tensor
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ConfigError(f"{field}: {uri!r} has layer {unexpected[0]!r}, which the model does not "
                          f"({len(unexpected)} such)")
    skipped = sorted(set(expected) - set(state))
    model.load_state_dict(state, strict=False)
    log.info("initialised %s from %s%s", type(model).__name__, uri,
                f" (kept a fresh {', '.join(skipped)})" if skipped else "")
