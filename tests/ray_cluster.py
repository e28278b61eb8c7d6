"""A local Ray cluster for the tests: nodes on 127.0.0.1 started with `ray start --block`, each in its
own temp dir (so no address-less ray.init() elsewhere on the machine joins it through
/tmp/ray/ray_current_cluster), and every process stopped by its PID and start time, never by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from belladonna.lifecycle.reaper import descendants, kill_recorded

RAY = shutil.which("ray")
NOT_INHERITED = ("BELLADONNA_", "MLFLOW_TRACKING", "AWS_", "RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_HOME")
QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
START_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything a job could find its store, tracking server or
    credentials in; plus the quiet-services defaults and `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}, **QUIET, **extra}


def launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `args` in a session of its own (no terminal signal reaches it), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM `process`, wait up to `grace` s, then SIGKILL whatever of its process tree is left (by PID
    and start time: only processes it started)."""
    tree = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
        time.sleep(0.2)
    kill_recorded(tree)


def wait_for(what: str, check, timeout: float, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Poll `check()` until it is true; fail naming `what` (with the logs' tails) after `timeout` s or
    as soon as one of `processes` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):  # not listening yet, or an answer of a half-started server
            pass
        time.sleep(0.5)
    tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"{what} not ready within {timeout:g} s\n{tails}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    logs: list[Path]


@contextmanager
def local_cluster(n_nodes: int = 2, env: dict[str, str] | None = None, head_cpus: int = 1) -> Iterator[Cluster]:
    """A head (`head_cpus` CPUs, dashboard) and `n_nodes` - 1 workers (1 CPU each) on 127.0.0.1, each
    `ray start --block` from `env` (default: :func:`clean_env`); all stopped by PID on the way out.
    head_cpus=0 is the head of infra/ray/cluster.yaml and infra/kuberay: it runs drivers, no jobs."""
    root = Path(tempfile.mkdtemp(prefix="bd-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    port, dash = free_port(), free_port()
    env = clean_env() if env is None else env
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
    logs = [root / "head.log"]
    nodes = [launch([RAY, "start", "--head", f"--port={port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--temp-dir={root / 'h'}", f"--num-cpus={head_cpus}", *common], logs[0], env)]
    try:
        url = f"http://127.0.0.1:{dash}"
        wait_for("the head's dashboard", lambda: get_json(f"{url}/api/version"), START_S, nodes, logs)
        for i in range(1, n_nodes):
            logs.append(root / f"worker{i}.log")
            nodes.append(launch([RAY, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={root / f'w{i}'}",
                                 f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=1", *common],
                                logs[-1], env))

        def all_alive() -> bool:
            found = get_json(f"{url}/api/v0/nodes?limit=10")["data"]["result"]["result"]
            return sum(n["state"] == "ALIVE" for n in found) == n_nodes

        wait_for(f"{n_nodes} alive nodes", all_alive, START_S, nodes, logs)
        yield Cluster(f"127.0.0.1:{port}", url, logs)
    finally:
        import ray

        ray.shutdown()
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(root, ignore_errors=True)
