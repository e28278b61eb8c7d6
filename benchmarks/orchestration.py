"""Orchestration overhead of the benchmark flow on the quick-start (digits, 2 attacks, 2 seeds).

Two measurements, each on a fresh store and run folder:

* ``quickstart_cli``: ``belladonna run`` as a user runs it (a new process, Ray on every core): the
  process's wall time, the flow's wall time and the core compute its jobs report;
* ``quickstart_cli_with_server``: the same against a Prefect server that is already running, as the
  nightly deployment runs;
* ``flow_one_core``: the same flow called in this process, pinned with Ray to one core so that its
  jobs run one after another: its wall time minus the sum of its jobs' core compute is what
  Prefect, Ray, the store and MLflow cost, nothing hidden by parallelism.

Core compute is the time inside the poison_core call of each job (dataset loading, surrogate and
victim training, crafting, evaluation), as the stages report it (:class:`tasks.stages.StageOutput`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _row(case: str, wall: float, flow: float, compute: dict[str, float], cores: int) -> dict[str, Any]:
    """startup: wall time outside the flow's stages (imports, Ray and Prefect server start, flow-run
    creation); in-flow overhead: the stages' wall time beyond their jobs' core compute (spread over
    `cores`)."""
    total = sum(compute.values())
    in_flow = max(0.0, flow - total / cores)
    return {"case": case, "process_wall_s": round(wall, 2), "startup_s": round(wall - flow, 2),
            "flow_stages_s": round(flow, 2), "core_compute_s": round(total, 2), "in_flow_overhead_s": round(in_flow, 2),
            "in_flow_overhead_pct": round(100 * in_flow / wall, 1),
            "startup_pct": round(100 * (wall - flow) / wall, 1)}


def quickstart_cli(case: str = "quickstart_cli", env: dict[str, str] | None = None) -> dict[str, Any]:
    """`belladonna run` in a new process; overhead = flow wall - core compute / cores (a lower bound
    when the jobs are not perfectly balanced over the cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "belladonna.cli", "run", "--out", tmp], check=True,
                       capture_output=True, timeout=600, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
        result = json.loads((Path(tmp) / "quickstart" / "results.json").read_text())
    flow = sum(result["stage_seconds"].values())
    return _row(case, wall, flow, result["compute_seconds"], len(os.sched_getaffinity(0)))


def quickstart_cli_with_server(timeout: float = 90.0) -> dict[str, Any]:
    """`belladonna run` against a Prefect server that is already running (PREFECT_API_URL set), as
    the nightly deployment runs: no ephemeral server to start per run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            api = f"http://127.0.0.1:{port}/api"
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"prefect server on port {port} did not answer within {timeout:.0f} s")
                time.sleep(0.5)
            return quickstart_cli("quickstart_cli_with_server", {"PREFECT_API_URL": api, "PREFECT_HOME": home})
        finally:
            server.terminate()
            server.wait(timeout=30)


def flow_one_core() -> dict[str, Any]:
    """The quick-start flow in this process with Ray on one pinned core."""
    import ray

    from belladonna.cli import QUICKSTART, _preset_text, _quiet_services
    from flows.benchmark import benchmark

    _quiet_services()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:1])
    ray.shutdown()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1")
            result = benchmark(config=_preset_text(QUICKSTART), store=str(Path(tmp) / "store"), run_dir=tmp)
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, cores)
    flow = sum(result["stage_seconds"].values())
    row = _row("flow_one_core", wall, flow, result["compute_seconds"], 1)
    compute = result["compute_seconds"]
    row["per_stage_overhead_s"] = {k: round(v - compute.get(k, 0.0), 2) for k, v in result["stage_seconds"].items()}
    return row


def orchestration() -> list[dict[str, Any]]:
    """Both rows; see the module docstring."""
    rows = [quickstart_cli(), quickstart_cli_with_server(), flow_one_core()]
    for row in rows:
        log.info("orchestration %s", row)
    return rows
