"""Checks of the run folder's neighbours that the OS and the services would otherwise report late and
unclearly: a name longer than the filesystem allows, a damaged MLflow SQLite database, a PREFECT_HOME
that is not a folder. Each is one InputError line naming the path; nothing is created or written.

SQLite's file header (https://www.sqlite.org/fileformat.html, section 1.3): the 16-byte magic
``SQLite format 3\\0``, the page size at offset 16 (big-endian; 1 means 65536) and the database size in
pages at offset 28, valid when the change counter at offset 24 equals the version-valid-for number at 92.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from poison_core.errors import InputError
from poison_core.paths import require_dir, require_file

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_name_lengths(path: str | Path, what: str) -> None:
    """InputError unless every component of `path` fits the filesystem's NAME_MAX and the whole its PATH_MAX
    (checked before anything stats the path, which would raise ENAMETOOLONG)."""
    full = Path(path).expanduser().absolute()
    name_max, path_max = _limit("PC_NAME_MAX", 255), _limit("PC_PATH_MAX", 4096)
    for part in full.parts:
        if len(os.fsencode(part)) > name_max:
            raise InputError(f"{what}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; this filesystem "
                             f"allows at most {name_max} per name")
    if len(os.fsencode(str(full))) >= path_max:
        raise InputError(f"{what}: {str(full)[:60]!r}... is {len(os.fsencode(str(full)))} bytes long; this system "
                         f"allows paths under {path_max}")


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError):
        return default


def check_sqlite_file(path: str | Path, what: str) -> None:
    """InputError naming `path` if it exists and is not a whole SQLite database (wrong kind, not SQLite,
    or shorter than its header says: a truncated copy). A missing or empty file is fine: MLflow creates it."""
    path = Path(path)
    if not path.exists():
        return
    require_file(path, what)
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb") as fh:
        header = fh.read(100)
    if not header.startswith(SQLITE_MAGIC) or len(header) < 100:
        raise InputError(f"{what} {str(path)!r} is not an SQLite database; move it aside to start a new one")
    (page,) = struct.unpack(">H", header[16:18])
    page = 65536 if page == 1 else page
    (pages,) = struct.unpack(">I", header[28:32])
    counter, valid_for = header[24:28], header[92:96]
    declared = pages * page if counter == valid_for and pages else None
    if page < 512 or page & (page - 1) or size % page or (declared is not None and size < declared):
        says = f", its header says {declared}" if declared is not None else f", not a multiple of its {page}-byte pages"
        raise InputError(f"{what} {str(path)!r} is damaged (truncated? {size} bytes{says}); move it aside to start "
                         "a new one")


def check_tracking_db(run_dir: str | Path) -> None:
    """The default MLflow database, ``<run_dir>/mlflow.db``, when MLFLOW_TRACKING_URI does not name another."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///")) if uri else Path(run_dir).expanduser() / "mlflow.db"
    check_sqlite_file(db, "MLflow tracking database")


def check_prefect_home() -> None:
    """PREFECT_HOME (default ~/.prefect) must be a folder or not exist yet: Prefect keeps its database there,
    and a file in its place made the local server fail to start ("did not answer within 120 s")."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if home.exists() or home.is_symlink():
        try:
            require_dir(home, "PREFECT_HOME")
        except InputError as exc:
            raise InputError(f"{exc}; Prefect keeps its database in that folder") from None
