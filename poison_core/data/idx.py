"""Reader and writer for the IDX format of MNIST / Fashion-MNIST (LeCun et al., 1998).

An IDX file is a 4-byte magic number ``0x0000 TT NN`` (TT: element type, 0x08 = unsigned byte;
NN: number of dimensions), then NN big-endian uint32 sizes, then the payload in C order. Files
may be gzip-compressed; compression is detected from the gzip magic bytes, not the file name.
Only unsigned-byte files are supported, which covers every MNIST-family file.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np

from poison_core.errors import DatasetError
from poison_core.limits import gunzip, product
from poison_core.paths import read_regular

log = logging.getLogger(__name__)

UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"


def _raw_bytes(path: Path) -> bytes:
    """The decompressed bytes of `path`; a missing or broken file raises DatasetError."""
    data = read_regular(path, "IDX file")
    if not data.startswith(_GZIP_MAGIC):
        return data
    return gunzip(data, f"IDX file {str(path)!r}", size_of=_declared_size)


def _declared_size(prefix: bytes) -> int | None:
    """The total size (header + payload) an IDX header declares, once `prefix` holds the header; a
    malformed header declares nothing here (its parse reports it)."""
    if len(prefix) < 4:
        return None
    ndim = prefix[3]
    header = 4 + 4 * ndim
    if len(prefix) < header:
        return None
    return header + product(struct.unpack(f">{ndim}I", prefix[4:header]))


def _parse(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking magic, dims and payload length."""
    name = str(path)
    if len(data) < 4:
        raise DatasetError(f"IDX file {name!r} is truncated: {len(data)} bytes, need at least a 4-byte header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or ndim == 0:
        raise DatasetError(f"IDX file {name!r} has a bad magic number 0x{data[:4].hex()} (expected 0x000008NN)")
    if dtype_code != UBYTE:
        raise DatasetError(f"IDX file {name!r} has element type 0x{dtype_code:02x}; only 0x08 (unsigned byte) "
                           "is supported")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"IDX file {name!r} is truncated inside its header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = product(dims)
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "longer than its header says"
        raise DatasetError(f"IDX file {name!r} is {problem}: payload has {payload} bytes, "
                           f"dims {list(dims)} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) as a uint8 array; `magic` pins the expected magic number."""
    path = Path(path)
    data = _raw_bytes(path)
    if magic is not None and data[:4] != struct.pack(">I", magic):
        raise DatasetError(f"IDX file {str(path)!r} has magic number 0x{data[:4].hex()}, expected 0x{magic:08x}")
    array = _parse(data, path)
    log.debug("read IDX %s: shape %s", path, array.shape)
    return array


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an IDX image file (magic 0x00000803) as uint8 (N, H, W)."""
    return read_idx(path, IMAGES_MAGIC)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read an IDX label file (magic 0x00000801) as uint8 (N,)."""
    return read_idx(path, LABELS_MAGIC)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file; gzip-compressed (deterministically) when `path` ends in .gz."""
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8 or not 1 <= arr.ndim <= 255:
        raise DatasetError(f"write_idx {str(path)!r}: array must be uint8 with 1..255 dims, "
                           f"got {arr.dtype} with {arr.ndim} dims")
    data = struct.pack(">HBB", 0, UBYTE, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
