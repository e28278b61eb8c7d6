"""What every format reader returns, and the checks of it against the clean data it claims.

A reader turns files into :class:`Imported`: dataset ids (the indices the files name), poisoned
uint8 images, poison labels, the goal (``targets``) and the sha256 of each file it read.
:func:`match` then resolves the ids in the config's training split, refuses poisons that are not a
perturbation of the base they name, and returns positions for the Attack template to pack and audit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError

MAX_FILES = 1_000_000
"""Most files one import may read (an image-folder tree of a large training set)."""


@dataclass(frozen=True)
class Imported:
    """Poisons read from another tool's files, before they are matched to the clean data."""

    ids: np.ndarray
    images: np.ndarray
    poison_labels: np.ndarray
    targets: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    """sha256 of each file read, by its path relative to the import's root."""
    trigger: dict[str, Any] | None = None
    """A backdoor's trigger spec (poison_core.triggers), when the files carry one."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sources(root: Path, files: list[Path]) -> dict[str, str]:
    """{relative path: sha256} of `files` under `root` (root itself when it is a file)."""
    return {(p.name if p == root else p.relative_to(root).as_posix()): sha256_file(p) for p in sorted(files)}


def fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 over the sorted relative paths and bytes of `files`: equal content, equal fingerprint."""
    h = hashlib.sha256()
    for rel, digest in sorted(sources(root, files).items()):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def check_count(count: int, limit: int, what: str) -> None:
    """Refuse more poisons than the threat model's budget allows, before they are converted."""
    if count > limit:
        raise DatasetError(f"{what} holds {count} poisons; the threat model's budget allows at most {limit}")
    if count < 1:
        raise DatasetError(f"{what} holds no poisons")


def as_uint8_images(array: np.ndarray, what: str) -> np.ndarray:
    """(P, H, W, C) uint8 from uint8 or integral float arrays of (P, H, W[, C]); anything else refused."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DatasetError(f"{what}: images must be (P, H, W[, C]) with C in {{1, 3}}, got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind not in "fiu":
        raise DatasetError(f"{what}: images must be numeric, got dtype {array.dtype}")
    if len(array) and (np.nanmin(array) < 0 or np.nanmax(array) > 255 or not np.all(np.rint(array) == array)):
        raise DatasetError(f"{what}: {array.dtype} images must hold whole grey levels 0..255 "
                           "(the uint8 grid the poisons are trained on)")
    return array.astype(np.uint8)


def find_test_id(image: np.ndarray, label: int | None, test: ImageDataset, what: str) -> int:
    """The id of the test image equal to `image` pixel for pixel (and of class `label` when given)."""
    if image.shape != test.image_shape:
        raise DatasetError(f"{what}: target image shape {image.shape} != test images' {test.image_shape}")
    hits = np.flatnonzero(np.all(test.images == image[None], axis=(1, 2, 3)))
    if label is not None:
        hits = hits[test.labels[hits] == label]
    if len(hits) == 0:
        raise DatasetError(f"{what}: the target image (class {label}) matches no image of the config's test split")
    return int(test.ids[hits[0]])


def targeted(target_ids: list[int], adversarial: list[int], test: ImageDataset) -> dict[str, Any]:
    """The goal in poison_core.evaluation's 'targeted' form (base class = adversarial class)."""
    true = [int(c) for c in test.labels[test.positions(np.asarray(target_ids, dtype=np.int64))]]
    return {"kind": "targeted", "target_ids": [int(t) for t in target_ids],
            "adversarial_classes": [int(a) for a in adversarial], "base_classes": [int(a) for a in adversarial],
            "true_classes": true}


MISMATCH_SHARE = 0.05
"""Share of a poison's values that may lie far from its base before it counts as another image."""


def mismatch_level(epsilon: int) -> int:
    """How far from the base a value must be to count as far: well outside any rounding of epsilon."""
    return min(2 * epsilon + 32, 254)


def match(imported: Imported, train: ImageDataset, epsilon: int, what: str) -> np.ndarray:
    """Positions in `train` of the imported ids, after checking that each poison is a perturbation of
    the base it names: a poison with more than MISMATCH_SHARE of its values further than
    mismatch_level(epsilon) from the clean base is another image (wrong index order, wrong dataset);
    mismatches are refused with their count and the first index. A poison only slightly out of the
    epsilon ball is not a mismatch: epsilon itself is the PoisonSet audit's to check."""
    ids = np.asarray(imported.ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DatasetError(f"{what}: base indices are not unique")
    present = np.isin(ids, train.ids)
    if not present.all():
        first = int(ids[~present][0])
        raise DatasetError(f"{what}: {int((~present).sum())} base indices are not in the config's training split "
                           f"({len(train)} samples), first {first}; indices are the dataset's original order")
    pos = train.positions(ids)
    if imported.images.shape[1:] != train.image_shape:
        raise DatasetError(f"{what}: poison images are {imported.images.shape[1:]}, the training images "
                           f"{train.image_shape}")
    diff = np.abs(imported.images.astype(np.int16) - train.images[pos].astype(np.int16))
    far = (diff > mismatch_level(epsilon)).reshape(len(ids), -1).mean(axis=1) > MISMATCH_SHARE
    if far.any():
        first = int(np.flatnonzero(far)[0])
        raise DatasetError(f"{what}: {int(far.sum())} of {len(ids)} poisons do not match their bases in the clean "
                           f"training set, first base index {int(ids[first])} (poison {first}); are the indices "
                           "in the dataset's original order and is this the config's dataset?")
    return pos


def write_folder(out: Path, write: Any) -> list[Path]:
    """Call `write(tmp)` on a fresh sibling folder of `out`, then rename it to `out`: a reader never
    sees a half-exported folder. `out` must not exist (or be an empty folder)."""
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"export: {str(out)!r} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out.rglob("*") if p.is_file())
