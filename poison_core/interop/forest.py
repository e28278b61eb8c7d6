"""Geiping et al.'s forest exports ('Witches' Brew: Industrial Scale Data Poisoning via Gradient
Matching', ICLR 2021; github.com/JonasGeiping/data-poisoning, ``forest/data/kettle_base.py``
``_Kettle.export_poison``).

* mode ``numpy``: ``poisoned_training_data.npy``, the whole training set after poisoning as a float64
  (N, H, W, 3) array of whole grey levels (each image through forest's torch-to-PIL rounding), and
  ``poisoned_training_labels.npy``, float64 (N,). Row r is the sample with forest's index r; here the
  training sample with the r-th smallest id (the original index r for a whole official training set).
  The rows that differ from the clean training set are the poisons. The mode carries no target, so the
  goal reads as availability. Written with C = 1 for grayscale datasets (forest itself writes 3).
* mode ``full``: an ImageFolder tree, ``train/<class name>/<idx>.png`` for every training image
  (poisoned ones poisoned), ``test/<class name>/<idx>.png`` and ``targets/<intended class>/<idx>.png``
  (idx: the target's test index; the folder: its adversarial class). Mode ``limited`` writes only the
  poisoned training images and the targets, and reads the same way: the images that differ from the
  clean ones (pixels or class folder) are the poisons. Grayscale images are written as 'L' PNGs.
* mode ``packed`` (``torch.save([poison_delta, poison_ids])``): :mod:`poison_core.interop.forest_packed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop.common import (MAX_FILES, Imported, as_uint8_images, check_count, sources, targeted,
                                        write_folder)
from poison_core.interop.npy import load_npy
from poison_core.poisons import PoisonSet

DATA, LABELS = "poisoned_training_data.npy", "poisoned_training_labels.npy"
CHUNK = 4096


def _sorted(train: ImageDataset) -> np.ndarray:
    """Positions of `train` in ascending id order: forest's row order."""
    return np.argsort(train.ids, kind="stable")


def numpy_files(root: Path) -> list[Path]:
    return [Path(root) / DATA, Path(root) / LABELS]


def _collect(rows: list[int], max_poisons: int, what: str) -> None:
    if len(rows) > max_poisons:
        raise DatasetError(f"{what} differs from the clean training set in more than {max_poisons} rows, "
                           "the most the threat model's budget allows")


def read_numpy(root: Path, train: ImageDataset, test: ImageDataset, max_poisons: int) -> Imported:
    root = Path(root)
    data_path, labels_path = numpy_files(root)
    n, shape = len(train), train.image_shape
    data = load_npy(data_path, str(data_path), n * int(np.prod(shape[:2])) * 3 * 8, mmap=True)
    labels = load_npy(labels_path, str(labels_path), n * 8)
    if data.ndim == 3:
        data = data[..., None]
    if data.shape[0] != n or data.shape[1:3] != shape[:2] or data.shape[3] not in (1, 3):
        raise DatasetError(f"{data_path}: shape {data.shape} is not the config's training set ({n}, "
                           f"{shape[0]}, {shape[1]}, C)")
    if labels.shape != (n,) or labels.dtype.kind not in "fiu" or not np.all(np.rint(labels) == labels):
        raise DatasetError(f"{labels_path}: expected {n} whole-number labels, got {labels.dtype} {labels.shape}")
    order = _sorted(train)
    rows: list[int] = []
    images: list[np.ndarray] = []
    for start in range(0, n, CHUNK):
        chunk = as_uint8_images(np.asarray(data[start:start + CHUNK]), str(data_path))
        if chunk.shape[-1] != shape[-1]:
            if shape[-1] == 1 and np.all(chunk == chunk[..., :1]):
                chunk = chunk[..., :1]  # forest writes grayscale as three equal channels
            else:
                raise DatasetError(f"{data_path}: {chunk.shape[-1]} channels, the training set has {shape[-1]}")
        pos = order[start:start + CHUNK]
        differs = np.any(chunk != train.images[pos], axis=(1, 2, 3)) | (labels[start:start + CHUNK] != train.labels[pos])
        rows.extend((start + np.flatnonzero(differs)).tolist())
        images.extend(chunk[differs])
        _collect(rows, max_poisons, str(data_path))
    check_count(len(rows), max_poisons, str(data_path))
    ids = train.ids[order[rows]]
    return Imported(ids=ids, images=np.stack(images), poison_labels=labels[rows].astype(np.int64),
                    targets={"kind": "availability"}, sources=sources(root, numpy_files(root)))


def write_numpy(out: Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset) -> list[Path]:
    from poison_core.poisons import apply

    poisoned = apply(poison_set, train)
    order = _sorted(train)

    def _write(folder: Path) -> None:
        np.save(folder / DATA, poisoned.images[order].astype(np.float64))
        np.save(folder / LABELS, poisoned.labels[order].astype(np.float64))

    return write_folder(out, _write)


def full_files(root: Path) -> list[Path]:
    found = []
    for part in ("train", "targets"):
        base = Path(root) / part
        if base.is_dir():
            for path in base.rglob("*.png"):
                found.append(path)
                if len(found) > MAX_FILES:
                    raise DatasetError(f"forest export {str(root)!r} holds more than {MAX_FILES} images")
    return sorted(found)


def _tree(base: Path, classes: tuple[str, ...], limit: int, what: str) -> list[tuple[int, int, Path]]:
    """(idx, class, path) of every <class>/<idx>.png under `base`, at most `limit`."""
    entries = []
    for label, name in enumerate(classes):
        folder = base / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.png")):
            if not path.stem.isdigit():
                raise DatasetError(f"{what}: {str(path)!r} is not named <index>.png")
            entries.append((int(path.stem), label, path))
            if len(entries) > limit:
                raise DatasetError(f"{what}: more than {limit} images under {str(base)!r}")
    return entries


def read_full(root: Path, train: ImageDataset, test: ImageDataset, max_poisons: int) -> Imported:
    from poison_core.data.imagefolder import read_image

    root = Path(root)
    what = f"forest export {str(root)!r}"
    if not (root / "train").is_dir():
        raise DatasetError(f"{what} has no train/ folder (forest's export modes 'full' and 'limited' write one)")
    entries = _tree(root / "train", train.class_names, len(train), what)
    ids, images, labels = [], [], []
    known = set(train.ids.tolist())
    for idx, label, path in entries:
        if idx not in known:
            raise DatasetError(f"{what}: {str(path)!r} names index {idx}, not in the config's training split "
                               f"({len(train)} samples); indices are the dataset's original order")
        image = read_image(path)
        pos = int(train.positions(np.asarray([idx]))[0])
        if image.shape != train.image_shape:
            raise DatasetError(f"{what}: {str(path)!r} is {image.shape}, the training images {train.image_shape}")
        if label != train.labels[pos] or not np.array_equal(image, train.images[pos]):
            ids.append(idx)
            images.append(image)
            labels.append(label)
            _collect(ids, max_poisons, what)
    check_count(len(ids), max_poisons, what)
    goal: dict[str, Any] = {"kind": "availability"}
    targets = _tree(root / "targets", train.class_names, len(test), what) if (root / "targets").is_dir() else []
    if targets:
        known_test = set(test.ids.tolist())
        for idx, _label, path in targets:
            if idx not in known_test:
                raise DatasetError(f"{what}: target {str(path)!r} names test index {idx}, not in the config's test split")
            if not np.array_equal(read_image(path), test.images[test.positions(np.asarray([idx]))[0]]):
                raise DatasetError(f"{what}: target {str(path)!r} differs from test image {idx} of the config's dataset")
        goal = targeted([t[0] for t in targets], [t[1] for t in targets], test)
    return Imported(ids=np.asarray(ids, dtype=np.int64), images=as_uint8_images(np.stack(images), what),
                    poison_labels=np.asarray(labels, dtype=np.int64), targets=goal,
                    sources=sources(root, full_files(root)))


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")
    pil.save(path, format="PNG")


def write_full(out: Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset) -> list[Path]:
    """forest's 'full' tree: every training image (poisoned where poisoned), the test images and the
    targets under their adversarial class."""
    from poison_core.poisons import apply

    poisoned = apply(poison_set, train)
    goal = poison_set.targets or {}

    def _write(folder: Path) -> None:
        names = train.class_names
        for split, data in (("train", poisoned), ("test", test)):
            for name in names:
                (folder / split / name).mkdir(parents=True, exist_ok=True)
            for image, label, idx in zip(data.images, data.labels, data.ids):
                _save_png(image, folder / split / names[int(label)] / f"{int(idx)}.png")
        if goal.get("kind") == "targeted":
            pos = test.positions(np.asarray(goal["target_ids"], dtype=np.int64))
            for p, cls in zip(pos, goal["adversarial_classes"]):
                _save_png(test.images[p], folder / "targets" / names[int(cls)] / f"{int(test.ids[p])}.png")

    return write_folder(out, _write)
