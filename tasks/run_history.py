"""Every run keeps its own results: ``run_dir/<name>/<run id>/results.json``, a ``latest`` pointer (a
one-line text file naming the newest run id: no symlink, so it works on any file system), and
``run_dir/<name>/results.json``, a copy of the latest (what older readers and ``belladonna report
runs/<name>`` read). Run ids sort by time (``20250102T020000Z-1a2b3c4d``: UTC start, then the first 8
hex digits of the Prefect flow run id), so ``previous`` is the newest but one.

A run folder is written only when the run completed (results.json is the flow's last write), so every
folder with a results.json is a completed run. Selectors: ``latest``, ``previous``, ``latest~N`` (the
N-th before the latest) or a run id (or a unique prefix of one).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

from poison_core.errors import InputError
from poison_core.io import atomic_write_bytes

log = logging.getLogger(__name__)
LATEST = "latest"
RESULTS = "results.json"
SELECTOR = re.compile(r"^(latest|previous|latest~(\d{1,4}))$")
RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-z]{8}$")


def new_run_id(started: float, flow_run_id: str | None) -> str:
    """A time-sortable run id: the UTC start time, then 8 hex digits of the flow run id (random if none)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    tail = (str(flow_run_id or "").replace("-", "") or uuid.uuid4().hex)[:8]
    return f"{stamp}-{tail}"


def write_run(result: dict[str, Any], benchmark_dir: Path, run_id: str) -> Path:
    """Write `result` to ``benchmark_dir/run_id/results.json``, then the copy and the ``latest`` pointer
    (each write atomic); returns the run's own results.json."""
    data = json.dumps(result, indent=2, default=list).encode()
    own = benchmark_dir / run_id / RESULTS
    atomic_write_bytes(str(own), data)
    atomic_write_bytes(str(benchmark_dir / RESULTS), data)
    atomic_write_bytes(str(benchmark_dir / LATEST), (run_id + "\n").encode())
    return own


def run_ids(benchmark_dir: Path) -> list[str]:
    """The completed runs of a benchmark folder, oldest first."""
    if not benchmark_dir.is_dir():
        return []
    return sorted(p.name for p in benchmark_dir.iterdir()
                  if RUN_ID.match(p.name) and p.is_dir() and (p / RESULTS).is_file())


def select(benchmark_dir: Path, selector: str) -> Path:
    """The results.json of `selector` among `benchmark_dir`'s runs; an InputError line otherwise."""
    ids = run_ids(benchmark_dir)
    match = SELECTOR.match(selector)
    if match:
        back = 0 if selector == "latest" else 1 if selector == "previous" else int(match.group(2))
        if back >= len(ids):
            raise InputError(f"{benchmark_dir} has {len(ids)} completed run(s): no {selector!r} run"
                             + ("" if ids else f" (runs are kept from this version on; {benchmark_dir / RESULTS} "
                                               "is the only one)" if (benchmark_dir / RESULTS).is_file() else ""))
        return benchmark_dir / ids[-1 - back] / RESULTS
    found = [i for i in ids if i.startswith(selector)]
    if len(found) != 1:
        what = "no run" if not found else f"{len(found)} runs"
        raise InputError(f"{benchmark_dir}: {what} match {selector!r} (use latest, previous, latest~N or a run "
                         f"id; runs: {', '.join(ids[-5:]) or 'none'})")
    return benchmark_dir / found[0] / RESULTS


def resolve(arg: str, out: Path = Path("runs")) -> Path:
    """The results.json that `arg` names: a results.json file; a run folder; a benchmark folder (its
    latest run); ``BENCHMARK_FOLDER/SELECTOR``; or a benchmark name under `out` (``nightly``,
    ``nightly/previous``). One InputError line when none of those exist."""
    path = Path(arg)
    for candidate in (path, out / path) if not path.is_absolute() else (path,):
        # anything there that is not a folder is the results file: its reader refuses a FIFO or a device
        if candidate.exists() and not candidate.is_dir() and not (candidate.name == LATEST
                                                                   and run_ids(candidate.parent)):
            return candidate
        if candidate.is_dir():
            if run_ids(candidate):
                return select(candidate, LATEST)
            if (candidate / RESULTS).exists():
                return candidate / RESULTS
        if candidate.parent.is_dir() and (run_ids(candidate.parent) or SELECTOR.match(candidate.name)):
            return select(candidate.parent, candidate.name)
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / RESULTS).is_file()) if out.is_dir() else []
    hint = f"; benchmarks in {out}: {', '.join(names)}" if names else ""
    raise InputError(f"run {arg!r} has no results.json (expected a run folder, a results.json, a benchmark "
                     f"folder or name, or BENCHMARK/latest|previous|RUN_ID{hint})")


def history(benchmark_dir: Path, limit: int = 10) -> list[tuple[str, dict[str, Any]]]:
    """The last `limit` completed runs (oldest first) as (run id, results); unreadable ones are skipped."""
    out = []
    for run_id in run_ids(benchmark_dir)[-limit:]:
        try:
            out.append((run_id, json.loads((benchmark_dir / run_id / RESULTS).read_text())))
        except (OSError, ValueError) as exc:
            log.warning("skipping run %s: %s", run_id, exc)
    return out
