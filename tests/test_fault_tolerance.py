"""A benchmark survives being SIGKILLed and its object store going away: nothing half-written,
bounded retries then a clear exit 1, and a rerun that recomputes only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from belladonna.lifecycle.reaper import descendants, kill_recorded
from infra.storage import Store
from poison_core.config import load_benchmark
from tests.pipeline_helpers import QUIET, audit_store
from tests.s3server import bucket_env, start_moto

LONGER = """
name: fault
dataset: {name: digits, seed: 0}
victim:
  model: {name: convnet, width: 16}
  train: {epochs: 6, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - {name: badnets}
  - {name: label_flip, threat: {epsilon: 0, budget: 0.2}}
seeds: [0, 1, 2]
"""
TOTAL = {"ingest": 1, "pretrain": 0, "craft": 6, "retrain": 9, "evaluate": 6}


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "belladonna.cli", *args], env={**os.environ, **QUIET, **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before the fault could be injected"
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the run to reach the fault point")


def _kill(proc: subprocess.Popen) -> dict[int, int]:
    """SIGKILL a run we started (its process group) and return the descendants it had (PID, start time)."""
    recorded = descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return recorded


def _stop(proc: subprocess.Popen, recorded: dict[int, int] | None = None) -> None:
    """Stop what is left of a run we started, by PID: never another user's Ray (no `ray stop`)."""
    recorded = {**(recorded or {}), **_kill(proc)}
    deadline = time.monotonic() + 30  # the run's own watcher stops them first (belladonna.lifecycle.reaper)
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in recorded):
        time.sleep(0.2)
    kill_recorded(recorded)


@pytest.mark.slow
def test_sigkill_mid_benchmark_then_rerun_recomputes_only_the_missing(tmp_path):
    config = tmp_path / "fault.yaml"
    config.write_text(LONGER)
    out, store = tmp_path / "out", Store(str(tmp_path / "out" / "store"))
    proc = _start(["run", str(config), "--out", str(out)], {}, tmp_path / "first.log")
    recorded: dict[int, int] = {}
    try:
        _wait_until(lambda: 2 <= len(store.list("models")) < 9, 900, proc)
        recorded = _kill(proc)
    finally:
        _stop(proc, recorded)
    assert proc.returncode == -signal.SIGKILL
    before = audit_store(store, load_benchmark(config))
    assert 2 <= before["models"] < TOTAL["retrain"]
    rerun = _start(["run", str(config), "--out", str(out)], {}, tmp_path / "rerun.log")
    try:
        rerun.wait(timeout=1500)
    finally:
        _stop(rerun)
    assert rerun.returncode == 0, (tmp_path / "rerun.log").read_text()[-2000:]
    computed = json.loads((out / "fault" / "results.json").read_text())["computed"]
    assert computed["retrain"] == TOTAL["retrain"] - before["models"]
    assert computed["craft"] == TOTAL["craft"] - before["poisons"]
    assert computed["evaluate"] == TOTAL["evaluate"] - before["cells"]
    after = audit_store(store, load_benchmark(config))
    assert after == {"datasets": 2, "poisons": 6, "models": 9, "cells": 6, "records": 22}  # one record per slot


@pytest.mark.slow
def test_s3_server_stopped_mid_run_fails_cleanly_then_rerun_completes(tmp_path):
    moto = start_moto()
    port = int(moto.endpoint.rsplit(":", 1)[1])
    bucket = moto.create_bucket()
    env = bucket_env(moto.endpoint, bucket)
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    config = tmp_path / "fault.yaml"
    config.write_text(LONGER)
    args = ["run", str(config), "--out", str(tmp_path / "out")]
    proc = _start(args, env, tmp_path / "first.log")
    restarted = None
    try:
        _wait_until(lambda: s3.list_objects_v2(Bucket=bucket, Prefix="store/datasets/").get("KeyCount", 0) >= 2,
                    900, proc)
        moto.stop()
        code = proc.wait(timeout=600)
        log = (tmp_path / "first.log").read_text()
        assert code == 1, log[-3000:]
        lines = [line for line in log.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in log, log[-3000:]  # the traceback went to the log file
        assert lines[0].startswith("failed: StorageError:") and bucket in lines[0], lines[0]
        named = Path(lines[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
        assert "Traceback" in named.read_text() and "StorageError" in named.read_text()
        restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        restarted.start()  # moto keeps its objects in this process, so the stored datasets are still there
        rerun = _start(args, env, tmp_path / "rerun.log")
        rerun.wait(timeout=1500)
        _stop(rerun)
        assert rerun.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
        computed = json.loads((tmp_path / "out" / "fault" / "results.json").read_text())["computed"]
        assert computed["ingest"] == 0 and computed["evaluate"] == TOTAL["evaluate"]
    finally:
        _stop(proc)
        if restarted is not None:
            restarted.stop()
