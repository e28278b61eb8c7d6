"""The MLflow database of a run folder: damaged (before a run, as `--tracking-uri`, between two stages of a run)
it is one line naming the file, exit 2, nothing written; moved or copied, no artifact lands in the old folder.

The fast cases open a real MLflow SQLite store through infra.tracking.Tracker and run `belladonna compare` in
this process; the slow ones run `belladonna run` as a subprocess (a real Prefect server, a local Ray instance),
record every process it starts (PID and start time) while it runs, and check none is left after it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infra.tracking import Tracker
from poison_core.errors import InputError
from tests.test_hostile_input import refused

ROOT = Path(__file__).resolve().parent.parent
TINY = ("name: tiny\ndataset: {name: digits, n_train: 120, n_test: 40}\nvictim: {train: {epochs: 1}}\n"
        "attacks: [{name: label_flip, threat: {epsilon: 0, budget: 0.2, clean_label: false}}]\n"
        "defenses: [{name: none}]\nseeds: [0]\n")
RUN_TIMEOUT_S = 600


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def damage(db: Path, how: str) -> None:
    """Damage a real MLflow database in place: `truncated` (half of it), `garbage` (every page after the
    first overwritten, header and size intact: only SQLite's own check sees it), `not-sqlite`."""
    data = bytearray(db.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        rng = random.Random(0)
        data[4096:] = bytes(rng.randrange(256) for _ in range(len(data) - 4096))
    else:
        data = bytearray(b"this is not a database\n" * 100)
    db.write_bytes(bytes(data))


def _logged(folder: Path) -> Path:
    """A run folder with a real MLflow database holding one run with an artifact."""
    tracker = Tracker(experiment="tiny", run_dir=folder)
    with tracker.parent_run("first"):
        tracker.log_text("one", "notes/first.md")
    return folder / "mlflow.db"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["truncated", "garbage", "not-sqlite"])
def test_a_damaged_database_is_one_line_naming_it_before_mlflow_opens_it(how, tmp_path):
    db = _logged(tmp_path / "runs")
    damage(db, how)
    before = _tree(tmp_path / "runs")
    with pytest.raises(InputError) as info:
        Tracker(experiment="tiny", run_dir=tmp_path / "runs")
    line = str(info.value)
    assert "\n" not in line and str(db) in line and "move it aside" in line and "MLFLOW_TRACKING_URI" in line, line
    assert ("not an SQLite database" if how == "not-sqlite" else "damaged") in line, line
    assert "SELECT" not in line and "sqlalche.me" not in line
    assert _tree(tmp_path / "runs") == before  # nothing written, not even a journal


def test_a_database_left_by_a_killed_writer_is_not_called_damaged(tmp_path):
    """A run killed in the middle of an MLflow write leaves a hot journal beside the database: SQLite rolls
    it back on the next writable open, so the check (read-only) must let it through, and MLflow opens it."""
    db = _logged(tmp_path / "runs")
    writer = sqlite3.connect(tmp_path / "writer.db")
    writer.execute("create table t (x)")
    writer.executemany("insert into t values (?)", [("a" * 500,)] * 200)
    writer.commit()
    writer.execute("pragma cache_size = 1")  # spill to the file mid-transaction, as a big write does
    writer.execute("begin")
    writer.execute("update t set x = 'b'")
    shutil.copyfile(tmp_path / "writer.db", db)  # the database and its journal as a SIGKILL leaves them
    shutil.copyfile(tmp_path / "writer.db-journal", f"{db}-journal")
    writer.close()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as probe, pytest.raises(sqlite3.OperationalError):
        probe.execute("pragma quick_check").fetchall()  # what a read-only check meets
    from infra.local_checks import check_tracking_uri

    check_tracking_uri(f"sqlite:///{db}")  # no InputError
    assert sqlite3.connect(db).execute("select count(*) from t").fetchone() == (200,)  # rolled back, whole


def test_compare_with_a_damaged_tracking_uri_is_one_line(tmp_path, monkeypatch, capfd):
    db = _logged(tmp_path / "runs")
    damage(db, "garbage")
    capfd.readouterr()  # MLflow's own lines while the database was made
    line = refused(["compare", f"runs:/{'0' * 32}", f"runs:/{'1' * 32}", "--out", str(tmp_path / "runs"),
                    "--tracking-uri", f"sqlite:///{db}"], monkeypatch, capfd)
    assert str(db) in line and "damaged" in line and "--tracking-uri" in line, line


def test_a_damaged_database_named_by_mlflow_tracking_uri_is_refused_before_any_work(tmp_path, monkeypatch, capfd):
    db = _logged(tmp_path / "elsewhere")
    damage(db, "garbage")
    capfd.readouterr()
    config = tmp_path / "bench.yaml"
    config.write_text(TINY)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    out = tmp_path / "out"
    line = refused(["run", str(config), "--out", str(out)], monkeypatch, capfd, out)
    assert str(db) in line and "damaged" in line, line


@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_moved_or_copied_run_folder_never_writes_into_the_old_one(how, tmp_path, caplog):
    old, new = tmp_path / "old" / "runs", tmp_path / "new" / "runs"
    _logged(old)
    (shutil.move if how == "move" else shutil.copytree)(old, new)
    before = _tree(old) if how == "copy" else None
    tracker = Tracker(experiment="tiny", run_dir=new)
    with tracker.parent_run("second") as run_id:
        tracker.log_text("two", "notes/second.md")
    uri = tracker.client.get_run(run_id).info.artifact_uri
    assert uri.startswith((new / "mlartifacts").as_uri() + "/"), uri
    assert (new / "mlartifacts" / run_id / "artifacts" / "notes" / "second.md").read_text() == "two"
    if how == "move":
        assert not old.exists()  # nothing recreated there
    else:
        assert _tree(old) == before
    names = {e.name: e.artifact_location for e in tracker.client.search_experiments()}
    assert names["tiny"] == (new / "mlartifacts").as_uri()
    kept = [n for n in names if n.startswith(f"tiny (run folder {old}, until ")]
    assert len(kept) == 1 and names[kept[0]] == (old / "mlartifacts").as_uri(), names  # the earlier runs, kept
    assert any(str(old) in r.getMessage() and "moved or copied" in r.getMessage() for r in caplog.records)
    again = Tracker(experiment="tiny", run_dir=new)  # settled: the next open changes nothing
    assert again.experiment_id == tracker.experiment_id
    assert len(again.client.search_experiments()) == len(names)


def test_a_database_named_by_mlflow_tracking_uri_is_never_relocated(tmp_path, monkeypatch):
    """Only the run folder's own database follows its folder: one that MLFLOW_TRACKING_URI names keeps the
    artifact location it was created with."""
    db = _logged(tmp_path / "first")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tracker = Tracker(experiment="tiny", run_dir=tmp_path / "second")
    assert [e.name for e in tracker.client.search_experiments() if e.name.startswith("tiny")] == ["tiny"]
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location == (
        tmp_path / "first" / "mlartifacts").as_uri()


# -- the whole command (slow: a Prefect server and a local Ray instance each) -------------------------------

DAMAGE_AFTER_INGEST = """
import sys, threading
from pathlib import Path
import tasks.prefect_tasks as t
how, db = sys.argv.pop(1), Path(sys.argv.pop(1))
ingest = t.ingest
def damaged_after(*args, **kwargs):
    result = ingest(*args, **kwargs)
    for thread in threading.enumerate():  # the flow's tracking warm-up has created the database
        if thread.name == "tracking-warm-up":
            thread.join()
    from tests.test_tracking_db import damage
    damage(db, how)
    return result
t.ingest = damaged_after
from belladonna.cli import main
main()
"""


class Recorder:
    """Every descendant (PID, start time) of a running process, recorded twice a second."""

    def __init__(self, pid: int) -> None:
        from belladonna.lifecycle import reaper

        self.reaper, self.pid, self.seen, self.done = reaper, pid, {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            self.seen.update(self.reaper.descendants(self.pid))
            self.done.wait(0.5)

    def left(self, grace: float = 30.0) -> list[int]:
        """Stop recording; the recorded processes still alive after `grace` s (then stopped: none may stay)."""
        self.done.set()
        self.thread.join()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive():
            time.sleep(0.5)
        alive = self._alive()
        self.reaper.kill_recorded(self.seen)
        return alive

    def _alive(self) -> list[int]:
        return [p for p, s in self.seen.items() if self.reaper.start_time(p) == s]


def _run(args: list[str], tmp_path: Path, script: str | None = None) -> tuple[subprocess.CompletedProcess, list]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("MLFLOW_TRACKING_URI", "BELLADONNA_STORE", "BELLADONNA_RUN_DIR", "PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "belladonna.cli", *args]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorder = Recorder(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        recorder.left(0)
        raise AssertionError(f"no answer within {RUN_TIMEOUT_S} s\n{stderr}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), recorder.left()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_database_damaged_between_two_stages_ends_the_run_with_one_line(how, tmp_path):
    config, out = tmp_path / "tiny.yaml", tmp_path / "out"
    config.write_text(TINY)
    done, left = _run([how, str(out / "mlflow.db"), "run", str(config), "--out", str(out)], tmp_path,
                      DAMAGE_AFTER_INGEST)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(out / "mlflow.db") in lines[0] and "damaged" in lines[0], lines[0]
    assert not (out / "tiny").exists()  # no results.json, no run record
    assert not left, left
    assert any((out / "store" / "datasets").iterdir())  # the stages before are stored: a rerun resumes


@pytest.mark.slow
def test_a_run_folder_moved_between_two_runs_writes_only_into_the_new_one(tmp_path):
    config, old, new = tmp_path / "tiny.yaml", tmp_path / "a" / "runs", tmp_path / "b" / "runs"
    config.write_text(TINY)
    first, left = _run(["run", str(config), "--out", str(old)], tmp_path)
    assert first.returncode == 0 and not left, first.stderr
    shutil.move(old.parent, new.parent)
    second, left = _run(["run", str(config), "--out", str(new)], tmp_path)
    assert second.returncode == 0 and not left, second.stderr
    assert not old.parent.exists()  # nothing written into the old folder
    warnings = [line for line in second.stderr.splitlines() if "moved or copied" in line]
    assert len(warnings) == 1 and str(old) in warnings[0], second.stderr
    record = json.loads((new / "tiny" / "results.json").read_text())
    with sqlite3.connect(new / "mlflow.db") as db:
        (uri,) = db.execute("select artifact_uri from runs where run_uuid = ?", (record["mlflow"]["run_id"],)).fetchone()
    assert uri.startswith((new / "mlartifacts").as_uri()), uri
    assert (new / "mlartifacts" / record["mlflow"]["run_id"] / "artifacts").is_dir()
