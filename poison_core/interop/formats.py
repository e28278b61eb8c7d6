"""The formats by name: how to read them (files -> Imported), write them (PoisonSet -> folder) and
which files an import reads (for its content fingerprint and provenance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop import FORMATS, arrays, benchmark, forest, forest_packed
from poison_core.interop.common import Imported, fingerprint
from poison_core.poisons import PoisonSet


@dataclass(frozen=True)
class Format:
    read: Callable[..., Imported]
    """(root, train, test, max_poisons, **options) -> Imported"""
    write: Callable[..., list[Path]]
    """(out, poison_set, train, test, **options) -> the files written"""
    files: Callable[[Path], list[Path]]
    options: tuple[str, ...] = ()
    """The keyword options read and write take (forest-packed: its normalisation)."""


REGISTRY = {
    "benchmark": Format(benchmark.read, benchmark.write, benchmark.files),
    "forest-numpy": Format(forest.read_numpy, forest.write_numpy, forest.numpy_files),
    "forest-full": Format(forest.read_full, forest.write_full, forest.full_files),
    "forest-packed": Format(forest_packed.read, forest_packed.write, forest_packed.files, ("normalization",)),
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


def _options(name: str, fmt: Format, options: dict[str, Any]) -> dict[str, Any]:
    """The options `fmt` takes; a set option it does not take is refused (it would be ignored)."""
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(fmt.options))
    if extra:
        raise DatasetError(f"format {name!r} takes no option {extra[0]!r} (it takes: {', '.join(fmt.options) or 'none'})")
    return given


def read(name: str, path: str | Path, train: ImageDataset, test: ImageDataset, max_poisons: int,
         **options: Any) -> Imported:
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{name} poisons: {str(root)!r} does not exist")
    fmt = get(name)
    return fmt.read(root, train, test, max_poisons, **_options(name, fmt, options))


def write(name: str, out: str | Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset,
          **options: Any) -> list[Path]:
    fmt = get(name)
    return fmt.write(Path(out).expanduser(), poison_set, train, test, **_options(name, fmt, options))


def same_poisons(a: PoisonSet, b: PoisonSet) -> bool:
    """Equal ids, pixels and labels, row for row after sorting by id."""
    oa, ob = np.argsort(a.ids), np.argsort(b.ids)
    return (np.array_equal(a.ids[oa], b.ids[ob]) and np.array_equal(a.images[oa], b.images[ob])
            and np.array_equal(a.orig_labels[oa], b.orig_labels[ob])
            and np.array_equal(a.poison_labels[oa], b.poison_labels[ob]))
