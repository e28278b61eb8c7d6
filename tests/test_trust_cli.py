"""Trust nothing read back, through the real CLI: a PoisonSet whose metadata was edited is
refused by `belladonna audit` and inside a run; Ctrl-C stops a run within seconds with exit 130 and
it resumes; a SIGKILLed driver leaves no process behind. Every process is found as a descendant of
a CLI this test started, and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from belladonna.lifecycle.reaper import descendants, kill_recorded, start_time
from infra.storage import Store
from poison_core.config import load_benchmark
from poison_core.io import table_to_bytes, tmp_name
from tasks import stages
from tests.pipeline_helpers import QUIET

BENCH = """
name: trusted
dataset: {name: digits, n_train: 300, n_test: 100, seed: 0}
victim: {model: {name: convnet, width: 8}, train: {epochs: 2, batch_size: 64}}
threat: {epsilon: 8, budget: 0.05, clean_label: true}
attacks: [{name: random_noise}]
seeds: [0, 1]
"""
SLOW = BENCH.replace("epochs: 2", "epochs: 30").replace("seeds: [0, 1]", "seeds: [0, 1, 2, 3]")


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "belladonna.cli", *args], env={**os.environ, **QUIET},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = _cli(*args)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _stop_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop what is left of a CLI we started: its descendants by PID, then the CLI itself."""
    kill_recorded(descendants(proc.pid))
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, seen: dict[int, int]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.update(descendants(proc.pid))
        if predicate():
            return
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=60)
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the fault could be injected:\n"
                                 f"{err[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run to reach the fault point")


def _alive(recorded: dict[int, int], timeout: float) -> list[int]:
    """The recorded processes still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p, start in recorded.items() if start_time(p) == start]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


@contextmanager
def _mid_run(tmp_path: Path) -> Iterator[tuple[Path, Path, Store, subprocess.Popen, dict[int, int]]]:
    """A slow benchmark started through the CLI, once its first victim is stored; afterwards whatever
    it left is stopped by PID. Yields (config, out, store, CLI process, its descendants seen so far)."""
    config, out = tmp_path / "slow.yaml", tmp_path / "out"
    config.write_text(SLOW)
    store = Store(str(out / "store"))
    proc = _cli("run", str(config), "--out", str(out))
    seen: dict[int, int] = {}
    try:
        _wait_for(lambda: len(store.list("models")) >= 1, 600, proc, seen)
        yield config, out, store, proc, seen
    finally:
        kill_recorded(seen)
        _stop_tree(proc)


def forge(path: Path) -> None:
    """Edit a stored PoisonSet as an attacker with write access would: metadata to epsilon 255, budget 1,
    dirty-label; 20 pixels rows moved by 120 and their labels flipped."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    threat = json.loads(meta[b"belladonna.threat"])
    threat.update(epsilon=255, budget=1.0, clean_label=False)
    meta[b"belladonna.threat"] = json.dumps(threat).encode()
    width = table.schema.field("image").type.list_size
    images = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, width)
    images = np.clip(images.astype(int) + 120, 0, 255).astype(np.uint8)
    labels = ((table.column("orig_label").to_numpy() + 1) % 10).astype(np.int16)
    forged = table.set_column(1, "image", pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), width))
    forged = forged.set_column(3, "poison_label", pa.array(labels, pa.int16()))
    path.write_bytes(table_to_bytes(forged.replace_schema_metadata(meta)))


@pytest.mark.slow
def test_forged_poison_set_is_refused_by_audit_and_inside_a_run(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(BENCH)
    out = tmp_path / "out"
    first = _run("run", str(config), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    key = json.loads((out / "trusted" / "results.json").read_text())["poisons"]["random_noise/seed0"]
    path = out / "store" / key
    ok = _run("audit", str(path), str(config))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 15 poisons"), ok.stdout + ok.stderr
    forge(path)
    audit = _run("audit", str(path), str(config))
    assert audit.returncode == 2 and _lines(audit.stderr) == [
        f"error: {path}: recorded threat model differs from the expected one: epsilon 255 (expected 8), "
        "budget 1.0 (expected 0.05), clean_label False (expected True)"], audit.stderr
    store = Store(str(out / "store"))
    for stale in store.list("models") + store.list("cells"):  # the victims are retrained on what is stored
        store.delete(stale)
    rerun = _run("run", str(config), "--out", str(out))
    lines = _lines(rerun.stderr)
    assert rerun.returncode == 2 and len(lines) == 1, rerun.stderr[-3000:]
    assert lines[0].startswith("error: ") and key in lines[0] and "recorded threat model differs" in lines[0]
    assert "Traceback" not in rerun.stdout + rerun.stderr
    cfg = load_benchmark(config)
    prefix = stages.dataset_prefix(cfg.dataset)
    clean = {stages.model_key(cfg, prefix, cfg.defenses[0], seed, None) for seed in cfg.seeds}
    assert set(store.list("models")) <= clean  # no victim was trained on the forged poisons


@pytest.mark.slow
def test_ctrl_c_stops_within_seconds_exits_130_and_the_rerun_resumes(tmp_path):
    with _mid_run(tmp_path) as (config, out, store, proc, seen):
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - start
        left = _alive(seen, 30)
    assert proc.returncode == 130, err[-3000:]
    assert stopped_in < 45, f"took {stopped_in:.1f} s to stop"  # it took ~80 s when Prefect unwound the interrupt
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIGINT"), err[-3000:]
    assert left == []
    assert not [p for p in (out / "store").rglob("*") if p.is_file() and ".tmp-" in p.name]
    done = len(store.list("models"))
    rerun = _run("run", str(config), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    computed = json.loads((out / "trusted" / "results.json").read_text())["computed"]
    assert computed["retrain"] == 8 - done


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_the_driver_as_ctrl_c_does(tmp_path, signum):
    """kill (SIGTERM) or a closed terminal (SIGHUP) sent to the driver alone, while ray.get waits: the
    same clean stop as Ctrl-C. Ray's ray.init replaced SIGTERM's handler with sys.exit, which ended as
    "failed: SystemError: ... returned a result with an exception set", exit 1."""
    with _mid_run(tmp_path) as (_, out, _, proc, seen):
        planted = Path(tmp_name(str(out / "store" / "records" / "cut-short.json")))
        planted = planted.with_name(planted.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
        planted.write_bytes(b"half")  # as if the driver's own write were cut short by the signal
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=90)
        left = _alive(seen, 45)
    lines = _lines(err)
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: stopped by {signum.name}"), err[-3000:]
    assert "SystemError" not in err and left == []
    assert not [p for p in (out / "store").rglob("*") if p.is_file() and ".tmp-" in p.name]


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_process_behind(tmp_path):
    with _mid_run(tmp_path) as (_, _, _, proc, seen):
        seen.update(descendants(proc.pid))
        assert len(seen) >= 4, seen  # the watcher, Prefect's server, Ray's processes
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its children are orphaned
        proc.wait(timeout=60)
        left = _alive(seen, 45)
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left if Path(f"/proc/{p}").exists()]
