"""fsspec byte I/O with atomic writes, shared by dataset and PoisonSet Parquet files.

A local write goes to a temporary name in the same folder and is renamed into place; a write to
an object store is a single PUT. Either way a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from poison_core.errors import DatasetError
from poison_core.limits import check_bytes
from poison_core.paths import read_regular


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for any fsspec URI; a plain path is the local filesystem."""
    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


def atomic_write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):  # a FIFO, a folder or a device is refused before it is opened
        return read_regular(path, "file")
    if not fs.exists(path):
        raise DatasetError(f"file {uri!r} does not exist")
    if fs.isdir(path):
        raise DatasetError(f"file {uri!r} is a directory, not a regular file")
    return fs.cat_file(path)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def table_to_bytes(table: pa.Table) -> bytes:
    """Parquet bytes, deterministic for equal tables (no timestamps, fixed writer options)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=3, write_statistics=False,
                   use_dictionary=False)
    return sink.getvalue().to_pybytes()


def bytes_to_table(data: bytes, what: str) -> pa.Table:
    """The table in Parquet `data`; its footer's uncompressed size is bounded before any page is read."""
    try:
        meta = pq.ParquetFile(pa.BufferReader(data)).metadata
        claimed = sum(max(meta.row_group(i).total_byte_size, 0) for i in range(meta.num_row_groups))
        check_bytes(claimed, what)
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{what} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None


def images_to_column(images: np.ndarray) -> pa.FixedSizeListArray:
    """(N, H, W, C) uint8 -> fixed_size_list<uint8>[H*W*C]."""
    width = int(np.prod(images.shape[1:]))
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), width)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.uint8()), width)


def column_to_images(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Inverse of images_to_column; checks the row width against `shape`."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != int(np.prod(shape)):
        raise DatasetError(f"{what}: image column {arr.type} does not match shape {tuple(shape)}")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
    return values.reshape((len(arr), *shape))
