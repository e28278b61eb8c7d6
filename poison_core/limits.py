"""Bounds on sizes read from files, checked before memory is allocated for them.

A file names its own sizes (a Parquet page's uncompressed length, an IDX header's dimensions, an
image's width and height, a gzip stream's output); a hostile or broken file can claim far more than
it holds. Every reader checks the claim against these bounds first and raises one DatasetError line.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib

from poison_core.errors import DatasetError

MAX_DECODED_BYTES = 8 * 2**30
"""Largest decompressed / decoded payload of one file (8 GiB: CIFAR-10's training set is 150 MiB)."""
MAX_IMAGE_SIDE = 8192
"""Largest image height or width, in pixels."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image area, in pixels (decoded before any resize)."""


def check_bytes(claimed: int, what: str, limit: int | None = None) -> None:
    """DatasetError unless `claimed` (bytes a file says it decodes to) is within `limit` (MAX_DECODED_BYTES)."""
    limit = MAX_DECODED_BYTES if limit is None else limit
    if claimed > limit:
        raise DatasetError(f"{what} claims {claimed} decoded bytes, more than the limit of {limit} "
                           f"({limit / 2**30:.0f} GiB)")


def check_image_shape(shape: tuple[int, ...] | list[int], what: str) -> None:
    """DatasetError unless `shape` is (H, W, C) with sides <= MAX_IMAGE_SIDE and C in {1, 3}."""
    if len(shape) != 3 or shape[2] not in (1, 3) or not all(0 < s <= MAX_IMAGE_SIDE for s in shape[:2]):
        raise DatasetError(f"{what}: image shape {list(shape)} is outside H, W in 1..{MAX_IMAGE_SIDE} and C in {{1, 3}}")


def product(dims: tuple[int, ...] | list[int]) -> int:
    """Exact product of dimensions (Python integers: no int64 wrap-around on hostile headers)."""
    return math.prod(int(d) for d in dims)


def gunzip(data: bytes, what: str, limit: int | None = None) -> bytes:
    """Decompress a gzip stream, stopping with DatasetError once it passes `limit` bytes (a gzip bomb)."""
    limit = MAX_DECODED_BYTES if limit is None else limit
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        try:
            out = stream.read(limit + 1)
        except (EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{what} is a truncated or corrupt gzip stream: {exc}") from None
    if len(out) > limit:
        raise DatasetError(f"{what} decompresses to more than the limit of {limit} bytes")
    return out
