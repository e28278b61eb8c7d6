"""The formats by name: how to read them (files -> Imported), write them (PoisonSet -> folder) and
which files an import reads (for its content fingerprint and provenance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop import FORMATS, arrays, benchmark, forest
from poison_core.interop.common import Imported, fingerprint
from poison_core.poisons import PoisonSet


@dataclass(frozen=True)
class Format:
    read: Callable[[Path, ImageDataset, ImageDataset, int], Imported]
    write: Callable[[Path, PoisonSet, ImageDataset, ImageDataset], list[Path]]
    files: Callable[[Path], list[Path]]


REGISTRY = {
    "benchmark": Format(benchmark.read, benchmark.write, benchmark.files),
    "forest-numpy": Format(forest.read_numpy, forest.write_numpy, forest.numpy_files),
    "forest-full": Format(forest.read_full, forest.write_full, forest.full_files),
    "arrays": Format(arrays.read, arrays.write, arrays.files),
}
assert tuple(REGISTRY) == FORMATS


def get(name: str) -> Format:
    if name not in REGISTRY:
        raise DatasetError(f"format {name!r} is unknown; known: {', '.join(FORMATS)}")
    return REGISTRY[name]


def input_fingerprint(name: str, path: str | Path) -> str:
    """sha256 over the sorted relative paths and bytes of the files an import of `path` reads."""
    root = Path(path).expanduser()
    present = [p for p in get(name).files(root) if p.is_file()]
    if not present:
        raise DatasetError(f"{name} poisons: nothing to read at {str(root)!r}")
    return fingerprint(root, present)


def read(name: str, path: str | Path, train: ImageDataset, test: ImageDataset, max_poisons: int) -> Imported:
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{name} poisons: {str(root)!r} does not exist")
    return get(name).read(root, train, test, max_poisons)


def write(name: str, out: str | Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset) -> list[Path]:
    return get(name).write(Path(out).expanduser(), poison_set, train, test)


def same_poisons(a: PoisonSet, b: PoisonSet) -> bool:
    """Equal ids, pixels and labels, row for row after sorting by id."""
    oa, ob = np.argsort(a.ids), np.argsort(b.ids)
    return (np.array_equal(a.ids[oa], b.ids[ob]) and np.array_equal(a.images[oa], b.images[ob])
            and np.array_equal(a.orig_labels[oa], b.orig_labels[ob])
            and np.array_equal(a.poison_labels[oa], b.poison_labels[ob]))
