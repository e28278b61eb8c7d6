"""``.npy`` / ``.npz`` arrays read with ``allow_pickle=False`` after their header is checked.

A ``.npy`` header names its dtype and shape; the payload it claims (shape x itemsize) is held to a
limit before anything is allocated, and object dtypes are refused (they would need pickle).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from poison_core.errors import DatasetError
from poison_core.limits import product


def _check_header(handle: IO[bytes], what: str, limit: int) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(handle)
    except (ValueError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{what} is not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise DatasetError(f"{what} holds Python objects (dtype {dtype}); only numeric arrays are read")
    claimed = product(shape) * dtype.itemsize
    if claimed > limit:
        raise DatasetError(f"{what} claims {claimed} bytes ({dtype} {shape}), more than the {limit} this import "
                           "can need")
    return tuple(shape), dtype


def load_npy(path: Path, what: str, limit: int, mmap: bool = False) -> np.ndarray:
    """The array in `path` (memory-mapped when `mmap`), its header checked first."""
    try:
        with path.open("rb") as handle:
            _check_header(handle, what, limit)
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except OSError as exc:
        raise DatasetError(f"{what} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DatasetError(f"{what} is truncated or corrupt: {exc}") from None


def load_npz(path: Path, what: str, limit: int) -> dict[str, np.ndarray]:
    """{name: array} of an .npz archive; each member's header checked before it is read."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                if info.file_size > limit + 4096:
                    raise DatasetError(f"{what}: member {name!r} is {info.file_size} bytes, more than the limit {limit}")
                with archive.open(info) as handle:
                    _check_header(handle, f"{what}: member {name!r}", limit)
                with archive.open(info) as handle:
                    out[name] = np.lib.format.read_array(handle, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"{what} is not a readable .npz archive: {exc}") from None
    return out
