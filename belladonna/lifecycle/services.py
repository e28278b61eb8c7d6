"""The services a command runs its flow with, started side by side through the tools' own CLIs.

A fresh ``belladonna run`` needs Prefect's API and a Ray instance whose workers import torch and
Belladonna. :func:`start_services` starts, as child processes bound to 127.0.0.1 on free ports:

* a Prefect server, with Prefect's CLI ``prefect server start`` (no UI, the server services a local
  run does not use off through their ``PREFECT_SERVER_SERVICES_<NAME>_ENABLED`` settings), unless a
  Prefect API is configured or Prefect's ephemeral mode is off; commands that start at once on one
  PREFECT_HOME start their servers one after the other (:class:`StartLock`: each migrates the shared
  database when it starts), the later one first starting its Ray head. This process's Prefect settings point
  at it through ``prefect.settings.temporary_settings`` (the flow's thread runs in a copy of that
  context: :func:`belladonna.lifecycle.session.off_main_thread`);
* a Ray head, with Ray's CLI ``ray start --head --block --node-ip-address 127.0.0.1`` (a temp dir of
  its own, so no address-less ``ray.init()`` elsewhere joins it), unless a Ray address is configured;
  the driver connects with ``ray.init(address=...)`` (:func:`infra.ray_runner.ensure_ray`), whose
  workers start importing the stage code at once.

:meth:`Services.stop` runs at interpreter exit (:func:`atexit.register`, registered before Prefect
and Ray register theirs, so it runs after them): Prefect's event and log workers send their last items
from the interpreter's thread exit hooks, which run before :mod:`atexit`'s, while the server still
answers; then Ray's driver disconnects, and the two processes and what they started are stopped by
PID (SIGTERM, then SIGKILL after a grace period: :data:`STOP_S`, :data:`RAY_GRACE_S`).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from belladonna.lifecycle import reaper
from belladonna.lifecycle.start_lock import StartLock
from poison_core.errors import BelladonnaError

if TYPE_CHECKING:
    from poison_core.config import ExecutionConfig

log = logging.getLogger(__name__)
UNUSED_SERVER_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS",
                          "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")
"""Prefect server services a local run does not use (deployment schedules, late and stuck runs,
automations): ``PREFECT_SERVER_SERVICES_<NAME>_ENABLED=false``. The task-run recorder and the event
persister stay on, so the server records every task run."""
RAY_START_S = 120.0
"""How long a Ray head may take to answer (its raylet alone has 30 s to register)."""
RAY_START_ATTEMPTS = 3
"""Starts of the local Ray head before giving up: Ray's raylet has a fixed 30 s to register with the GCS
(``ray/_private/node.py``), which a loaded machine misses now and then (both of two starts failed beside
a full test run and four other runs)."""
STOP_S = 10.0
"""Grace period for the Prefect server to exit on SIGTERM before it is SIGKILLed."""
RAY_GRACE_S = 2.0
"""Grace period for the Ray head's processes (GCS, raylet, agents, workers) to exit on SIGTERM, as
``ray stop --grace-period`` gives, before they are SIGKILLed (``ray.shutdown()`` of a local instance
does not wait for them at all). The ``ray start --block`` process itself only watches them, and on
SIGTERM first drains the node (up to 30 s, for Ray Serve's replicas): it is SIGKILLed at once, as
``ray stop --force`` would."""


class ServiceError(BelladonnaError):
    """A service this command started did not answer in time; the message says where its output is."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(home: str | None = None) -> dict[str, str]:
    """The environment of a local Prefect server for Belladonna's runs (`home`: its PREFECT_HOME)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in UNUSED_SERVER_SERVICES}}
    env.pop("PREFECT_API_URL", None)
    return env | ({"PREFECT_HOME": home} if home else {})


def prefect_server_command(port: int, *, ui: bool, log_level: str) -> list[str]:
    """``prefect server start`` on 127.0.0.1:`port` without the scheduler and the late-runs service."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
            *([] if ui else ["--no-ui"]), "--no-scheduler", "--no-late-runs", "--analytics-off",
            "--log-level", log_level]


def ray_head_command(temp_dir: str) -> tuple[list[str], str]:
    """``ray start --head --block`` on 127.0.0.1 with free ports and `temp_dir`; returns it and the
    head's address (``127.0.0.1:<GCS port>``)."""
    gcs = free_port()
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    prefix = [ray_cli] if ray_cli else [sys.executable, "-m", "ray.scripts.scripts"]
    return [*prefix, "start", "--head", "--block", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"], f"127.0.0.1:{gcs}"


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def _running(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def answered(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> bool:
    """Poll `ready` until it holds (True), or `alive` no longer does or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def server_answers(api_url: str, timeout: float = 1.0) -> bool:
    """True when the Prefect API at `api_url` answers its health check within `timeout` seconds."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def ray_head_answers(address: str, temp_dir: str, timeout: float = 1.0) -> bool:
    """Ray's GCS accepts a connection and ``ray start`` has written its address (which it does once
    the head node has started)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return (Path(temp_dir) / "ray_current_cluster").is_file()


class Services:
    """The services this command started: `wait()` blocks until Prefect's API answers, `stop()` (also
    run at interpreter exit) stops them."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_url: str | None = None
        self.ray_temp: str | None = None
        self.settings = ExitStack()
        self.start_lock: StartLock | None = None

    def _launch(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A child process in this command's session; its stderr is the command's (its log file)."""
        self.procs[name] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return self.procs[name]

    def start_prefect(self, home: Path, wait_s: float) -> bool:
        """Launch a local Prefect server on a free port for the database in `home` and point this
        process's Prefect settings at it, once its :class:`StartLock` is held; False (nothing launched)
        when the lock is busy and `wait_s` is 0."""
        lock = StartLock(home)
        if not lock.try_acquire():
            if wait_s <= 0:
                lock.release()
                return False
            lock.acquire(wait_s)
        from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                      temporary_settings)

        self.start_lock = lock
        port = free_port()
        self.api_url = url = f"http://127.0.0.1:{port}/api"
        server = self._launch("prefect", prefect_server_command(port, ui=False, log_level="ERROR"), server_env())
        self.settings.enter_context(temporary_settings(updates={PREFECT_API_URL: self.api_url}))
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        threading.Thread(target=self._release_when_answers, args=(server, url, timeout), daemon=True,
                         name="prefect-start-lock").start()  # not held while this command starts Ray
        return True

    def _release_when_answers(self, server: subprocess.Popen, url: str, timeout: float) -> None:
        answered(partial(server_answers, url), partial(_running, server), timeout)
        lock = self.start_lock
        if lock is not None:
            lock.release()

    def start_ray_head(self) -> str:
        """Start a local Ray head, again if it exits before it answers (up to RAY_START_ATTEMPTS times: a
        loaded machine can miss the raylet's fixed 30 s to register); returns its address."""
        self.ray_temp = temp = tempfile.mkdtemp(prefix="belladonna-ray-")  # short: Ray's socket paths
        for attempt in range(RAY_START_ATTEMPTS):
            if attempt:
                log.warning("ray: the local head did not start (a loaded machine?); starting it again")
            command, address = ray_head_command(self.ray_temp)
            proc = self._launch("ray", command, ray_env())
            if answered(partial(ray_head_answers, address, temp), partial(_running, proc), RAY_START_S):
                return address
            reaper.stop_tree(reaper.tree(proc.pid), RAY_GRACE_S, kill=frozenset([proc.pid]))
            proc.wait()
        raise ServiceError(f"the local Ray head did not answer within {RAY_START_S:g} s in {RAY_START_ATTEMPTS} "
                           f"starts (exit code {proc.poll()}; its output is in this command's log)")

    def wait(self) -> None:
        """Wait for this command's Prefect server, if it started one: ServiceError if it exits or does
        not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        server, url = self.procs.get("prefect"), self.api_url
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        if server is not None and url is not None and not answered(partial(server_answers, url),
                                                                   partial(_running, server), timeout):
            raise ServiceError(f"the local Prefect server {url} did not answer within {timeout:g} s "
                               f"(exit code {server.poll()}; its output is in this command's log)")

    def stop(self) -> None:
        """Disconnect from Ray, stop the processes this command started (and what they started), remove
        the Ray head's temp dir. Idempotent."""
        from infra.ray_runner import shutdown

        if self.start_lock is not None:
            self.start_lock.release()
        shutdown()
        trees = {name: reaper.tree(proc.pid) for name, proc in self.procs.items()}
        for name, tree in trees.items():
            reaper.terminate(tree, kill=frozenset([self.procs[name].pid] if name == "ray" else []))
        for name, tree in trees.items():
            reaper.finish_off(tree, RAY_GRACE_S if name == "ray" else STOP_S)
        for proc in self.procs.values():
            proc.wait()
        self.procs = {}
        if self.ray_temp is not None:
            shutil.rmtree(self.ray_temp, ignore_errors=True)
            self.ray_temp = None
        self.settings.close()


def start_services(execution: ExecutionConfig) -> Services:
    """Start a local Ray head (unless execution.ray_address or RAY_ADDRESS names one) and a local Prefect
    server (unless a Prefect API URL is configured or Prefect's ephemeral mode is off), side by side;
    connect to Ray (infra.ray_runner.ensure_ray) while the server starts. :meth:`Services.stop` is
    registered to run at interpreter exit."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

    from infra.ray_runner import ensure_ray

    services = Services()
    atexit.register(services.stop)
    home = Path(PREFECT_HOME.value()).expanduser()
    prefect = not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
    launched = prefect and services.start_prefect(home, wait_s=0)  # another command's start: after Ray's
    head = None
    if not (execution.ray_address or os.environ.get("RAY_ADDRESS")):
        head = services.start_ray_head()
    if prefect and not launched:
        services.start_prefect(home, wait_s=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    ensure_ray(execution, local_head=head)
    return services
