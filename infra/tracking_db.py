"""The MLflow SQLite database as Belladonna opens it: checked before every open, kept with its run folder.

* Every :class:`infra.tracking.Tracker` on a ``sqlite:///`` store (the preflight's, the summarize
  stage's, the regression gate's) and ``belladonna compare`` check the file first
  (:func:`infra.local_checks.check_tracking_uri`: the header, then SQLite's ``PRAGMA quick_check``);
  what MLflow still cannot open is :func:`db_error`. A damaged file is one InputError line naming it
  and what to do, instead of SQLAlchemy's multi-line ``DatabaseError`` with its SQL statement, which
  named no file. Nothing is created or written.
* :func:`moved_from`: MLflow stores an experiment's artifact location as an absolute ``file://`` URI
  (``SqlAlchemyStore.create_experiment`` resolves a relative one against the current directory, so
  storing it relative to the run folder is not possible). A run folder that was moved or copied still
  names its old ``mlartifacts`` folder; the Tracker then renames that experiment and starts a new one
  of the same name in the current folder, so that nothing is written into the old folder.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from infra.local_checks import TRACKING_ADVICE, TRACKING_DB
from poison_core.errors import InputError

ARTIFACTS = "mlartifacts"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")).expanduser() if uri.startswith("sqlite:///") else None


def is_db_error(exc: BaseException) -> bool:
    """SQLAlchemy's or sqlite3's DatabaseError: the database file could not be read."""
    from sqlalchemy.exc import DatabaseError

    return isinstance(exc, (DatabaseError, sqlite3.DatabaseError))


def db_error(exc: BaseException, db: Path) -> InputError:
    """One line naming the database, without SQLAlchemy's statement and background link."""
    first = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
    return InputError(f"{TRACKING_DB} {str(db)!r} could not be read ({first}); move it aside to start a new "
                      f"one{TRACKING_ADVICE}")


def moved_from(stored: str | None, run_dir: Path) -> Path | None:
    """The old run folder, if `stored` (an experiment's artifact location) is the ``mlartifacts`` folder
    of another run folder than `run_dir` (the folder was moved or copied); else None."""
    if not stored or not stored.startswith("file:"):
        return None
    old = Path(unquote(urlparse(stored).path))
    if old.name != ARTIFACTS or old.parent == run_dir:
        return None
    return old.parent


def moved_name(name: str, old: Path) -> str:
    """The new name of a moved run folder's old experiment (unique: it carries the time)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{name} (run folder {old}, until {stamp})"
