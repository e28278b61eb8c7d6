"""Fixtures for the interop tests: a small RGB dataset and poisons written the way each tool writes them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from poison_core.config import TargetSelection, ThreatModel
from poison_core.data.dataset import ImageDataset

THREAT = ThreatModel(epsilon=8, budget=0.1, clean_label=True, targets=TargetSelection(mode="fixed", target_ids=(3,)))


def rgb_splits(n_train: int = 60, n_test: int = 20, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """A CIFAR-like RGB dataset (8x8x3, 3 classes) with ids 0..N-1 as a whole official split has."""
    rng = np.random.default_rng(seed)
    classes = ("cat", "dog", "frog")
    train = ImageDataset(rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8), np.arange(n_train) % 3,
                         classes, name="toy/train")
    test = ImageDataset(rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8), np.arange(n_test) % 3,
                        classes, name="toy/test")
    return train, test


def pil(image: np.ndarray) -> Image.Image:
    """Image.fromarray as the benchmark's TensorFlow example calls it (2-d for a grayscale image)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def benchmark_trial(folder: Path, train: ImageDataset, test: ImageDataset, *, target_index: int = 3,
                    n_poisons: int = 5, eps: int = 8, seed: int = 1, shift_indices: int = 0) -> dict:
    """A trial folder as the benchmark's how_to.md writes it: PIL images from uint8 arrays
    (Image.fromarray), base indices as a numpy array (as the setups pickles hold them), the target
    as (PIL image, label); every pickle with HIGHEST_PROTOCOL."""
    rng = np.random.default_rng(seed)
    target_label = int(test.labels[target_index])
    poisoned_label = (target_label + 1) % len(train.class_names)
    positions = np.flatnonzero(train.labels == poisoned_label)[:n_poisons]
    base_indices = train.ids[positions]  # the dataset's original indices
    bases = train.images[positions].astype(np.int16)
    poisons = np.clip(bases + rng.integers(-eps, eps + 1, bases.shape), 0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    tuples = [(pil(p), poisoned_label) for p in poisons]
    for name, obj in (("poisons.pickle", tuples), ("base_indices.pickle", base_indices + shift_indices),
                      ("target.pickle", (pil(test.images[target_index]), target_label))):
        with (folder / name).open("wb") as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return {"ids": base_indices, "images": poisons, "label": poisoned_label, "target": target_index}



def benchmark_setups(path: Path, train: ImageDataset, test: ImageDataset, n_setups: int = 3, n_bases: int = 4,
                     seed: int = 0) -> list[dict]:
    """A setups file as aks2203/poisoning-benchmark ships them (poison_setups/cifar10_*.pickle, protocol 4):
    a list of dicts, "target class" a Python int, "target index" a numpy int64 scalar, "base class" an
    int, "base indices" an int64 array; ids are the dataset's original indices. Targets distinct, bases
    of the base class, disjoint across setups."""
    rng = np.random.default_rng(seed)
    k = train.num_classes
    free = np.ones(len(train), dtype=bool)
    setups = []
    for pos in rng.permutation(len(test))[:n_setups]:
        target_class = int(test.labels[pos])
        base_class = int((target_class + rng.integers(1, k)) % k)
        pool = np.flatnonzero((train.labels == base_class) & free)
        bases = rng.choice(pool, size=n_bases, replace=False)
        free[bases] = False
        setups.append({"target class": target_class, "target index": np.int64(test.ids[pos]),
                       "base class": base_class, "base indices": train.ids[bases].astype(np.int64)})
    path.write_bytes(pickle.dumps(setups, protocol=4))
    return setups
