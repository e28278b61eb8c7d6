"""A Prefect process worker stopped with SIGINT while it runs a benchmark: everything ends, the run is Crashed.

As docs/deploy.md sets it up on one machine: a real ``prefect server`` (127.0.0.1, its own PREFECT_HOME),
``prefect work-pool create --type process``, ``prefect deploy --all`` from a copy of prefect.yaml (no
schedules), and a real ``prefect worker start --pool belladonna``. A deployment run of the quick-start (with
long training, so it is still running) is taken by the worker; once its local Ray instance runs jobs, the
worker gets SIGINT (``kill -INT``; a terminal's Ctrl-C reaches only the worker too: Prefect starts each flow
run in a session of its own). Then, each within a bounded time: the worker exits, every process it started
(the flow-run process, Ray's processes, the flow run's watcher; recorded by PID and start time from the
worker's start) is gone, and the flow run is Crashed with the line that says a rerun resumes; no
results.json is written. Before infra/flow_run_exit.py the run stayed Running for good and two Ray agents
outlived the worker. The fast case checks the flow run's watcher on its own: a process tree whose root is
SIGKILLed, with a child in a session of its own and one in the root's process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from belladonna.lifecycle import reaper
from tests.test_nightly import PREFECT, Processes, _client, _free_port, _wait, prefect_env

ROOT = Path(__file__).resolve().parent.parent
STOP_S = 90  # worker, processes and the run's state: each within this after the SIGINT (a loaded machine)


class Recorder:
    """Every descendant (PID, start time) of a process, recorded twice a second until `stop()`."""

    def __init__(self, pid: int) -> None:
        self.pid, self.seen, self.done = pid, {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            self.seen.update(reaper.descendants(self.pid))
            self.done.wait(0.5)

    def alive(self) -> list[int]:
        return [p for p, s in self.seen.items() if reaper.start_time(p) == s]

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        reaper.kill_recorded(self.seen)  # after a failed assertion: nothing of ours stays


def _commands(pid: int) -> dict[int, str]:
    found = {}
    for child in reaper.descendants(pid):
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


@pytest.fixture
def deployed(tmp_path) -> Iterator[dict[str, Any]]:
    """A Prefect server, the work pool and the deployments (prefect.yaml without its schedules)."""
    (tmp_path / "logs").mkdir()
    port = _free_port()
    api, base = prefect_env(tmp_path, port)
    procs = Processes(tmp_path / "logs")
    try:
        server = procs.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                             {**base, "PREFECT_UI_ENABLED": "false"}, tmp_path)

        def healthy() -> bool:
            assert server.poll() is None, procs.tail("server")
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the Prefect server", healthy, timeout=180)
        spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
        for deployment in spec["deployments"]:
            deployment.pop("schedules", None)
        (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        for args in ([*PREFECT, "work-pool", "create", "belladonna", "--type", "process"],
                     [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml")]):
            done = subprocess.run(args, env=base, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        yield {"tmp": tmp_path, "api": api, "env": base, "procs": procs}
    finally:
        procs.stop()


@pytest.mark.slow
def test_a_worker_stopped_with_sigint_ends_its_flow_run_crashed_and_leaves_no_process(deployed):
    tmp, procs = deployed["tmp"], deployed["procs"]
    worker_env = {**deployed["env"], "BELLADONNA_HOME": str(ROOT), "BELLADONNA_STORE": str(tmp / "store"),
                  "BELLADONNA_RUN_DIR": str(tmp / "runs"), "PREFECT_WORKER_QUERY_SECONDS": "2",
                  "PYTHONPATH": str(ROOT)}  # the flow run imports this checkout's code, as the worker's pull step says
    worker = procs.start("worker", [*PREFECT, "worker", "start", "--pool", "belladonna", "--name", "stopped"],
                         worker_env, tmp)
    recorder = Recorder(worker.pid)
    config = (ROOT / "poison_core" / "presets" / "quickstart.yaml").read_text().replace("epochs: 15", "epochs: 500")
    assert "epochs: 500" in config
    try:
        with _client(deployed["api"]) as client:
            deployment = client.read_deployment_by_name("benchmark/nightly")
            created = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})

            def training() -> bool:  # the flow run's Ray instance runs a job
                assert worker.poll() is None, procs.tail("worker")
                state = client.read_flow_run(created.id).state
                assert state is not None and not state.is_final(), f"{state}\n{procs.tail('worker')}"
                return state.is_running() and any("ray::_in_worker" in c for c in _commands(worker.pid).values())

            try:
                _wait("the worker's flow run to train on Ray", training, timeout=900, every=1)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- worker ---\n{procs.tail('worker')}") from None
            time.sleep(5)  # into the stage
            started = dict(recorder.seen)
            assert any("prefect.engine" in c for c in _commands(worker.pid).values())
            os.kill(worker.pid, signal.SIGINT)
            sent = time.monotonic()
            worker.wait(timeout=STOP_S)
            _wait("every process the worker started to end", lambda: not recorder.alive(), timeout=STOP_S)
            run = _wait("the flow run to end", lambda: (lambda r: r if r.state.is_final() else None)(
                client.read_flow_run(created.id)), timeout=STOP_S)
            seconds = time.monotonic() - sent
    finally:
        recorder.stop()
    assert len(started) >= 3, started  # the flow-run process, its watcher, Ray's processes
    assert run.state.is_crashed(), f"{run.state.name}: {run.state.message}\n{procs.tail('worker')}"
    message = run.state.message or ""
    assert len(message.splitlines()) == 1 and "rerun the deployment to resume" in message, message
    assert not list((tmp / "runs").rglob("results.json"))  # nothing half-written
    assert list((tmp / "store" / "datasets").iterdir())  # the stages before are stored: a rerun reuses them
    print(f"worker SIGINT: worker, {len(recorder.seen)} processes and the run's state settled in {seconds:.1f}s")  # noqa: T201


TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)  # a descendant
subprocess.Popen(["sleep", "600"])  # the same process group
time.sleep(600)
"""


def test_the_watcher_stops_what_a_killed_flow_run_process_left(tmp_path):
    root = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_CLIENT_MAX_RETRIES": "0"}  # nothing answers there
    watcher = subprocess.Popen([sys.executable, "-m", "infra.flow_run_exit", str(root.pid), "not-a-flow-run"],
                               stdin=subprocess.PIPE, env=env, start_new_session=True)
    recorder = Recorder(root.pid)
    try:
        _wait("the tree to start", lambda: len(recorder.seen) >= 2, timeout=60, every=0.2)
        time.sleep(1.5)  # the watcher records twice a second
        left = dict(recorder.seen)
        root.kill()
        root.wait(timeout=30)
        assert [p for p, s in left.items() if reaper.start_time(p) == s], "the tree died with its root: no test"
        watcher.stdin.close()  # as when the flow-run process is gone: the pipe's only writer
        watcher.wait(timeout=120)
        assert not [p for p, s in left.items() if reaper.start_time(p) == s], left
    finally:
        recorder.stop()
        if watcher.poll() is None:
            watcher.kill()
