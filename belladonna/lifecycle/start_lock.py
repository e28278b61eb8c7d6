"""One Prefect server start at a time per PREFECT_HOME.

Each command that starts its own local Prefect server (:mod:`belladonna.lifecycle.services`) points it
at the database in PREFECT_HOME (default ``~/.prefect/prefect.db``), and a server migrates that database
when it starts (alembic). Two servers migrating a fresh database at once fail: "Online migration
expected to match one row when updating ... in 'alembic_version'; 0 found", server exit 3; on a fresh
machine two of four ``belladonna run`` started together failed so. :class:`StartLock` makes those starts
take turns.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)
START_LOCK = ".belladonna-server-start.lock"
"""The lock file in PREFECT_HOME."""


class StartLock:
    """Serialises the start of local Prefect servers that share one PREFECT_HOME (and so one SQLite
    database): a server migrates the database when it starts (alembic), and two servers migrating a
    fresh database at once fail ("Online migration expected to match one row ...", exit 3). Held from
    before the server is launched until it answers; an advisory ``fcntl.flock`` on a file in the home,
    released when the file is closed or the holder exits."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.file: TextIO | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this holds it."""
        if self.file is None:
            self.home.mkdir(parents=True, exist_ok=True)
            self.file = open(self.home / START_LOCK, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float) -> None:
        """Wait up to `timeout` s for the lock; past that, go on without it (a start that hangs elsewhere
        must not stop this one for ever: the server's own answer then decides)."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() > deadline:
                log.warning("prefect: another server start on %s held its lock for %g s; starting anyway",
                            self.home, timeout)
                return
            time.sleep(0.2)

    def release(self) -> None:
        """Idempotent; safe from another thread."""
        file, self.file = self.file, None
        if file is not None:
            file.close()
