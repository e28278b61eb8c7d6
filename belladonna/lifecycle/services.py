"""Start the flow's services side by side instead of one after another, and stop them.

A fresh ``belladonna run`` needs Prefect's API, a Ray instance whose workers import torch and
Belladonna, and the driver's own imports. Started in sequence these cost more than the quick-start's
compute. When no Prefect API is configured, :func:`start_services` starts this command's own local
server with Prefect's CLI (``prefect server start``, as a child process, on a free port of 127.0.0.1,
without the UI and the server services a local run does not use), then Ray and its warm-up jobs
while that server starts; :meth:`Services.wait` waits for the server's health check before the flow
starts, and :meth:`Services.stop` stops both when the command is done (before it prints its wall
time). Prefect's own temporary server (``SubprocessASGIServer``) would do the same, but only after
the driver imported the whole server (~2 s of CPU, fighting Ray's start for the interpreter lock:
up to 11 s before its subprocess was even launched, measured on a loaded 2-core machine).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from infra.ray_runner import ensure_ray
from poison_core.config import ExecutionConfig
from poison_core.errors import BelladonnaError

log = logging.getLogger(__name__)
UNUSED_SERVER_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS",
                          "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")
"""Prefect server services a local run does not use (deployment schedules, late and stuck runs,
automations): ``PREFECT_SERVER_SERVICES_<NAME>_ENABLED=false``. The task-run recorder and the event
persister stay on, so the server records every task run."""


class ServiceError(BelladonnaError):
    """A service this command started did not answer in time; the message says where its output is."""


def server_env(home: str | None = None) -> dict[str, str]:
    """The environment of a local Prefect server for Belladonna's runs (`home`: its PREFECT_HOME)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in UNUSED_SERVER_SERVICES}}
    env.pop("PREFECT_API_URL", None)
    return env | ({"PREFECT_HOME": home} if home else {})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_answers(api_url: str, timeout: float = 1.0) -> bool:
    """True when the Prefect API at `api_url` answers its health check within `timeout` seconds."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class Services:
    """Handles on the services being started: `wait()` blocks until Prefect's API answers, `stop()`
    stops what this command started."""

    def __init__(self) -> None:
        self.server: subprocess.Popen | None = None
        self.api_url: str | None = None

    def wait(self) -> None:
        """Wait for this command's Prefect server, if it started one: ServiceError if it exits or does
        not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        while self.server is not None and not server_answers(self.api_url):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"the local Prefect server {self.api_url} did not answer within {timeout:g} s "
                                   f"(exit code {self.server.poll()}; its output is in this command's log)")
            time.sleep(0.1)

    def stop(self) -> None:
        """Send Prefect's last events and logs while its API still answers (Prefect drains them only at
        interpreter exit), disconnect from Ray (a local instance: stop it), stop this command's server."""
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        from infra.ray_runner import shutdown

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        shutdown()
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def start_services(execution: ExecutionConfig) -> Services:
    """Start a local Prefect server (when no API URL is configured and Prefect's ephemeral mode is on)
    and point this process's Prefect settings at it, then Ray (whose every node starts importing the
    stage code at once: infra.ray_runner.ensure_ray)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    services = Services()
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        port = free_port()
        services.api_url = f"http://127.0.0.1:{port}/api"
        services.server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
             "--no-scheduler", "--no-late-runs", "--analytics-off", "--log-level", "ERROR"],
            env=server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # stderr: the command's log
        os.environ["PREFECT_API_URL"] = services.api_url
        refresh_global_settings_context()  # Prefect's settings pick up the variable
    ensure_ray(execution)
    return services


@contextmanager
def warm_tracking(tracking_uri: str | None, experiment: str, run_dir: str) -> Iterator[threading.Thread]:
    """Import MLflow and matplotlib and open (on a new run folder: create and migrate) the tracking
    database in a background thread while the flow's jobs run on Ray: about 3 s that the summarize
    stage would otherwise spend after the last job. Yields the thread (join it before summarizing)
    and joins it on the way out, also when the flow fails, so the database is never left half
    created. A failure here is only logged: the summarize stage's own Tracker raises it."""

    def warm() -> None:
        try:
            import matplotlib.backends.backend_agg  # what infra.figures draws with
            import matplotlib.figure  # noqa: F401

            from infra.tracking import Tracker

            Tracker(tracking_uri, experiment, run_dir=run_dir)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: summarize opens the store again
            log.warning("tracking warm-up failed (%s); summarize retries", exc)

    thread = threading.Thread(target=warm, name="tracking-warm-up", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join()
