"""Path kinds: every file a user names or a dataset lists is checked to be a regular file (or a folder)
before it is read.

A FIFO where a file is expected would block ``open`` for ever, a directory ends as IsADirectoryError and
a character device (``/dev/zero``) never ends; all three are refused here in one DatasetError line that
names the path and what it is. Files are opened with ``O_NONBLOCK`` and checked with ``fstat`` on the
open descriptor, so a FIFO neither blocks the open nor slips in between a check and the read (POSIX
``open(2)``: "O_NONBLOCK ... an open for reading-only shall return without delay" on a FIFO).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from poison_core.errors import DatasetError
from poison_core.limits import MAX_DECODED_BYTES

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file"))


def kind(mode: int) -> str:
    """Words for the file type in a stat mode: 'a directory', 'a FIFO (named pipe)', ..."""
    return next((words for test, words in _KINDS if test(mode)), "a special file")


def _stat(path: str | os.PathLike, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise DatasetError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is (a link to) a regular file; else one DatasetError line naming the path and its kind."""
    mode = _stat(path, what).st_mode
    if not stat.S_ISREG(mode):
        raise DatasetError(f"{what} {str(path)!r} is {kind(mode)}, not a regular file")
    return Path(path)


def require_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """`path` if it is (a link to) a directory; else one DatasetError line naming the path and its kind."""
    mode = _stat(path, what).st_mode
    if not stat.S_ISDIR(mode):
        raise DatasetError(f"{what} {str(path)!r} is {kind(mode)}, not a directory")
    return Path(path)


def read_regular(path: str | os.PathLike, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`, refusing any other kind and any file over `limit` bytes
    (default MAX_DECODED_BYTES) before a byte is read."""
    limit = MAX_DECODED_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DatasetError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"{what} {str(path)!r} is a directory, not a regular file") from None
    except OSError as exc:
        raise DatasetError(f"{what} {str(path)!r} cannot be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"{what} {str(path)!r} is {kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise DatasetError(f"{what} {str(path)!r} is {info.st_size} bytes, more than the limit of {limit}")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(min(info.st_size, limit) + 1)  # read(n) allocates n bytes up front
    except OSError as exc:
        raise DatasetError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise DatasetError(f"{what} {str(path)!r} grew past the limit of {limit} bytes while being read")
    return data


def read_text(path: str | os.PathLike, what: str = "file", limit: int | None = None) -> str:
    """The UTF-8 text of the regular file `path`; invalid UTF-8 is one DatasetError line with the byte offset."""
    data = read_regular(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{what} {str(path)!r} is not UTF-8 text (invalid byte at offset {exc.start})") from None
