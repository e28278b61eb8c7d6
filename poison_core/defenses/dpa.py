"""Deep Partition Aggregation (Levine & Feizi, 'Deep Partition Aggregation: Provable Defenses against
General Poisoning Attacks', ICLR 2021).

The training set is split into k disjoint partitions by a hash of each sample's *pixels*
(P_i = {t in T : h(t) = i (mod k)}, the paper's Sec. 3), so the partition of a sample does not depend
on its position, its id, its label or on any other sample. As in the reference
(alevine0/DPA partition_data_norm_hash.py: the sum of the uint8 pixels mod k) the label is not
hashed, so relabelling a sample changes its own partition only, one vote; `partition_hash` = "sha256"
(default) hashes the pixel bytes with sha256 (balanced partitions whatever the pixel statistics),
"pixel_sum" is the reference's hash itself. Within a partition the samples are ordered by (pixel
digest, label), content only, like the reference's lexsort over (pixels, label). One base classifier
f_i is trained on each P_i and the ensemble predicts the plurality vote g(x) = argmax_c n_c(x), ties
going to the smaller label (Eq. 1). Inserting, deleting or relabelling one training sample changes
one partition, hence at most one vote; so the prediction is certified against any rho(x) such
changes (Theorem 1), where

    rho(x) = floor( (n_c - max_{c' != c} (n_{c'} + 1[c' < c])) / 2 ),   c = g(x).

Each base model is a deterministic function of its partition's content: its seed depends only on
(seed, i) and its samples are ordered by their content before training. A partition with fewer than
two samples (BatchNorm cannot train on one) gets the classifier of the empty training set: a model
whose head is zero, which always votes for class 0. That is still a fixed function of the
partition, so the certificate holds; it just spends one vote.

The certificate needs test data, which `fit` does not see: the evaluation calls
``certified_radius(classifier.votes(images))`` and ``certified_accuracy`` (or ``certified_report``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from poison_core.config import VictimConfig
from poison_core.data.dataset import ImageDataset
from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, EnsembleClassifier,
                                       register_defense)
from poison_core.seeding import derive_seed

log = logging.getLogger(__name__)

MIN_PARTITION_SIZE = 2
REPORT_RADII = (0, 1, 2, 5)


class DPAParams(DefenseParams):
    """k: number of partitions / base models (the paper uses k = 50 on MNIST and up to 1000 on
    CIFAR-10); epochs: base-model epochs (None: the victim recipe's); partition_hash: the pixel hash h
    (module docstring; "pixel_sum" is the reference's)."""

    k: int = Field(50, ge=2, le=10000)
    epochs: int | None = Field(None, ge=1, le=1000)
    partition_hash: Literal["sha256", "pixel_sum"] = "sha256"


def sample_digests(images: np.ndarray) -> list[bytes]:
    """sha256 of each sample's uint8 image bytes (pixels only: the label is not part of the hash)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return [hashlib.sha256(images[i].tobytes()).digest() for i in range(len(images))]


def partition_of(images: np.ndarray, k: int, scheme: Literal["sha256", "pixel_sum"] = "sha256") -> np.ndarray:
    """Partition index in [0, k) of each sample, from its pixels alone: the first 8 bytes of its sha256
    (little-endian) modulo k, or ("pixel_sum", the reference's) the sum of its uint8 pixels modulo k."""
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    if scheme == "pixel_sum":
        flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
        return (flat.sum(axis=1, dtype=np.int64) % k).astype(np.int64)
    return _partitions(sample_digests(images), k)


def _partitions(digests: list[bytes], k: int) -> np.ndarray:
    """h(t) mod k with h the first 8 bytes of the sample's sha256, read little-endian."""
    return np.array([int.from_bytes(d[:8], "little") % k for d in digests], dtype=np.int64)


def train_one(victim: VictimConfig, data: ImageDataset, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Train one base classifier on one partition; its CPU state dict (a module-level, picklable job)."""
    from poison_core.protocols import build_victim
    from poison_core.training import train_model

    model = build_victim(victim, data, seed, device)
    if len(data) >= MIN_PARTITION_SIZE:
        train_model(model, data, victim.train, device=device, seed=seed)
    else:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}


def plurality(votes: np.ndarray) -> np.ndarray:
    """The ensemble's prediction per row: most votes, ties to the smaller label (Eq. 1)."""
    return np.asarray(votes).argmax(axis=1)


def certified_radius(votes: np.ndarray) -> np.ndarray:
    """Certified number of training insertions/deletions per row of an (N, K) vote table (Theorem 1):
    floor((n_c - max_{c' != c}(n_{c'} + 1[c' < c])) / 2) with c the plurality class."""
    votes = np.asarray(votes)
    if votes.ndim != 2 or votes.shape[1] < 2:
        raise ValueError(f"votes: must be an (N, K) table with K >= 2 classes, got shape {votes.shape}")
    if not np.issubdtype(votes.dtype, np.integer) or (votes < 0).any():
        raise ValueError("votes: must be non-negative integer counts")
    votes = votes.astype(np.int64)
    rows = np.arange(len(votes))
    pred = plurality(votes)
    rival = votes + (np.arange(votes.shape[1])[None, :] < pred[:, None])
    rival[rows, pred] = np.iinfo(np.int64).min
    return (votes[rows, pred] - rival.max(axis=1)) // 2


def certified_accuracy(votes: np.ndarray, labels: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each r in `radii`: fraction of rows predicted correctly AND certified to radius >= r."""
    labels = np.asarray(labels)
    if len(labels) != len(votes):
        raise ValueError(f"labels: {len(labels)} labels for {len(votes)} vote rows")
    radius = certified_radius(votes)
    correct = plurality(votes) == labels
    return np.array([float(np.mean(correct & (radius >= r))) if len(labels) else float("nan")
                     for r in np.atleast_1d(radii)])


def certified_report(classifier: EnsembleClassifier, images: np.ndarray, labels: np.ndarray,
                     radii: tuple[int, ...] = REPORT_RADII) -> dict[str, float]:
    """`certified_acc_r{r}` for each radius and the median certified radius, on test images."""
    votes = classifier.votes(images)
    accs = certified_accuracy(votes, labels, np.asarray(radii))
    out = {f"certified_acc_r{r}": float(a) for r, a in zip(radii, accs)}
    out["median_certified_radius"] = float(np.median(certified_radius(votes)))
    return out


def _largest_first(map_fn: Callable[[Callable[..., Any], Sequence[tuple]], list[Any]], calls: list[tuple],
                   sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """ctx.map over the partitions, submitted largest first (longest-processing-time order: the
    workers then finish closer together), results given back in partition order. Each job is seeded
    by its partition, so the order changes only the wall time."""
    order = sorted(range(len(calls)), key=lambda i: (-sizes[i], i))
    results = map_fn(train_one, [calls[i] for i in order])
    states: list[dict[str, torch.Tensor]] = [{}] * len(calls)
    for position, state in zip(order, results):
        states[position] = state
    return states


@register_defense
class DPA(Defense):
    """k base models on hash partitions of the training set, plurality vote (Levine & Feizi 2021, Thm. 1)."""

    name = "dpa"
    paper = "Levine & Feizi, ICLR 2021, Deep Partition Aggregation: provable defenses against general poisoning"
    summary = "training: k models on content-hash partitions, plurality vote; certified radius per test point"
    Params = DPAParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        from poison_core.protocols import victim_skeleton

        k, train = self.params.k, ctx.train
        victim = ctx.victim
        if self.params.epochs is not None:
            victim = victim.model_copy(update={"train": victim.train.model_copy(update={"epochs": self.params.epochs})})
        digests = sample_digests(train.images)
        parts = partition_of(train.images, k, self.params.partition_hash)
        calls, sizes = [], []
        for i in range(k):
            members = sorted(np.flatnonzero(parts == i).tolist(),
                             key=lambda j: (digests[j], int(train.labels[j])))
            sizes.append(len(members))
            calls.append((victim, train.subset(np.asarray(members, dtype=np.int64)),
                          derive_seed(ctx.seed, "dpa", i), str(ctx.device)))
        log.info("dpa: %d partitions of %d..%d samples", k, min(sizes), max(sizes))
        states = _largest_first(ctx.map, calls, sizes)
        models = []
        for state in states:
            model = victim_skeleton(victim, train.image_shape, train.num_classes)
            model.load_state_dict(state)
            models.append(model.to(ctx.device).eval())
        info = {"k": float(k), "partition_min_size": float(min(sizes)), "partition_max_size": float(max(sizes)),
                "constant_partitions": float(sum(s < MIN_PARTITION_SIZE for s in sizes))}
        history = [{"partition": i, "size": s} for i, s in enumerate(sizes)]
        return DefenseResult(EnsembleClassifier(models, ctx.device), history=history, info=info)
