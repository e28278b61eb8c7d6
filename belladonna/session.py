"""What a long command (``run``, ``stage``) sets up around its flow: a log file, Ctrl-C, a watcher.

* Every log record (Prefect's task and flow tracebacks, Ray's, ours) goes to a log file; the terminal
  only gets Belladonna's own warnings and, on failure, the one ``failed:`` line, which names the file.
* Ctrl-C stops the command within seconds: the processes it started are stopped, it says it was
  interrupted and exits 130. Stage outputs are written atomically, so nothing is half-written and a
  rerun resumes from what was stored.
* :mod:`belladonna.reaper` stops whatever the command started that is still running when it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from belladonna import reaper

OWN_LOGGERS = ("belladonna", "poison_core", "infra", "tasks", "flows")
log = logging.getLogger(__name__)
_state: dict[str, Any] = {"log_file": None, "watcher": None}


class _OwnWarnings(logging.Filter):
    """Console filter: Belladonna's warnings and errors, without tracebacks; everything else goes to the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING and record.name.split(".")[0] in OWN_LOGGERS
                and not record.exc_info)


def log_to_file(folder: Path, name: str) -> Path:
    """Send every log record to ``folder/<name>-<UTC time>.log`` and keep only Belladonna's own warnings
    on the console; returns the file's path.

    The process's file descriptor 2 is pointed at the file too, so what the processes this command
    starts write to their inherited stderr (the Prefect server's uvicorn, Ray's raylet) lands there,
    while Python's ``sys.stderr`` keeps the terminal for Belladonna's own lines."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = (folder / f"{name}-{stamp}-{os.getpid()}.log").absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_OwnWarnings())
            handler.setStream(sys.stderr)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    root.setLevel(logging.INFO)
    _state["log_file"] = path
    return path


def log_file() -> Path | None:
    """The log file of this command, if it set one up."""
    return _state["log_file"]


def start_watcher() -> None:
    """Start :mod:`belladonna.reaper` for this command (once)."""
    if _state["watcher"] is None:
        _state["watcher"] = reaper.start()


def on_interrupt(notice: Any) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: stop every process this command started, print one line, exit 130.

    Runs in the main thread between bytecodes; it does not unwind through Prefect and Ray (which would
    spend a minute reporting the crash to a server the same Ctrl-C already stopped)."""

    def handler(signum: int, _frame: Any) -> None:
        ours = reaper.descendants(os.getpid())
        watcher = _state["watcher"]
        reaper.kill_recorded({p: s for p, s in ours.items() if watcher is None or p != watcher.pid})
        where = f"; log: {log_file()}" if log_file() else ""
        notice(f"interrupted: stopped by {signal.Signals(signum).name}; rerun the same command to resume{where}")
        sys.stdout.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
