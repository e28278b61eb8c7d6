"""`belladonna run` prints its whole wall time last, and reuses standing services.

The printed total must be what a user's clock shows for the command (process start to exit, Prefect's
temporary server, Ray's start and stop included), not the flow's part only; and `belladonna services
start` leaves a Prefect server and a Ray head that later runs on the same folder use, which `services
stop` stops, process by recorded PID.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from belladonna.lifecycle import reaper

TINY = """
name: tiny
dataset: {name: digits, n_train: 300, n_test: 100}
victim:
  model: {name: mlp, width: 32}
  train: {epochs: 2, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - name: badnets
seeds: [3]
"""
LINE = re.compile(r"^wall time (\d+\.\d)s \(start-up (\d+\.\d)s, flow (\d+\.\d)s, report (\d+\.\d)s, "
                  r"teardown (\d+\.\d)s\)$")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
       "MLFLOW_DISABLE_TELEMETRY": "true"}
for _name in ("PREFECT_API_URL", "RAY_ADDRESS"):
    ENV.pop(_name, None)


def belladonna(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command; returns it and its wall seconds from Popen to exit."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    return proc, time.monotonic() - start


def printed(proc: subprocess.CompletedProcess) -> tuple[float, ...]:
    """(total, start-up, flow, report, teardown) from the last line, which must be the wall-time line."""
    last = proc.stdout.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, f"last line is not the wall time: {last!r}"
    return tuple(float(g) for g in match.groups())


def task_runs(api: str, flow_run: str, wait: float = 20.0) -> set[str]:
    """The task names of `flow_run`'s completed task runs (the server records them from the events the
    command sent before it ended), waiting up to `wait` s for the server's recorder."""
    body = json.dumps({"task_runs": {"flow_run_id": {"any_": [flow_run]}}}).encode()
    deadline, names = time.monotonic() + wait, set()
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{api}/task_runs/filter", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            names = {run["name"].split("-")[0] for run in json.loads(response.read()) if run["state_type"] == "COMPLETED"}
        if {"ingest", "summarize"} <= names:
            break
        time.sleep(0.5)
    return names


@pytest.mark.slow
def test_printed_time_is_the_whole_command_wall_time(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    proc, wall = belladonna("run", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    total, startup, flow, report, teardown = printed(proc)
    assert abs(total - wall) <= 1.0, (total, wall)
    results = json.loads((tmp_path / "out" / "tiny" / "results.json").read_text())
    assert total >= flow >= results["seconds"] - 0.05
    assert abs(startup + flow + report + teardown - total) <= 0.25
    assert startup > 0 and teardown > 0


@pytest.mark.slow
def test_standing_services_are_used_by_later_runs_and_stopped_by_pid(tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    started, _ = belladonna("services", "start", "--out", str(out), timeout=300)
    record = json.loads((out / "services" / "services.json").read_text())["services"]
    try:
        assert started.returncode == 0, started.stderr
        status, _ = belladonna("services", "status", "--out", str(out))
        assert status.returncode == 0 and "prefect answers" in status.stdout and "ray answers" in status.stdout
        port = record["ray"]["address"].rsplit(":", 1)[1]  # `ray start` would make every ray.init() here join it
        default = Path("/tmp/ray/ray_current_cluster")
        assert not default.exists() or not default.read_text().endswith(f":{port}")
        assert (Path(record["ray"]["temp_dir"]) / "ray_current_cluster").read_text().endswith(f":{port}")
        for _ in range(2):  # fresh, then everything reused
            proc, wall = belladonna("run", str(config), "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            assert record["prefect"]["url"] in proc.stdout and record["ray"]["address"] in proc.stdout
            assert abs(printed(proc)[0] - wall) <= 1.0
        flow_run = json.loads((out / "tiny" / "results.json").read_text())["prefect"]["flow_run_id"]
        api = record["prefect"]["url"]
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run}", timeout=10) as response:
            assert json.loads(response.read())["state_type"] == "COMPLETED"
        assert {"ingest", "craft", "retrain", "evaluate", "summarize"} <= task_runs(api, flow_run)
        tree = {p: s for entry in record.values() for p, s in
                {entry["pid"]: entry["start"], **reaper.descendants(entry["pid"])}.items()}
        assert len(tree) > 2  # uvicorn's server, Ray's GCS, raylet, agents
    finally:
        stopped, _ = belladonna("services", "stop", "--out", str(out), timeout=120)
    assert stopped.returncode == 0 and "prefect" in stopped.stdout and "ray" in stopped.stdout
    assert not [p for p, s in tree.items() if reaper.start_time(p) == s]
    assert not (out / "services" / "services.json").exists()
    assert not Path(record["ray"]["temp_dir"]).exists()
    again, _ = belladonna("services", "status", "--out", str(out))
    assert again.returncode == 1 and "no standing services" in again.stdout
