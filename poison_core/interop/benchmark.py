"""The 'Just How Toxic' benchmark's poison files (Schwarzschild, Goldblum, Gupta, Dickerson &
Goldstein, 'Just How Toxic is Data Poisoning? A Unified Benchmark for Backdoor and Data Poisoning
Attacks', ICML 2021; github.com/aks2203/poisoning-benchmark, how_to.md and poison_test.py).

A trial's folder holds three pickles, each written with ``pickle.HIGHEST_PROTOCOL``:

* ``poisons.pickle``: a list of (PIL image, label) tuples, one per poison;
* ``base_indices.pickle``: the indices of the poisons' clean bases in the training set (a list or
  numpy array), in the order of the poisons;
* ``target.pickle``: (PIL image, label) of the target test image; the benchmark's poisoned label,
  the adversarial class, is the first poison's label. The triggered-backdoor form
  (image, label, patch, [x, y]) becomes a ``fixed_patch`` trigger (:mod:`.benchmark_trigger`) with a
  ``backdoor`` goal (target class: the poisons' label, source class: the target's, and the target's id).

They are read with the restricted unpickler (PIL images, numpy arrays and scalars, containers only),
after a size check against the budget. The target is found in the config's test split pixel for pixel.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop import benchmark_trigger
from poison_core.interop.common import (Imported, as_uint8_images, check_count, find_test_id, sources, targeted,
                                        write_folder)
from poison_core.safe_pickle import PickledImage, numpy_globals, pil_globals, read_limited, safe_loads
from poison_core.poisons import PoisonSet

FILES = ("poisons.pickle", "base_indices.pickle", "target.pickle")
_OVERHEAD = 4096


def files(root: Path) -> list[Path]:
    return [Path(root) / name for name in FILES]


def _load(path: Path, limit: int) -> Any:
    what = str(path)
    if not path.is_file():
        raise DatasetError(f"benchmark poisons: {what} does not exist (a trial folder holds {', '.join(FILES)})")
    return safe_loads(read_limited(path, what, limit), {**numpy_globals(), **pil_globals()}, what)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"):
        raise DatasetError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


def _image(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, PickledImage):
        raise DatasetError(f"{what} must be a PIL image, got {type(value).__name__}")
    return value.array


def read(root: Path, train: ImageDataset, test: ImageDataset, max_poisons: int) -> Imported:
    """The poisons of one benchmark trial folder, matched to the config's test split for the target."""
    root = Path(root)
    pixels = int(np.prod(train.image_shape))
    poisons_path, indices_path, target_path = files(root)
    tuples = _load(poisons_path, max_poisons * (pixels + 256) + _OVERHEAD)
    if not isinstance(tuples, (list, tuple)):
        raise DatasetError(f"{poisons_path}: expected a list of (PIL image, label) tuples, got {type(tuples).__name__}")
    check_count(len(tuples), max_poisons, str(poisons_path))
    images, labels = [], []
    for i, item in enumerate(tuples):
        if not isinstance(item, tuple) or len(item) != 2:
            raise DatasetError(f"{poisons_path}: entry {i} is not an (image, label) tuple")
        images.append(_image(item[0], f"{poisons_path}: entry {i}'s image"))
        labels.append(_int(item[1], f"{poisons_path}: entry {i}'s label"))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DatasetError(f"{poisons_path}: poison images differ in shape ({sorted(shapes)[:2]})")
    indices = _load(indices_path, max_poisons * 64 + _OVERHEAD)
    if isinstance(indices, np.ndarray):
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise DatasetError(f"{indices_path}: expected a 1-d integer array, got {indices.dtype} {indices.shape}")
        indices = indices.tolist()
    if not isinstance(indices, (list, tuple)):
        raise DatasetError(f"{indices_path}: expected a list of indices, got {type(indices).__name__}")
    ids = [_int(v, f"{indices_path}: entry {i}") for i, v in enumerate(indices)]
    if len(ids) != len(images):
        raise DatasetError(f"{indices_path}: {len(ids)} base indices for {len(images)} poisons")
    try:  # a float64 (C, H, W) patch at most besides the image
        target = _load(target_path, 9 * pixels + 64 * 1024 + _OVERHEAD)
    except DatasetError as exc:
        if "global 'torch." not in str(exc):
            raise
        raise DatasetError(f"{exc}: {benchmark_trigger.TORCH_REASON}") from None
    if not isinstance(target, tuple) or len(target) not in (2, 4):
        raise DatasetError(f"{target_path}: expected (PIL image, label) or, for a triggered backdoor, "
                           "(PIL image, label, patch, [startx, starty])")
    target_label = _int(target[1], f"{target_path}: label")
    target_id = find_test_id(_image(target[0], f"{target_path}: image"), target_label, test, str(target_path))
    goal, trigger = targeted([target_id], [labels[0]], test), None
    if len(target) == 4:
        patch, top, left = benchmark_trigger.patch_from_target(target[2], target[3], test.image_shape, str(target_path))
        trigger = benchmark_trigger.trigger_spec(patch, top, left, labels[0], target_label)
        goal = {"kind": "backdoor", "target_class": int(labels[0]), "source_class": target_label,
                "target_ids": [target_id]}
    return Imported(ids=np.asarray(ids, dtype=np.int64), images=as_uint8_images(np.stack(images), str(poisons_path)),
                    poison_labels=np.asarray(labels, dtype=np.int64), targets=goal, sources=sources(root, files(root)),
                    trigger=trigger)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")


def write(out: Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset) -> list[Path]:
    """The trial folder `out` the benchmark's poison_test.py reads: poisons in ascending id order; a
    patch trigger's target carries the patch ((C, p, p) float32 numpy) and [startx, starty]."""
    goal, trigger = poison_set.targets or {}, poison_set.trigger
    if trigger is not None:
        patch, location = benchmark_trigger.to_benchmark(trigger, test.image_shape)
        target_ids = [benchmark_trigger.backdoor_target(trigger, goal, test)]
    elif goal.get("kind") != "targeted" or len(goal.get("target_ids") or []) != 1:
        raise DatasetError(f"export benchmark: the benchmark's trials have one target (or a patch trigger); this "
                           f"poison set's goal is {goal.get('kind', 'none')!r} with "
                           f"{len(goal.get('target_ids') or [])} target(s)")
    else:
        target_ids = goal["target_ids"][:1]
    order = np.argsort(poison_set.ids, kind="stable")
    tuples = [(_pil(poison_set.images[i]), int(poison_set.poison_labels[i])) for i in order]
    indices = [int(poison_set.ids[i]) for i in order]
    pos = int(test.positions(np.asarray(target_ids, dtype=np.int64))[0])
    target: tuple = (_pil(test.images[pos]), int(test.labels[pos]))
    if trigger is not None:
        target = (*target, patch, location)

    def _write(folder: Path) -> None:
        for name, obj in zip(FILES, (tuples, indices, target)):
            with (folder / name).open("wb") as handle:
                pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)

    return write_folder(out, _write)
