"""No process outlives the command that started it: a watcher that stops a command's leftovers.

``belladonna run`` starts a Prefect server, a local Ray instance and Ray's agents and workers. A
normal exit stops them (Prefect's and Ray's own shutdown), but a driver that is SIGKILLed, or a Ray
agent that ignores its parent's end, would stay behind. :func:`start` launches this module as a
small process in a session of its own (so a terminal's Ctrl-C does not reach it), connected to the
command by a pipe. While the command lives, the watcher records the command's descendants (PID
and start time, read from /proc) twice a second; when the pipe closes (the command ended, however)
it waits a grace period for them to exit by themselves, then SIGKILLs those still running whose
start time still matches — only processes the command started, never one found by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.proc_table import descendants, kill_recorded, start_time

POLL_S = 0.5
GRACE_S = 3.0


def age(pid: int) -> float | None:
    """Seconds since `pid` started, from its start time in /proc (the kernel's boot-time clock, 10 ms
    ticks): for this process, what the shell's ``time`` counts, interpreter start-up included. None
    if it is gone or there is no /proc."""
    start = start_time(pid)
    if start is None:
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> dict[int, int]:
    """`pid` and its live descendants as {pid: start time} (empty if `pid` is gone)."""
    start = start_time(pid)
    return {} if start is None else {pid: start, **descendants(pid)}


def wait_gone(recorded: dict[int, int], timeout: float) -> None:
    """Wait up to `timeout` s for the recorded processes to exit (bounded; polls /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(start_time(p) == s for p, s in recorded.items()):
        time.sleep(0.1)


def terminate(recorded: dict[int, int], kill: frozenset[int] = frozenset()) -> None:
    """SIGTERM each recorded process that still runs (same start time); those in `kill`: SIGKILL."""
    for pid, start in recorded.items():
        if start_time(pid) == start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL if pid in kill else signal.SIGTERM)


def finish_off(recorded: dict[int, int], timeout: float) -> None:
    """Give the recorded processes `timeout` s to exit by themselves, then SIGKILL the rest."""
    wait_gone(recorded, timeout)
    killed = kill_recorded(recorded)
    wait_gone({pid: recorded[pid] for pid in killed}, 5.0)  # SIGKILL is delivered asynchronously


def stop_tree(recorded: dict[int, int], timeout: float, kill: frozenset[int] = frozenset()) -> None:
    """:func:`terminate`, then :func:`finish_off` (uvicorn, Ray's GCS and raylet shut down on SIGTERM)."""
    terminate(recorded, kill)
    finish_off(recorded, timeout)


def watch(parent: int) -> None:
    """Record `parent`'s descendants until standard input closes, then stop the ones still running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    recorded: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
        recorded.update({pid: start for pid, start in descendants(parent).items() if pid != me})
    wait_gone(recorded, GRACE_S)
    kill_recorded(recorded)


def start() -> subprocess.Popen | None:
    """Start the watcher for this process (Linux /proc only; elsewhere nothing is started). The pipe
    stays open for this process's life: the operating system closes it when the process ends."""
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "belladonna.lifecycle.reaper", str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
