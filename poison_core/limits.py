"""Bounds on sizes read from files, checked before memory is allocated for them.

A file names its own sizes (a Parquet page's uncompressed length, an IDX header's dimensions, an
image's width and height, a gzip stream's output); a hostile or broken file can claim far more than
it holds. Every reader checks the claim against these bounds first and raises one DatasetError line.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

from poison_core.errors import DatasetError

MAX_DECODED_BYTES = 8 * 2**30
"""Largest decompressed / decoded payload of one file (8 GiB: CIFAR-10's training set is 150 MiB)."""
MAX_IMAGE_SIDE = 8192
"""Largest image height or width, in pixels."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image area, in pixels (decoded before any resize)."""
_STEP = 2**20
_HEADER_PREFIX = 4 + 4 * 255  # enough decoded bytes for any header size_of reads (an IDX header is at most this)


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


def gunzip(data: bytes, what: str, limit: int | None = None,
           size_of: Callable[[bytes], int | None] | None = None) -> bytes:
    """Decompress a gzip stream (every member) in 1 MiB steps, stopping with DatasetError once the output
    passes `limit` bytes (a gzip bomb) or the size the payload's own header declares: `size_of(prefix)`
    returns that size once the decoded prefix holds the header (None before). Memory never exceeds the
    bound plus one step, whatever the stream's trailer claims."""
    cap = MAX_DECODED_BYTES if limit is None else limit
    declared: int | None = None
    out = bytearray()
    rest = data
    try:
        while rest:
            stream = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer (RFC 1952)
            pending = rest
            while not stream.eof:
                piece = stream.decompress(pending, _STEP)
                pending = stream.unconsumed_tail
                out += piece
                if declared is None and size_of is not None:
                    declared = size_of(bytes(out[:_HEADER_PREFIX]))
                    if declared is not None and declared > cap:
                        raise DatasetError(f"{what} decompresses to more than the limit of {cap} bytes "
                                           f"(its header declares {declared})")
                    cap = cap if declared is None else declared
                if len(out) > cap:
                    where = "its header's" if declared is not None and cap == declared else "the limit of"
                    raise DatasetError(f"{what} decompresses to more than {where} {cap} bytes")
                if not piece and not pending and not stream.eof:
                    raise DatasetError(f"{what} is a truncated or corrupt gzip stream: it ends before its trailer")
            rest = stream.unused_data
            if rest and not rest.startswith(b"\x1f\x8b"):
                if rest.strip(b"\x00"):
                    raise DatasetError(f"{what} has {len(rest)} bytes of trailing garbage after its gzip stream")
                break
    except zlib.error as exc:
        raise DatasetError(f"{what} is a truncated or corrupt gzip stream: {exc}") from None
    return bytes(out)
