"""The process lifecycle uses the tools' public interfaces only.

A guard over the source: the private names the lifecycle once relied on (a by-hand run of the exit
handlers, Ray's private ``ray.init`` argument and job-config variable, Prefect's worker drains and
settings refresh, MLflow's telemetry setter) must not come back in the code that ships. The
behaviours they served are tested end to end elsewhere (test_cli_timing, test_trust_cli,
test_ray_job_submit) and below, with real processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from belladonna.lifecycle import reaper

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("belladonna", "flows", "tasks", "infra")
PRIVATE = ("_run_exitfuncs", "_node_ip_address", "RAY_JOB_CONFIG_JSON_ENV_VAR", "drain_all",
           "refresh_global_settings_context", "set_telemetry_client")


def private_uses(root: Path) -> list[str]:
    """``path:line: name`` for each private name found in the Python files under `root`'s shipped packages."""
    pattern = re.compile("|".join(re.escape(name) for name in PRIVATE))
    found = []
    for package in SHIPPED:
        for path in sorted((root / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for match in pattern.finditer(line):
                    found.append(f"{path.relative_to(root)}:{number}: {match.group()}")
    return found


def test_no_private_tool_api_in_the_shipped_code():
    assert private_uses(ROOT) == []


def test_the_guard_finds_a_private_name(tmp_path):
    """The guard itself can fail: a copy of the tree with one private call planted is reported."""
    for package in SHIPPED:
        (tmp_path / package).mkdir()
    (tmp_path / "infra" / "planted.py").write_text("import atexit\n\natexit._run_exitfuncs()\n")
    (tmp_path / "belladonna" / "ok.py").write_text("import atexit\n\natexit.register(print)\n")
    assert private_uses(tmp_path) == ["infra/planted.py:3: _run_exitfuncs"]


def test_stop_tree_stops_a_process_tree_it_recorded(tmp_path):
    """reaper.stop_tree: SIGTERM for the recorded processes (a child that ignores it is SIGKILLed after
    the grace period), SIGKILL at once for those named; nothing of the tree is left."""
    script = textwrap.dedent("""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"],
            stdout=sys.stdout)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        recorded = reaper.tree(parent.pid)
        assert len(recorded) == 2 and parent.pid in recorded
        reaper.stop_tree(recorded, timeout=2.0, kill=frozenset())
        parent.wait(timeout=30)
        assert not [p for p, s in recorded.items() if reaper.start_time(p) == s]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.slow
def test_a_run_leaves_no_ray_head_and_no_prefect_server_behind(tmp_path):
    """A run's own services (``prefect server start``, ``ray start --head``) are its children while it
    runs and are gone when it has exited, its Ray temp dir removed; its last line is the wall time."""
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent("""
        name: tiny
        dataset: {name: digits, n_train: 300, n_test: 100}
        victim:
          model: {name: mlp, width: 32}
          train: {epochs: 1, batch_size: 64}
        threat: {epsilon: 255, budget: 0.05}
        attacks:
          - name: badnets
        seeds: [3]
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "belladonna.cli", "run", str(config), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: dict[int, int] = {}
    heads: set[str] = set()
    try:
        while proc.poll() is None:  # bounded by the run itself; communicate() below has the timeout
            for pid, start in reaper.descendants(proc.pid).items():
                seen[pid] = start
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                heads.update(a.decode() for a in cmd if a.startswith(b"--temp-dir=") and b"belladonna-ray-" in a)
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            reaper.kill_recorded({**reaper.descendants(proc.pid), proc.pid: reaper.start_time(proc.pid) or 0})
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1].startswith("wall time "), out[-2000:]
    assert heads, "no `ray start --head` with a temp dir of the run's own was seen"
    for head in heads:
        assert not Path(head.split("=", 1)[1]).exists()
    reaper.wait_gone(seen, 30)  # the watcher's grace period, on a loaded machine
    assert not [p for p, s in seen.items() if reaper.start_time(p) == s]
