"""fsspec byte I/O with atomic writes, shared by dataset and PoisonSet Parquet files.

A local write goes to a temporary name in the same folder and is renamed into place; a write to
an object store is a single PUT. Either way a reader never sees a half-written file.

A writer that is killed between the two steps (SIGKILL, a power cut) leaves its temporary file. The
name says who wrote it, ``.<name>.tmp-<host hash>-<pid>-<random>``, so :func:`sweep_orphans` can remove
those whose writer on this host is gone, and never one that a live process is still writing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Collection
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


TMP_MARK = ".tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def is_tmp(name: str) -> bool:
    """Whether a file name is an in-flight (or orphaned) atomic write."""
    return name.startswith(".") and TMP_MARK in name


def tmp_name(path: str) -> str:
    """The temporary path an atomic write of `path` goes through (see the module docstring)."""
    parent = os.path.dirname(path) or "."
    return os.path.join(parent, f".{os.path.basename(path)}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")


def _writer(name: str) -> int | None:
    """The PID that wrote temporary file `name` on this host; None when it is not ours to judge."""
    host, _, rest = name.rpartition(TMP_MARK)[2].partition("-")
    pid = rest.partition("-")[0]
    return int(pid) if host == _HOST and pid.isdigit() else None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def sweep_orphans(root: str, writers_gone: Collection[int] = ()) -> list[str]:
    """Remove, under local folder `root`, the temporary files whose writer on this host has exited
    (or is in `writers_gone`: processes just killed, or the caller about to exit); returns their paths."""
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            pid = _writer(name) if is_tmp(name) else None
            if pid is not None and (pid in writers_gone or _gone(pid)):
                path = os.path.join(folder, name)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed


def atomic_write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = tmp_name(path)
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
