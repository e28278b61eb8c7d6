"""The nightly deployment end to end, as docs/deploy.md sets it up on one machine: a real ``prefect server``
(its own PREFECT_HOME, 127.0.0.1), ``prefect work-pool create``, ``prefect deploy --all`` from a copy of
prefect.yaml (an interval of a few seconds instead of the cron, the quick-start preset instead of the
nightly one, a temporary run folder), a real process worker, and:

* the scheduler itself creates a flow run that the worker takes to Completed, with its results in the
  store and in MLflow (both named by the worker's environment only), in ``run_dir/<name>/results.json``
  and in ``belladonna report``; the Prefect artifact links to the MLflow run;
* a deployment run with a bad config fails within seconds with one line in its state message, and
  writes nothing (no run folder, no store, no MLflow database).

Bounded in time (every wait has a deadline); every process started here is stopped by its process
group (each is started in a new session). Fails on SQLAlchemy 2.1 (Prefect 3.8's scheduler raises
"Can't evaluate bulk DML statement" each loop and never creates the run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
BAD_CONFIG = "name: bad\nattacks: [{name: nosuch}]\n"
# Where a worker machine's settings come from: unset while deploying, set only for the worker.
RUN_TIME_VARS = ("RAY_ADDRESS", "BELLADONNA_STORE", "MLFLOW_TRACKING_URI", "BELLADONNA_RUN_DIR", "BELLADONNA_HOME")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, probe: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Processes:
    """Processes started in their own session; `stop()` ends each process group (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.started = logs, []

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((name, proc, log))
        return proc

    def tail(self, name: str, n: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        for _, proc, log in reversed(self.started):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the group outlives its leader while any member lives
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.close()


def _test_prefect_yaml(tmp: Path) -> Path:
    """prefect.yaml with an interval schedule of 5 s, the quick-start preset and a temporary run folder."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"]  # the shipped schedule is a cron; the copy swaps only that
    nightly["schedules"] = [{"interval": 5, "active": True}]
    nightly["parameters"] = {**nightly["parameters"], "config": "quickstart", "run_dir": str(tmp / "runs")}
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def prefect_env(tmp: Path, port: int) -> tuple[str, dict[str, str]]:
    """The API URL of a Prefect server on `port` and the environment for it and its clients: this
    process's without run-time and PREFECT_ variables, a PREFECT_HOME under `tmp`, telemetry off."""
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if k not in RUN_TIME_VARS and not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                RAY_AUTH_MODE="disabled", MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    return api, base


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A Prefect server, the work pool, the deployments and a process worker."""
    tmp = tmp_path_factory.mktemp("nightly")
    (tmp / "logs").mkdir()
    port = _free_port()
    api, base = prefect_env(tmp, port)
    procs = Processes(tmp / "logs")
    try:
        server = procs.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                             {**base, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                              "PREFECT_UI_ENABLED": "false"}, tmp)

        def healthy() -> bool:
            assert server.poll() is None, procs.tail("server")
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the Prefect server", healthy, timeout=180)
        setup = [[*PREFECT, "work-pool", "create", "belladonna", "--type", "process"],
                 [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(_test_prefect_yaml(tmp))]]
        for args in setup:  # from the repository root, as docs/deploy.md says; no run-time variable is set
            done = subprocess.run(args, env=base, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "Can't evaluate" not in done.stdout + done.stderr
        worker_env = {**base, "BELLADONNA_HOME": str(ROOT), "BELLADONNA_STORE": str(tmp / "store"),
                      "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PREFECT_WORKER_QUERY_SECONDS": "2"}
        procs.start("worker", [*PREFECT, "worker", "start", "--pool", "belladonna", "--name", "test-worker"],
                    worker_env, tmp)
        yield {"tmp": tmp, "api": api, "procs": procs, "env": base}
        _cancel_unfinished(api)  # after a failed wait: the worker stops its flow-run processes itself
    finally:
        procs.stop()


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return get_client(sync_client=True)


def _cancel_unfinished(api: str) -> None:
    """Runs a worker has started are cancelled through the API (the worker ends their processes);
    runs it has not are just marked Cancelled."""
    from prefect.states import Cancelled, Cancelling

    with _client(api) as client:
        started = []
        for run in client.read_flow_runs():
            if run.state and (run.state.is_running() or run.state.is_pending()):
                client.set_flow_run_state(run.id, Cancelling(), force=True)
                started.append(run)
            elif run.state and not run.state.is_final():
                client.set_flow_run_state(run.id, Cancelled(), force=True)
        _wait("started runs to cancel", lambda: all(client.read_flow_run(r.id).state.is_final() for r in started),
              timeout=60)


def _runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_scheduler_creates_a_nightly_run_that_the_worker_completes(stack):
    tmp, procs = stack["tmp"], stack["procs"]
    with _client(stack["api"]) as client:
        deployment = client.read_deployment_by_name("benchmark/nightly")
        assert deployment.global_concurrency_limit.limit == 1  # two nightly runs never overlap
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        assert not any(v == "" for v in (deployment.job_variables.get("env") or {}).values())
        assert client.read_automations_by_name("nightly__automation_1")  # the rerun-on-crash trigger
        first = _wait("the scheduler's first flow run", lambda: sorted(
            [r for r in _runs(client, deployment.id) if r.auto_scheduled], key=lambda r: r.expected_start_time),
            timeout=120)[0]
        assert "auto-scheduled" in first.tags  # created by the scheduler service, not by this test

        def taken():  # the scheduled run the worker started (a paused schedule deletes the unstarted ones;
            # with the concurrency limit the worker may take any of them, the rest await the slot)
            started = [r for r in _runs(client, deployment.id) if r.auto_scheduled and r.state
                       and not r.state.is_scheduled()]
            return sorted(started, key=lambda r: r.expected_start_time)[0] if started else None

        try:
            first = _wait("the worker to take a scheduled run", taken, timeout=900, every=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker ---\n{procs.tail('worker')}") from None
        assert "auto-scheduled" in first.tags
        for schedule in client.read_deployment_schedules(deployment.id):  # one run is enough
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        for run in _runs(client, deployment.id):
            if run.id != first.id and run.state and run.state.is_scheduled():
                client.delete_flow_run(run.id)

        def finished():
            run = client.read_flow_run(first.id)
            if run.state.is_final():
                return run
            return None

        try:
            run = _wait("the worker to finish the scheduled run", finished, timeout=900, every=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker ---\n{procs.tail('worker')}") from None
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{procs.tail('worker')}"
        artifacts = client.read_artifacts()
    seconds = (run.end_time - run.expected_start_time).total_seconds()
    print(f"quick-start deployment: scheduled for {run.expected_start_time}, Completed after {seconds:.1f}s "  # noqa: T201
          f"(flow run {run.total_run_time.total_seconds():.1f}s)")
    results = json.loads((tmp / "runs" / "quickstart" / "results.json").read_text())
    assert {r["attack"] for r in results["summary"]} == {"label_flip", "badnets"}
    assert results["prefect"]["flow_run_id"] == str(run.id) and results["prefect"]["deployment"] == "nightly"
    assert results["code_version"] and set(results["stage_seconds"]) >= {"ingest", "retrain", "summarize"}
    assert results["store"] == str(tmp / "store")  # from the worker's environment, at run time
    for key in results["poisons"].values():
        assert (tmp / "store" / key).is_file()
    run_id = results["mlflow"]["run_id"]
    assert run_id and results["mlflow"]["tracking_uri"] == f"sqlite:///{tmp / 'mlflow.db'}"
    with sqlite3.connect(tmp / "mlflow.db") as db:
        assert db.execute("select status, name from runs where run_uuid = ?", (run_id,)).fetchone() == (
            "FINISHED", "quickstart")
    assert any(a.flow_run_id == run.id and run_id in (a.data or "") for a in artifacts)
    report = subprocess.run([sys.executable, "-m", "belladonna.cli", "report", str(tmp / "runs" / "quickstart")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "badnets" in report.stdout, report.stderr


AUTOMATION = ROOT / "infra" / "prefect" / "notify_on_regression.yaml"
MOVED = 1000.0  # far outside ASR's range: significant after Holm whatever the two seeds' spread


def _gate_events(client, name: str) -> list:
    """The ``belladonna.regression`` events of benchmark `name` the server has stored (a fresh filter each
    call: its `until` defaults to the time it is made)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["belladonna.regression"]),
                                                 resource=EventResourceFilter(id=[f"belladonna.benchmark.{name}"])),
                              limit=50)  # the client's default (100) is over the server's maximum (50)
    return list(page.events)


def test_a_second_run_is_compared_with_the_first_and_its_regression_event_reaches_the_automation(stack):
    """The gate on the server: the notification automation registered with the real CLI and read back;
    `prefect deployment run` starts a second run of the nightly deployment (its `compare_to: previous`);
    the first run's record is made to look better first (its BadNets ASR lowered by MOVED in every seed),
    so the second, which reuses every stored stage and measures the same, has a regression: it ends
    Completed, its results.json in the history names the first run as its base with the ASR `worse`,
    the Prefect artifact holds the comparison, the event is stored with its label and links to the
    flow run, and the registered automation fires on it."""
    from tasks.run_history import run_ids

    tmp, procs, env = stack["tmp"], stack["procs"], stack["env"]
    bench = tmp / "runs" / "quickstart"
    first = run_ids(bench)
    assert len(first) == 1, f"needs the scheduled run of the test before (runs in {bench}: {first})"
    created = subprocess.run([*PREFECT, "automation", "create", "--from-file", str(AUTOMATION)], env=env, cwd=tmp,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    shown = subprocess.run([*PREFECT, "automation", "inspect", "belladonna-notify-on-regression", "--json"],
                           env={**env, "COLUMNS": "1000"}, cwd=tmp, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    listed = json.loads(shown.stdout)  # every automation of that name: registered once
    assert len(listed) == 1, listed
    automation = listed[0]
    assert automation["enabled"] and automation["trigger"]["expect"] == ["belladonna.regression"], automation
    assert automation["trigger"]["match"] == {"prefect.resource.id": "belladonna.benchmark.*",
                                              "belladonna.worse": "true"}, automation

    record = bench / first[0] / "results.json"
    base = json.loads(record.read_text())
    moved = [r for r in base["rows"] if r["attack"] == "badnets" and isinstance(r.get("asr"), float)]
    assert moved, base["rows"]
    for row in moved:
        row["asr"] -= MOVED
    record.write_text(json.dumps(base))

    started = subprocess.run([*PREFECT, "deployment", "run", "benchmark/nightly", "--tag", "gate-check"], env=env,
                             cwd=tmp, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with _client(stack["api"]) as client:
        def finished():
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["gate-check"])))
            return runs[0] if len(runs) == 1 and runs[0].state.is_final() else None

        try:
            run = _wait("the worker to finish the second run", finished, timeout=900, every=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker ---\n{procs.tail('worker')}") from None
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{procs.tail('worker')}"
        events = _wait("the belladonna.regression event", lambda: _gate_events(client, "quickstart"), timeout=120)
        artifacts = client.read_artifacts()
        automation_id = client.read_automations_by_name("belladonna-notify-on-regression")[0].id

        def fired():
            from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

            return client.read_events(filter=EventFilter(
                event=EventNameFilter(name=["prefect.automation.action.executed"]),
                resource=EventResourceFilter(id=[f"prefect.automation.{automation_id}"])), limit=50).events

        actions = _wait("the automation to act on the event", fired, timeout=120)

    runs = run_ids(bench)
    assert len(runs) == 2 and runs[0] == first[0] and (bench / "latest").read_text().strip() == runs[1]
    second = json.loads((bench / runs[1] / "results.json").read_text())
    assert second["prefect"]["flow_run_id"] == str(run.id)
    comparison = second["comparison"]
    assert comparison["base"]["run_id"] == first[0] and comparison["new"]["run_id"] == runs[1]
    assert comparison["regression"] and comparison["counts"]["worse"] == 1, comparison["counts"]
    worse = next(e for e in comparison["entries"] if e["verdict"] == "worse")
    assert (worse["attack"], worse["defense"], worse["metric"]) == ("badnets", "none", "asr"), worse
    assert abs(worse["diff"] - MOVED) < 1e-6, worse
    assert {e["verdict"] for e in comparison["entries"] if e is not worse} == {"no significant change"}
    assert any(a.flow_run_id == run.id and a.key == "quickstart-comparison" and "badnets" in (a.data or "")
               for a in artifacts), [(a.key, a.flow_run_id) for a in artifacts]

    assert len(events) == 1, events
    event = events[0]
    assert event.resource["belladonna.worse"] == "true" and event.resource["prefect.resource.name"] == "quickstart"
    assert event.payload["run_id"] == runs[1] and event.payload["base_run_id"] == first[0], event.payload
    assert event.payload["counts"]["worse"] == 1 and event.payload["worse"] == ["badnets/none/asr"], event.payload
    assert f"prefect.flow-run.{run.id}" in {r.id for r in event.related}, event.related  # emitted by the run
    triggering = {r.id for a in actions for r in a.related if r.role == "triggering-event"}
    assert f"prefect.event.{event.id}" in triggering, actions  # the automation acted on this very event


def test_deployment_run_with_a_bad_config_fails_fast_with_one_line_and_writes_nothing(stack):
    tmp, procs = stack["tmp"], stack["procs"]
    bad = tmp / "bad"
    params = {"config": BAD_CONFIG, "run_dir": str(bad / "runs"), "store": str(bad / "store"),
              "tracking_uri": f"sqlite:///{bad / 'mlflow.db'}"}
    with _client(stack["api"]) as client:
        deployment = client.read_deployment_by_name("benchmark/nightly")
        created = client.create_flow_run_from_deployment(deployment.id, parameters=params)

        def finished():
            run = client.read_flow_run(created.id)
            return run if run.state.is_final() else None

        try:
            run = _wait("the bad run to end", finished, timeout=300, every=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker ---\n{procs.tail('worker')}") from None
    assert run.state.is_failed(), f"{run.state.name}: {run.state.message}"
    message = run.state.message or ""
    assert len(message.strip().splitlines()) == 1 and "unknown attack 'nosuch'" in message, message
    assert run.total_run_time.total_seconds() < 30, run.total_run_time  # the flow body: preflight only
    assert not bad.exists()
