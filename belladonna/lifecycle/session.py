"""What a long command (``run``, ``stage``) sets up around its flow: a log file, Ctrl-C, a watcher.

* Every log record (Prefect's task and flow tracebacks, Ray's, ours) goes to a log file; the terminal
  only gets Belladonna's own warnings and, on failure, the one ``failed:`` line, which names the file.
* Ctrl-C stops the command within seconds: the processes it started are stopped, it says it was
  interrupted and exits 130. Stage outputs are written atomically, so nothing is half-written and a
  rerun resumes from what was stored.
* :mod:`belladonna.lifecycle.reaper` stops whatever the command started that is still running when
  it ends.
* :class:`Timeline` and :func:`finish`: the last line a successful command prints is its whole wall
  time, from its process's start (as the shell's ``time`` counts it) to after its teardown, split
  into phases. The command ends as any Python program does (``sys.exit``): the interpreter runs the
  exit hooks Prefect, Ray and MLflow registered, then :meth:`services.Services.stop`, then the line
  (:func:`begin`, :func:`finish`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from belladonna.lifecycle import reaper

OWN_LOGGERS = ("belladonna", "poison_core", "infra", "tasks", "flows")
log = logging.getLogger(__name__)
_state: dict[str, Any] = {"log_file": None, "watcher": None, "finished": None, "at_stop": []}
STOP_WAIT_S = 5.0
"""How long an interrupted command waits for the processes it SIGKILLed to be gone before its clean-ups."""


class _OwnWarnings(logging.Filter):
    """Console filter: Belladonna's warnings and errors, without tracebacks; everything else goes to the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING and record.name.split(".")[0] in OWN_LOGGERS
                and not record.exc_info)


def supervise(logs: Path, name: str, notice: Callable[[str], None]) -> None:
    """Around a flow: every log record to a file under `logs`, Ctrl-C stops within seconds (exit 130,
    `notice` gets its one line), and nothing this command starts outlives it."""
    import prefect  # noqa: F401  (Prefect configures logging on import; the log file goes on top of it)

    log_to_file(logs, name)
    start_watcher()
    on_interrupt(notice)


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
    """Start :mod:`belladonna.lifecycle.reaper` for this command (once)."""
    if _state["watcher"] is None:
        _state["watcher"] = reaper.start()


def on_interrupt(notice: Any) -> None:
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP: stop every process this command started, print one line, exit 130.
    (infra.ray_runner keeps these handlers across ray.init, which would replace SIGTERM's.)

    Runs in the main thread between bytecodes; it does not unwind through Prefect and Ray (which would
    spend a minute reporting the crash to a server the same Ctrl-C already stopped)."""

    def handler(signum: int, _frame: Any) -> None:
        ours = reaper.descendants(os.getpid())
        watcher = _state["watcher"]
        killed = reaper.kill_recorded({p: s for p, s in ours.items() if watcher is None or p != watcher.pid})
        reaper.wait_gone({p: ours[p] for p in killed}, STOP_WAIT_S)
        for clean_up in _state["at_stop"]:  # e.g. the temporary files of writes the kill cut short
            try:
                clean_up({*killed, os.getpid()})
            except Exception as exc:  # noqa: BLE001 - a clean-up must not turn a stop into a crash
                log.warning("clean-up after the interrupt failed: %s", exc)
        where = f"; log: {log_file()}" if log_file() else ""
        notice(f"interrupted: stopped by {signal.Signals(signum).name}; rerun the same command to resume{where}")
        sys.stdout.flush()
        os._exit(130)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal was closed
        signal.signal(signum, handler)


def at_stop(clean_up: Callable[[set[int]], Any]) -> None:
    """Run `clean_up(pids)` when a signal stops the command, after the processes it started are gone;
    `pids` are those killed and this process (which exits next), so their half-done work can be removed."""
    _state["at_stop"].append(clean_up)


def off_main_thread(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """`fn(**kwargs)` in a worker thread while the main thread waits, interruptibly, and keeps the signals.

    Prefect's flow engine replaces SIGTERM's handler, in the main thread, with one that raises
    TerminationSignal; raised inside ``ray.get`` that surfaced as "SystemError: ... returned a result with
    an exception set", exit 1. Off the main thread Prefect installs no handler (signals are main-thread
    only), so SIGTERM and SIGHUP reach :func:`on_interrupt`'s handler, as Ctrl-C does."""
    import contextvars
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    # the thread runs in a copy of this context: Prefect's settings (temporary_settings) travel with it
    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="belladonna-flow",
                              daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # returns to the interpreter often: signal handlers run between joins
    if "error" in box:
        raise box["error"]
    return box["result"]


class Timeline:
    """This command's wall time, from its process's start (read from /proc, so the interpreter's own
    start-up and every import count) to now, in named phases: `mark(phase)` ends a phase."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.start = now - (reaper.age(os.getpid()) or 0.0)
        self.phases: dict[str, float] = {}
        self._last = self.start

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self._last
        self._last = now

    def line(self) -> str:
        """``wall time 18.4s (start-up 6.2s, flow 10.8s, report 0.2s, teardown 1.2s)``."""
        parts = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.phases.items())
        return f"wall time {time.monotonic() - self.start:.1f}s ({parts})"


def begin() -> Timeline:
    """The command's :class:`Timeline`. Call it first: it registers :func:`_last_line` with :mod:`atexit`
    before any library registers its exit handlers, so that it runs after all of them."""
    atexit.register(_last_line)
    return Timeline()


def finish(timeline: Timeline, notice: Callable[[str], None]) -> None:
    """Mark a command as successful; it then ends as any Python program does (``sys.exit(0)``). The
    interpreter's exit runs Prefect's thread exit hooks (its workers send their last events and logs),
    then every :mod:`atexit` handler (Ray's, Prefect's, torch's, the services' stop) and, last since it
    was registered first (:func:`begin`), :func:`_last_line`: the wall time, the very last line.

    What would come after the last exit handler, the interpreter freeing every object torch, Ray,
    Prefect and MLflow created one by one, is skipped (:func:`os._exit`, after :func:`logging.shutdown`
    and with the output flushed): 10.6 s after the last line in one quick-start on the 2-core machine
    at a load of 15."""
    _state["finished"] = (timeline, notice)


def _last_line() -> None:
    if _state["finished"] is None:
        return
    timeline, notice = _state["finished"]
    timeline.mark("teardown")
    notice(timeline.line())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
