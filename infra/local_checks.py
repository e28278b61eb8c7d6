"""Checks of the run folder's neighbours that the OS and the services would otherwise report late and
unclearly: a name longer than the filesystem allows, a damaged MLflow SQLite database, a PREFECT_HOME
that is not a folder. Each is one InputError line naming the path; nothing is created or written.

SQLite's file header (https://www.sqlite.org/fileformat.html, section 1.3): the 16-byte magic
``SQLite format 3\\0``, the page size at offset 16 (big-endian; 1 means 65536) and the database size in
pages at offset 28, valid when the change counter at offset 24 equals the version-valid-for number at 92.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path
from urllib.parse import quote

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


def check_sqlite_file(path: str | Path, what: str, advice: str = "") -> None:
    """InputError naming `path` if it exists and is not a whole SQLite database (wrong kind, not SQLite,
    shorter than its header says: a truncated copy; pages SQLite's quick_check finds damaged). A missing
    or empty file is fine: MLflow creates it. `advice` ends the line (another way out than moving it)."""
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
        raise InputError(f"{what} {str(path)!r} is not an SQLite database; move it aside to start a new one{advice}")
    (page,) = struct.unpack(">H", header[16:18])
    page = 65536 if page == 1 else page
    (pages,) = struct.unpack(">I", header[28:32])
    counter, valid_for = header[24:28], header[92:96]
    declared = pages * page if counter == valid_for and pages else None
    if page < 512 or page & (page - 1) or size % page or (declared is not None and size < declared):
        says = f", its header says {declared}" if declared is not None else f", not a multiple of its {page}-byte pages"
        raise InputError(f"{what} {str(path)!r} is damaged (truncated? {size} bytes{says}); move it aside to start "
                         f"a new one{advice}")
    found = _quick_check(path)
    if found != ["ok"]:
        reason = " ".join(" ".join(found).split())[:160]
        raise InputError(f"{what} {str(path)!r} is damaged ({reason}); move it aside to start a new one{advice}")


def _quick_check(path: Path) -> list[str]:
    """SQLite's ``PRAGMA quick_check`` (https://www.sqlite.org/pragma.html#pragma_quick_check: page and
    b-tree structure in O(N), without ``integrity_check``'s index cross-checks) on a read-only connection:
    ``["ok"]`` or what it found. A database another process holds locked, one with the hot journal of
    a killed writer (which only a writable connection rolls back) and one this process may not open pass:
    MLflow waits for the lock, rolls the journal back, and reports the rest in its own words."""
    try:
        db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return ["ok"]
    try:
        return [str(row[0]) for row in db.execute("PRAGMA quick_check(3)").fetchall()]
    except sqlite3.OperationalError:  # locked, a hot journal a read-only connection cannot roll back, I/O
        return ["ok"]
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "file is not a database"
        return [str(exc)]
    finally:
        db.close()


TRACKING_DB = "MLflow tracking database"
TRACKING_ADVICE = ", or name another with MLFLOW_TRACKING_URI"


def check_tracking_uri(uri: str, advice: str = TRACKING_ADVICE) -> None:
    """The SQLite file of a ``sqlite:///`` tracking URI (any other store is the tracking server's business)."""
    if uri.startswith("sqlite:///"):
        check_sqlite_file(Path(uri.removeprefix("sqlite:///")).expanduser(), TRACKING_DB, advice)


def check_tracking_db(run_dir: str | Path, tracking_uri: str | None = None) -> None:
    """The MLflow database a run will use: `tracking_uri`, else MLFLOW_TRACKING_URI, else ``<run_dir>/mlflow.db``."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    check_tracking_uri(uri or f"sqlite:///{Path(run_dir).expanduser() / 'mlflow.db'}")


def check_prefect_home() -> None:
    """PREFECT_HOME (default ~/.prefect) must be a folder or not exist yet: Prefect keeps its database there,
    and a file in its place made the local server fail to start ("did not answer within 120 s")."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if home.exists() or home.is_symlink():
        try:
            require_dir(home, "PREFECT_HOME")
        except InputError as exc:
            raise InputError(f"{exc}; Prefect keeps its database in that folder") from None
