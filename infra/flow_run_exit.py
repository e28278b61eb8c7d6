"""A flow run whose Prefect worker is stopped ends at once: its Ray processes stopped, its state Crashed.

A process worker (``prefect worker start --pool ...``, prefect.yaml) runs each flow run as a
``python -m prefect.engine`` subprocess in a session of its own. Stopped with SIGINT (Ctrl-C) or
SIGTERM, the worker exits within seconds and takes that subprocess with it, without a signal the
subprocess can handle (its shutdown cancels the task that awaits the process, which kills it).
Measured before this module (Prefect 3.8.8, the benchmark flow in a Ray job): the worker exited in 5 s,
the flow run stayed ``Running`` on the server for good (so no automation reran it), and Ray's dashboard
and runtime-env agents outlived it, orphaned, for about a minute.

:func:`guard_flow_run`, called first in each flow's body, acts only in the flow-run process a worker started
(``PREFECT__FLOW_RUN_ID`` names this very run), in its main thread. ``belladonna run`` runs flows in a
worker thread (:mod:`belladonna.lifecycle.session` handles its signals) and is left alone, as is a flow called
in-process (a script, a test). It starts a small watcher (this module run as a script, in a session of
its own, connected by a pipe, as :mod:`belladonna.lifecycle.reaper` does for a command) that records the flow-run
process's descendants and process-group members (PID and start time, twice a second). When the pipe
closes without the flow saying it ended (killed, however), the watcher SIGKILLs those still running
after a grace period, and, if the flow run is not in a final state, sets it ``Crashed`` with one line:
every stage output is stored, so a rerun resumes (a crashed *scheduled* nightly run is rerun by
prefect.yaml's automation). SIGTERM, SIGINT or SIGHUP sent to the flow-run process itself do the same
at once, from a handler, and exit with 128 + the signal number.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from infra.proc_table import descendants, kill_recorded, start_time

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPORT_TIMEOUT_S = 15.0
POLL_S = 0.5
GRACE_S = 3.0
ENDED = b"ended\n"
_state: dict[str, Any] = {"watcher": None}


def message(why: str) -> str:
    return f"{why}; every finished stage is stored: rerun the deployment to resume"


def report_crashed(flow_run_id: str, text: str, only_if_running: bool = False) -> None:
    """Set the flow run Crashed (unless `only_if_running` and it is already final), within REPORT_TIMEOUT_S:
    a server that is gone too does not hold the exit."""
    def report() -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
                if only_if_running and state is not None and state.is_final():
                    return
                client.set_flow_run_state(flow_run_id, Crashed(message=text), force=True)
        except Exception as exc:  # noqa: BLE001 - the process exits either way
            log.warning("could not mark flow run %s Crashed: %s", flow_run_id, exc)

    reporter = threading.Thread(target=report, name="report-crashed", daemon=True)
    reporter.start()
    reporter.join(REPORT_TIMEOUT_S)


def watch(pid: int, flow_run_id: str) -> None:
    """The watcher: record `pid`'s processes until standard input closes; unless the flow said it ended,
    stop those still running after GRACE_S and set the flow run Crashed if it is not final."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me, group = os.getpid(), (pid if os.getpgid(pid) == pid else None)
    recorded: dict[int, int] = {}
    said = b""
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 64)
            if not chunk:
                break
            said += chunk
        recorded.update({p: s for p, s in descendants(pid, group).items() if p != me})
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(start_time(p) == s for p, s in recorded.items()):
        time.sleep(0.1)
    kill_recorded(recorded)
    if ENDED not in said:
        report_crashed(flow_run_id, message("the flow-run process was killed (its worker was stopped?)"),
                       only_if_running=True)


def guard_flow_run(what: str) -> None:
    """Call first thing in a flow's body (`what` names the flow in the message): see the module's
    docstring. In the flow-run process a worker started, what it installs lasts as long as the process,
    which ends with the flow run; anywhere else it does nothing."""
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.id or "")
    if (threading.current_thread() is not threading.main_thread() or not flow_run_id
            or os.environ.get("PREFECT__FLOW_RUN_ID") != flow_run_id or not Path("/proc/self/stat").exists()
            or _state.get("watcher") is not None):
        return
    watcher = subprocess.Popen([sys.executable, "-m", "infra.flow_run_exit", str(os.getpid()), flow_run_id],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, close_fds=True)
    _state["watcher"] = watcher

    def ended() -> None:  # the process ends normally: Prefect has reported the flow run's final state
        try:
            assert watcher.stdin is not None
            watcher.stdin.write(ENDED)
            watcher.stdin.flush()
        except OSError:
            pass

    def handler(signum: int, _frame: FrameType | None) -> None:
        group = os.getpid() if os.getpgid(0) == os.getpid() else None
        kill_recorded({p: s for p, s in descendants(os.getpid(), group).items() if p != watcher.pid})
        text = message(f"{what}: stopped by {signal.Signals(signum).name} (its worker was stopped?)")
        log.error("%s", text)
        report_crashed(flow_run_id, text)
        ended()
        # anything started meanwhile
        kill_recorded({p: s for p, s in descendants(os.getpid(), group).items() if p != watcher.pid})
        os._exit(128 + signum)

    atexit.register(ended)
    for signum in SIGNALS:
        signal.signal(signum, handler)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
