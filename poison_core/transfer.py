"""The transfer-learning victim: a pretrained feature extractor, frozen, with a retrained linear head.

The threat model of Poison Frogs (Shafahi et al., NeurIPS 2018, Sec. 4.1 'transfer learning') and
Convex Polytope (Zhu et al., ICML 2019, Sec. 5.1 'transfer learning'): the victim takes a
pretrained network, freezes every layer but the last, and retrains that linear layer on the
(possibly poisoned) training set. The frozen body runs in eval mode (BatchNorm keeps its running
statistics) and only `.head` is re-initialised (from `seed`) and trained with the recipe `cfg`
(optimizer, lr schedule, epochs, batch size, weight decay, augmentation).

Augmentation. The attacks' own references train this head without it: Poison Frogs on precomputed
bottleneck features, Convex and Bullseye Polytope on a ``FeatureSet`` of precomputed features,
Hidden Trigger Backdoor (``finetune_and_test.py``) on resized images only. The 'Just How Toxic'
benchmark (Schwarzschild et al., ICML 2021; ``benchmark_test.py``, ``train_augment`` on by default)
crops and flips the images before its frozen extractor. With ``cfg.augment == 'none'`` the body's
features are computed once and the head trains on them; otherwise the head trains through
:class:`poison_core.protocols.LinearProbe` with :func:`poison_core.training.train_model`, the loop of
every other victim and of the pipeline's ``transfer`` protocol, so each epoch sees freshly augmented
images. Same (model, data, cfg, seed) -> identical head on CPU; the caller's model and global RNG are
left untouched.

    victim = finetune(surrogate, poisoned_train, TrainConfig(epochs=20, lr=0.01), device="cpu", seed=1)
    evaluate(ModelClassifier(victim, torch.device("cpu")), test, poison_set)
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poison_core.config import TrainConfig
from poison_core.data.dataset import ImageDataset
from poison_core.protocols import LinearProbe
from poison_core.training import batch_slices, learning_rate, make_optimizer, to_tensor, train_model

log = logging.getLogger(__name__)


def extract_features(model: nn.Module, images: np.ndarray, *, device: torch.device | str,
                     batch_size: int = 512) -> torch.Tensor:
    """`model.features` (N, D) of uint8 NHWC `images`, in eval mode without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(model.features(to_tensor(images[start:start + batch_size], device)))
    return torch.cat(out) if out else torch.zeros((0, model.head.in_features), device=device)


def finetune(pretrained: nn.Module, train: ImageDataset, cfg: TrainConfig, *, device: torch.device | str,
             seed: int, reinit_head: bool = True) -> nn.Module:
    """A copy of `pretrained` whose body is frozen and whose `.head` is retrained on `train`; eval mode."""
    if len(train) == 0:
        raise ValueError(f"cannot fine-tune on dataset {train.name!r}: it has no samples")
    device = torch.device(device)
    model = copy.deepcopy(pretrained).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.augment != "none":
        if reinit_head:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.head.reset_parameters()
        train_model(LinearProbe(model), train, cfg, device=device, seed=seed)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
    features = extract_features(model, train.images, device=device).clone()
    labels = torch.from_numpy(train.labels).to(device)
    head = model.head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if reinit_head:
            head.reset_parameters()
        for p in head.parameters():
            p.requires_grad_(True)
        shuffle = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(head, cfg)
        batches = batch_slices(len(train), cfg.batch_size)
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=shuffle).to(device)
            total = 0.0
            for b, batch in enumerate(batches):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, epoch * len(batches) + b, len(batches))
                idx = order[batch]
                loss = F.cross_entropy(head(features[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            log.debug("finetune epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, total / len(train))
    for p in head.parameters():
        p.requires_grad_(False)
    return model.eval()
