"""Commands started at once on a fresh machine: each starts its own Prefect server on the same
PREFECT_HOME, and a server migrates the shared SQLite database when it starts. Without the start lock
two of four concurrent `belladonna run` failed ("the local Prefect server ... did not answer", the
server's log: alembic's "Online migration expected to match one row"). Here three real servers start
at once on a fresh home, through the code `belladonna run` uses; every one must answer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from belladonna.lifecycle.reaper import descendants, kill_recorded
from belladonna.lifecycle.start_lock import START_LOCK, StartLock
from tests.pipeline_helpers import QUIET

ROOT = Path(__file__).resolve().parents[1]
START = """
import os, time
from pathlib import Path
from belladonna.lifecycle.services import Services
services = Services()
services.start_prefect(Path(os.environ["PREFECT_HOME"]), wait_s=240)
try:
    services.wait()
    deadline = time.monotonic() + 10
    while services.start_lock.file is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    print("answered; lock released:", services.start_lock.file is None, flush=True)
finally:
    services.stop()
"""


def test_the_lock_is_exclusive_and_released_on_close(tmp_path):
    first, second = StartLock(tmp_path / "home"), StartLock(tmp_path / "home")
    assert first.try_acquire() and (tmp_path / "home" / START_LOCK).is_file()
    assert not second.try_acquire()
    started = time.monotonic()
    second.acquire(0.5)  # bounded: goes on without the lock
    assert time.monotonic() - started < 5
    first.release()
    assert second.try_acquire()
    second.release()


@pytest.mark.slow
def test_three_servers_started_at_once_on_a_fresh_home_all_answer(tmp_path):
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    procs = [subprocess.Popen([sys.executable, "-c", START], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(3)]
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for p in procs:
                seen.update(descendants(p.pid))
            time.sleep(0.2)
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        kill_recorded(seen)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and out.startswith("answered; lock released: True"), out + err[-3000:]
    assert (tmp_path / "prefect-home" / "prefect.db").is_file()
