"""Plain arrays: poisoned images plus the indices of their clean bases (and labels), as APBench
(Qin et al., 'APBench: A Unified Benchmark for Availability Poisoning Attacks and Defenses', 2023)
and many papers' code ship them.

Either one ``.npz`` archive, or a folder of ``.npy`` files, with

* images: ``images`` (also ``x``, ``poisons``, ``data``), (P, H, W[, C]) uint8 or whole-valued floats;
* indices: ``indices`` (also ``ids``, ``base_indices``, ``idx``), (P,) integers, the dataset's original order;
* labels (optional): ``labels`` (also ``y``, ``targets``), (P,) poison labels; absent: the clean labels;
* an optional targeted goal: ``target_ids`` and ``adversarial_classes`` (test ids and classes).

Read with ``allow_pickle=False`` after each header's claimed size is held to the budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop.common import Imported, as_uint8_images, check_count, sources, targeted, write_folder
from poison_core.interop.npy import load_npy, load_npz
from poison_core.poisons import PoisonSet

NAMES = {"images": ("images", "x", "poisons", "data"), "indices": ("indices", "ids", "base_indices", "idx"),
         "labels": ("labels", "y", "targets"), "target_ids": ("target_ids",),
         "adversarial_classes": ("adversarial_classes",)}
ARCHIVE = "poisons.npz"


def _resolve(root: Path) -> Path:
    """A folder holding poisons.npz (what `write` makes) means that archive."""
    root = Path(root)
    return root / ARCHIVE if root.is_dir() and (root / ARCHIVE).is_file() else root


def files(root: Path) -> list[Path]:
    root = _resolve(root)
    if root.is_dir():
        return sorted(p for p in root.iterdir() if p.suffix == ".npy" and p.is_file())
    return [root]


def _find(arrays: dict[str, np.ndarray], role: str) -> np.ndarray | None:
    for name in NAMES[role]:
        if name in arrays:
            return arrays[name]
    return None


def _pick(arrays: dict[str, np.ndarray], role: str, what: str) -> np.ndarray:
    found = _find(arrays, role)
    if found is None:
        raise DatasetError(f"{what}: no {role} array (named one of {', '.join(NAMES[role])}); has "
                           f"{', '.join(sorted(arrays)) or 'none'}")
    return found


def _ints(array: np.ndarray, n: int, what: str) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) != n:
        raise DatasetError(f"{what} must be {n} integers, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def read(root: Path, train: ImageDataset, test: ImageDataset, max_poisons: int) -> Imported:
    root = _resolve(root)
    what = str(root)
    limit = max_poisons * int(np.prod(train.image_shape)) * 8 + 4096  # float64 images at most
    if root.is_dir():
        arrays = {p.stem: load_npy(p, str(p), limit) for p in files(root)}
    elif root.suffix == ".npz" and root.is_file():
        arrays = load_npz(root, what, limit)
    else:
        raise DatasetError(f"arrays poisons: {what} is neither an .npz file nor a folder of .npy files")
    indices = _pick(arrays, "indices", what)
    if indices.ndim != 1:
        raise DatasetError(f"{what}: indices must be 1-d, got shape {indices.shape}")
    check_count(len(indices), max_poisons, what)
    ids = _ints(indices, len(indices), f"{what}: indices")
    images = as_uint8_images(_pick(arrays, "images", what), f"{what}: images")
    if len(images) != len(ids):
        raise DatasetError(f"{what}: {len(images)} images for {len(ids)} indices")
    labels = _find(arrays, "labels")
    if labels is None:
        present = np.isin(ids, train.ids)
        labels = train.labels[train.positions(ids)] if present.all() else np.zeros(len(ids), np.int64)
    labels = _ints(np.asarray(labels), len(ids), f"{what}: labels")
    goal = {"kind": "availability"}
    target_ids = _find(arrays, "target_ids")
    if target_ids is not None:
        adversarial = _pick(arrays, "adversarial_classes", what)
        t = _ints(target_ids, len(target_ids), f"{what}: target_ids")
        goal = targeted(t.tolist(), _ints(adversarial, len(t), f"{what}: adversarial_classes").tolist(), test)
    return Imported(ids=ids, images=images, poison_labels=labels, targets=goal, sources=sources(root, files(root)))


def write(out: Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset) -> list[Path]:
    """A folder `out` holding ``poisons.npz`` (images, indices, labels; target_ids and
    adversarial_classes for a targeted goal), rows in ascending id order."""
    order = np.argsort(poison_set.ids, kind="stable")
    arrays = {"images": poison_set.images[order], "indices": poison_set.ids[order],
              "labels": poison_set.poison_labels[order]}
    goal = poison_set.targets or {}
    if goal.get("kind") == "targeted":
        arrays["target_ids"] = np.asarray(goal["target_ids"], dtype=np.int64)
        arrays["adversarial_classes"] = np.asarray(goal["adversarial_classes"], dtype=np.int64)
    return write_folder(out, lambda folder: np.savez(folder / ARCHIVE, **arrays))  # type: ignore[arg-type]
