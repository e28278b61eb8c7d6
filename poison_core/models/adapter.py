"""Any ``nn.Module`` classifier as a Belladonna model: the features/head convention by adaptation.

A plug-in or import-string model (``torchvision.models:resnet18``) is usually a constructor taking
``num_classes`` and returning a module whose last layer is an ``nn.Linear`` named ``fc`` (ResNets),
``head`` (ViTs, ours) or ``classifier[-1]`` (VGG, MobileNet, EfficientNet). :func:`as_builder` wraps
such a constructor into a registered builder ``(in_channels, num_classes, image_size, width)``; the
built :class:`AdaptedClassifier` keeps the module as its ``body`` with that last layer replaced by an
identity, and the layer itself as its ``head``, so ``model(x) == head(features(x))``. A model that
expects 3 channels sees 1-channel images repeated over 3 channels. `width` does not apply.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

from poison_core.errors import ConfigError
from poison_core.models.base import Classifier

HEAD_NAMES = ("fc", "head", "classifier")


def final_linear(module: nn.Module) -> tuple[str, nn.Linear]:
    """(its dotted name, the final nn.Linear) of `module`, which is replaced by an identity in place."""
    for name in HEAD_NAMES:
        layer = getattr(module, name, None)
        if isinstance(layer, nn.Linear):
            setattr(module, name, nn.Identity())
            return name, layer
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            last = layer[-1]
            layer[-1] = nn.Identity()
            return f"{name}.{len(layer) - 1}", last
    raise ConfigError(f"model {type(module).__name__}: no final nn.Linear named fc, head or classifier[-1]; "
                      "register a builder following poison_core.plugin.Classifier instead")


class AdaptedClassifier(Classifier):
    """An arbitrary classifier split into `body` (everything but the final linear layer) and `head`."""

    def __init__(self, module: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.head_name, head = final_linear(module)
        self.body = module
        self.head = head
        conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        expected = conv.in_channels if conv is not None else in_channels
        if expected not in (in_channels, 3) or (expected == 3 and in_channels not in (1, 3)):
            raise ConfigError(f"model {type(module).__name__}: its first convolution takes {expected} channels, "
                              f"the images have {in_channels}")
        self.repeat = expected == 3 and in_channels == 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        return torch.flatten(self.body(x), 1)

    def state_key(self, name: str) -> str:
        """This model's state-dict key for `name` as the wrapped module calls it (``fc.weight`` -> ``head.weight``)."""
        if name.startswith(self.head_name + "."):
            return "head." + name[len(self.head_name) + 1:]
        return name if name.startswith(("body.", "head.")) else f"body.{name}"


def as_builder(obj: Any) -> Callable[..., nn.Module]:
    """A registry builder from `obj`: itself when it takes ``in_channels`` (the native signature), else a
    constructor called with ``num_classes`` whose module is adapted."""
    try:
        native = "in_channels" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        native = False
    if native:
        return obj

    def builder(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int | None) -> nn.Module:
        module = obj(num_classes=num_classes)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model {obj!r}: called with num_classes it returned {type(module).__name__}, "
                              "not an nn.Module")
        return module if isinstance(module, Classifier) else AdaptedClassifier(module, in_channels)

    # __wrapped__ only: the code fingerprint follows it to the real module (inspect.unwrap)
    return functools.wraps(obj, assigned=(), updated=())(builder)
