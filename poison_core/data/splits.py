"""Deterministic, stratified splitting and subsampling of an ImageDataset.

Every function draws from ``np.random.default_rng(seed)`` only, so the same seed gives the same
samples on every machine. Stratified draws give each class a share proportional to its count,
rounded by the largest-remainder method (ties go to the lower class index), so the total is
exact. Results keep the samples' ids and are ordered by position in the input.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np

from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.errors import DatasetError

if TYPE_CHECKING:
    from poison_core.config import DatasetConfig

log = logging.getLogger(__name__)

Seed = int | Sequence[int]

# Stage keys mixed into the seed so that each step of `finish_splits` draws independently:
# changing n_test never changes which training samples are kept.
TEST_STAGE, VAL_STAGE, TRAIN_SUBSAMPLE_STAGE, TEST_SUBSAMPLE_STAGE = 0, 1, 2, 3


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class quotas summing to `n`, proportional to `counts` (largest remainder), each <= its count."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= n <= total:
        raise DatasetError(f"cannot allocate {n} samples over {total}; allowed: 0..{total}")
    if total == 0:
        return np.zeros_like(counts)
    exact = counts * n / total
    quotas = np.floor(exact).astype(np.int64)
    remainder = n - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -(exact - quotas)))
    quotas[order[:remainder]] += 1
    return quotas


def sample_positions(labels: np.ndarray, n: int, rng: np.random.Generator, stratify: bool) -> np.ndarray:
    """Sorted positions of `n` samples drawn without replacement, per class when `stratify`."""
    labels = np.asarray(labels, dtype=np.int64)
    if not stratify:
        return np.sort(rng.permutation(len(labels))[:n])
    classes, counts = np.unique(labels, return_counts=True)
    quotas = allocate(counts, n)
    chosen = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(members)[:quota])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def held_out_count(n: int, fraction: float, what: str) -> int:
    """round(fraction * n), clipped so that both parts of a split are non-empty."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"{what}: split fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DatasetError(f"{what}: cannot split {n} sample(s); need at least 2")
    return int(min(max(np.floor(fraction * n + 0.5), 1), n - 1))


def split_dataset(ds: ImageDataset, fraction: float, seed: Seed,
                  stratify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """(rest, held_out): hold out round(fraction * len(ds)) samples, stratified by label when asked."""
    rng = np.random.default_rng(seed)
    held = sample_positions(ds.labels, held_out_count(len(ds), fraction, f"dataset {ds.name!r}"), rng, stratify)
    keep = np.ones(len(ds), dtype=bool)
    keep[held] = False
    return ds.subset(np.flatnonzero(keep)), ds.subset(held)


def subsample(ds: ImageDataset, n: int, seed: Seed, stratify: bool = True, field: str = "n") -> ImageDataset:
    """`n` samples of `ds`, stratified by label when asked; `field` names the setting in errors."""
    if not 0 < n <= len(ds):
        raise DatasetError(f"{field}: {n} is outside 1..{len(ds)} (dataset {ds.name!r} has {len(ds)} samples)")
    if n == len(ds):
        return ds
    return ds.subset(sample_positions(ds.labels, n, np.random.default_rng(seed), stratify))


def check_splits_agree(dataset: str, train: ImageDataset, test: ImageDataset, val: ImageDataset | None) -> None:
    """DatasetError naming the split unless test (and val) have train's image shape (H, W, C) and class
    names: a model built for 8x8 train images evaluated on 9x9 test images reports chance, not an error."""
    for split, other in (("test", test), ("val", val)):
        if other is None:
            continue
        where = f"dataset {dataset!r}: {split} split {other.name!r}"
        if other.image_shape != train.image_shape:
            (h, w, c), (oh, ow, oc) = train.image_shape, other.image_shape
            part = "channels" if (h, w) == (oh, ow) else "image size"
            raise DatasetError(f"{where} has {part} {oh}x{ow}x{oc} but the train split {train.name!r} has "
                               f"{h}x{w}x{c}; all splits must share one (H, W, C)")
        if tuple(other.class_names) != tuple(train.class_names):
            extra = sorted(set(other.class_names) ^ set(train.class_names))
            detail = f"differing: {', '.join(map(repr, extra[:3]))}" if extra else "same names, different order"
            raise DatasetError(f"{where} has {other.num_classes} classes but the train split {train.name!r} has "
                               f"{train.num_classes} ({detail}); all splits must share one class list")


def finish_splits(cfg: "DatasetConfig", train: ImageDataset, test: ImageDataset,
                  val: ImageDataset | None = None) -> DatasetSplits:
    """Apply a DatasetConfig to loaded splits: subsample train/test, then hold out val from train.

    `n_train` caps the training pool; when `val_fraction` > 0 and the loader gave no val split,
    round(val_fraction * pool) of that pool (stratified) becomes val and the rest stays train.
    The splits must agree on image shape (H, W, C) and class names first (:func:`check_splits_agree`).
    """
    check_splits_agree(cfg.name, train, test, val)
    if cfg.n_train is not None:
        train = subsample(train, cfg.n_train, (cfg.seed, TRAIN_SUBSAMPLE_STAGE), field="dataset.n_train")
    if cfg.n_test is not None:
        test = subsample(test, cfg.n_test, (cfg.seed, TEST_SUBSAMPLE_STAGE), field="dataset.n_test")
    if val is None and cfg.val_fraction > 0:
        base = train.name.rsplit("/", 1)[0]
        train, val = split_dataset(train, cfg.val_fraction, (cfg.seed, VAL_STAGE))
        val = val.replace(name=f"{base}/val")
    log.info("dataset %s: %d train, %d test, %d val", cfg.name, len(train), len(test), len(val) if val else 0)
    return DatasetSplits(train=train, test=test, val=val)
