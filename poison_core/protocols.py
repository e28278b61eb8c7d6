"""Victim training protocols: how the victim learns from the (possibly poisoned) training set.

Availability poisons are judged by how the victim learns (Ren et al., 'Transferable Unlearnable
Examples', ICLR 2023, Table 1: error-minimising noise stops a supervised victim but barely moves a
SimCLR one; Zhang et al., 'Unlearnable Clusters', CVPR 2023: victims whose labels the attacker did
not know). `VictimConfig.protocol` picks one; every defense builds its models through
:func:`build_victim`, so each protocol works in every grid cell.

* ``supervised``: a freshly initialised model trained on the training labels (the default).
* ``simclr-linear``: the body is pretrained with SimCLR (Chen et al., ICML 2020, Eq. 1) on the
  training images without labels (`victim.ssl`), then frozen; only the linear head is trained on
  the training labels: the linear-probe evaluation of self-supervised learning.
* ``transfer``: the body of a model trained supervised on another dataset (`victim.pretrain`, its
  images resized to the victim's shape) is frozen and the linear head is trained: the 'frozen
  feature extractor' setting of Schwarzschild et al., 'Just How Toxic is Data Poisoning?', ICML
  2021, Sec. 3 (and of Poison Frogs / Convex Polytope's transfer victims).
* ``finetune``: the same pretrained body, every layer trained ('Just How Toxic', 'fine-tuning').
* ``relabel``: trained from scratch on labels the attacker did not know: the K classes merged into
  `victim.relabel_classes` groups by a seeded draw, on training and test set alike (the
  label-agnostic victim of Unlearnable Clusters). Only availability goals can be judged this way.

A frozen body (`LinearProbe`) stays in eval mode while the head trains, so its BatchNorm statistics
are those it was pretrained with. Pretrained source models are cached per process by content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poison_core.config import VictimConfig
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.models import Classifier, build_model
from poison_core.models.weights import load_weights
from poison_core.seeding import derive_seed

log = logging.getLogger(__name__)

FROZEN_BODY = ("simclr-linear", "transfer")
PRETRAINED = ("transfer", "finetune")
_SOURCE_CACHE: dict[str, dict[str, torch.Tensor]] = {}


class LinearProbe(Classifier):
    """A classifier whose body is frozen (no gradients, always eval mode): only `head` trains."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.head.parameters():
            p.requires_grad_(True)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.net.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def train(self, mode: bool = True) -> "LinearProbe":
        self.training = mode
        self.net.train(False)
        self.net.head.train(mode)
        return self


def victim_classes(victim: VictimConfig, num_classes: int) -> int:
    """How many classes the victim's head predicts on a dataset of `num_classes`."""
    return victim.relabel_classes if victim.protocol == "relabel" else num_classes


def relabel_map(num_classes: int, groups: int, seed: int) -> np.ndarray:
    """(K,) new label of each class: a seeded permutation of the classes dealt into `groups` groups
    round-robin, so every group gets floor(K / groups) or ceil(K / groups) classes."""
    if groups >= num_classes:
        raise ConfigError(f"victim.relabel_classes: {groups} must be below the dataset's {num_classes} classes "
                          f"(allowed: 2 <= relabel_classes < {num_classes})")
    order = np.random.default_rng(seed).permutation(num_classes)
    mapping = np.empty(num_classes, dtype=np.int64)
    mapping[order] = np.arange(num_classes) % groups
    return mapping


def relabelled(data: ImageDataset, victim: VictimConfig) -> ImageDataset:
    """`data` with the labels the victim learns from: merged groups under `relabel`, else unchanged."""
    if victim.protocol != "relabel":
        return data
    mapping = relabel_map(data.num_classes, victim.relabel_classes, victim.relabel_seed)
    names = tuple("+".join(data.class_names[k] for k in np.flatnonzero(mapping == g))
                  for g in range(victim.relabel_classes))
    return data.replace(labels=mapping[data.labels], class_names=names)


def check_goal(victim: VictimConfig, attack: str, targets: dict[str, Any] | None, trigger: Any) -> None:
    """Refuse a relabelled victim for goals stated in the attacker's class ids (targets, backdoors)."""
    kind = (targets or {}).get("kind")
    if victim.protocol == "relabel" and (trigger is not None or kind in ("targeted", "class_pair", "backdoor")):
        raise ConfigError(f"victim.protocol: 'relabel' changes the class ids, so only availability attacks can be "
                          f"judged; attack {attack!r} has a {kind or 'backdoor'} goal")


def resize_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 NHWC images to (H, W, C) = `shape`: bilinear with antialiasing; 1 -> 3 channels by
    repetition, 3 -> 1 by ITU-R 601 luma."""
    height, width, channels = shape
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def source_state(victim: VictimConfig, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The body (every parameter and buffer but the head) of the victim architecture trained supervised on
    `victim.pretrain.dataset`, resized to `image_shape`; trained once per process and content."""
    from poison_core.data import load_dataset
    from poison_core.training import accuracy, train_model

    pre = victim.pretrain
    key = hashlib.sha256(json.dumps({"model": victim.model.model_dump(mode="json"), "shape": list(image_shape),
                                     "pretrain": pre.model_dump(mode="json")}, sort_keys=True).encode()).hexdigest()
    if key not in _SOURCE_CACHE:
        splits = load_dataset(pre.dataset)
        train = splits.train.replace(images=resize_images(splits.train.images, image_shape))
        test = splits.test.replace(images=resize_images(splits.test.images, image_shape))
        seed = derive_seed(pre.seed, "pretrain", pre.dataset.name)
        model = build_model(victim.model, image_shape, train.num_classes, seed=seed)
        with torch.random.fork_rng(devices=[]):
            train_model(model, train, pre.train, device="cpu", seed=seed)
        log.info("pretrained %s on %s (%d images at %s): source test accuracy %.3f", victim.model.name,
                    pre.dataset.name, len(train), "x".join(map(str, image_shape)),
                    accuracy(model, test, device="cpu"))
        _SOURCE_CACHE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()
                              if not k.startswith("head.")}
    return _SOURCE_CACHE[key]


def ssl_state(victim: VictimConfig, data: ImageDataset, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The body of a SimCLR encoder of the victim architecture trained on `data.images` (no labels)."""
    from poison_core.simclr import fit_simclr_encoder

    ssl_seed = derive_seed(seed, "ssl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ssl_seed)
        gen = torch.Generator(device=device).manual_seed(ssl_seed)
        encoder = fit_simclr_encoder(data.images, victim.ssl, victim.model, num_classes=data.num_classes,
                                     rng=np.random.default_rng(ssl_seed), gen=gen, device=device)
    return {k: v.detach() for k, v in encoder.backbone.state_dict().items() if not k.startswith("head.")}


def _load_body(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"pretrained body does not fit the victim: missing {missing}, unexpected {unexpected}")


def build_victim(victim: VictimConfig, data: ImageDataset, seed: int, device: torch.device | str) -> nn.Module:
    """The victim model ready to train on `data` under `victim.protocol` (head freshly initialised from
    `seed`; the body random, pretrained on the source dataset, or SimCLR-pretrained on `data`)."""
    device = torch.device(device)
    model = build_model(victim.model, data.image_shape, data.num_classes, seed=seed)
    if victim.model.weights is not None:
        load_weights(model, victim.model.weights)
    elif victim.protocol in PRETRAINED:
        _load_body(model, source_state(victim, data.image_shape))
    elif victim.protocol == "simclr-linear":
        _load_body(model, ssl_state(victim, data, seed, device))
    if victim.protocol in FROZEN_BODY:
        model = LinearProbe(model)
    return model.to(device)


def victim_skeleton(victim: VictimConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """An untrained model of the victim's structure, to load saved weights into."""
    model = build_model(victim.model, image_shape, victim_classes(victim, num_classes), seed=0)
    return LinearProbe(model) if victim.protocol in FROZEN_BODY else model
