"""The run history kept in a remote store, beside its outputs: ``<store>/runs/<name>/<run id>/results.json``
and ``report.html``, ``<store>/runs/<name>/latest`` (the newest run id) and ``<store>/runs/<name>/results.json``
(a copy of the latest): the same layout as the local run folder (:mod:`tasks.run_history`), so a
machine that only sees the store (an S3 bucket) can report and compare its runs.

Written for S3 stores by the end of every run (:func:`tasks.regression_gate.record_run`), after the
local copy. Read by copying the runs asked for into a local scratch folder of that layout
(:func:`materialize`), which the local readers then read as they read any run folder. The garbage
collector (:mod:`tasks.store_gc`) never touches ``runs/``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from infra.storage import Store, check_key
from poison_core.errors import InputError
from poison_core.io import atomic_write_bytes
from tasks import run_history

log = logging.getLogger(__name__)
RUNS = "runs"
PAGE = "report.html"
MAX_SCAN = 50
"""Newest runs read when looking for a gate's base run in the store (each is one small GET)."""


def is_remote(root: str) -> bool:
    """True for a store whose root is a URI (``s3://...``), not a local folder."""
    return "://" in str(root) and not str(root).startswith("file://")


def write_run(store: Store, name: str, run_id: str, results: Path, page: Path | None = None) -> str:
    """Copy the run's results.json (and page) to the store's history, then the copy of the latest and
    the ``latest`` pointer (each a single PUT, the pointer last); returns the run's results URI."""
    data = results.read_bytes()
    own = store.write_bytes(check_key(RUNS, name, run_id, run_history.RESULTS), data)
    if page is not None and page.is_file():
        store.write_bytes(check_key(RUNS, name, run_id, PAGE), page.read_bytes())
    store.write_bytes(check_key(RUNS, name, run_history.RESULTS), data)
    store.write_bytes(check_key(RUNS, name, run_history.LATEST), (run_id + "\n").encode())
    return own


def run_ids(store: Store, name: str) -> list[str]:
    """The completed runs of benchmark `name` in the store's history, oldest first."""
    prefix = check_key(RUNS, name)
    ids = set()
    for key in store.list(prefix):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == run_history.RESULTS and run_history.RUN_ID.match(parts[2]):
            ids.add(parts[2])
    return sorted(ids)


def read_run(store: Store, name: str, run_id: str) -> dict[str, Any]:
    """One run's results from the store (an InputError line when it is not a JSON object)."""
    key = check_key(RUNS, name, run_id, run_history.RESULTS)
    try:
        results = json.loads(store.read_bytes(key))
    except ValueError as exc:
        raise InputError(f"{store.uri(key)} is not JSON: {exc}") from None
    if not isinstance(results, dict):
        raise InputError(f"{store.uri(key)} is not a results object")
    return results


def history(store: Store, name: str, limit: int = MAX_SCAN) -> list[tuple[str, dict[str, Any]]]:
    """The last `limit` runs (oldest first) as (run id, results); unreadable ones are skipped."""
    out = []
    for run_id in run_ids(store, name)[-limit:]:
        try:
            out.append((run_id, read_run(store, name, run_id)))
        except (OSError, InputError) as exc:
            log.warning("skipping run %s in %s: %s", run_id, store.root, exc)
    return out


def split_uri(arg: str) -> tuple[str, str]:
    """``s3://bucket/prefix/runs/NAME[/SELECTOR]`` -> (``s3://bucket/prefix``, ``NAME[/SELECTOR]``)."""
    root, sep, rest = arg.rstrip("/").rpartition(f"/{RUNS}/")
    if not sep or not rest:
        raise InputError(f"{arg!r}: a run in a store is STORE/runs/BENCHMARK[/latest|previous|latest~N|RUN_ID]")
    return root, rest


def materialize(arg: str, store: Store, scratch: Path, history_runs: int = 10) -> Path:
    """Copy the run that `arg` (``NAME``, ``NAME/SELECTOR``) names in the store's history, and the
    `history_runs` runs before it (for a report's trend), into `scratch` in the run folder layout;
    returns the local results.json of the run named. One InputError line when there is none."""
    name, _, selector = arg.strip("/").partition("/")
    selector = selector or run_history.LATEST
    if "/" in selector or not re.match(r"^[A-Za-z0-9._=+~-]+$", name + selector):
        raise InputError(f"{arg!r}: expected BENCHMARK[/latest|previous|latest~N|RUN_ID] in {store.root}/{RUNS}")
    ids = run_ids(store, name)
    if not ids:
        raise InputError(f"{store.root}/{RUNS}/{name} has no completed run")
    listing = scratch / name
    for run_id in ids:  # empty placeholders: the local selector sees every id, only the needed ones are read
        (listing / run_id).mkdir(parents=True, exist_ok=True)
        (listing / run_id / run_history.RESULTS).touch()
    chosen = run_history.select(listing, selector).parent.name
    wanted = [i for i in ids if i <= chosen][-(history_runs + 1):]
    for run_id in ids:
        target = listing / run_id / run_history.RESULTS
        if run_id in wanted:
            atomic_write_bytes(str(target), store.read_bytes(check_key(RUNS, name, run_id, run_history.RESULTS)))
        else:
            target.unlink()
            (listing / run_id).rmdir()
    atomic_write_bytes(str(listing / run_history.LATEST), (ids[-1] + "\n").encode())
    return listing / chosen / run_history.RESULTS


def resolve(arg: str, store_root: str | None, scratch: Path, history_runs: int = 10) -> Path | None:
    """The local copy of the run that `arg` names in a store's history: `arg` is a full
    ``s3://bucket/prefix/runs/NAME[/SELECTOR]``, or ``NAME[/SELECTOR]`` with `store_root` given (the
    CLI's ``--store``). None when neither applies (then `arg` is a local run: tasks.run_history.resolve)."""
    if is_remote(arg):
        root, arg = split_uri(arg)
    elif store_root:
        root = store_root
    else:
        return None
    return materialize(arg, Store(root), scratch, history_runs)
