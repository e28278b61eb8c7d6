"""Why a stage recomputed: each output's slot remembers the key and the parts it had last time.

After a stage stores (or reuses) an output it writes ``records/<slot hash>.json``: the slot, the key,
the hashes of the key's parts (input, params, code) and the upstream keys. The next run of that slot
compares its new parts with the record's and names what changed:

* ``new``: the slot has no record (a first run, or a store written before records existed);
* ``input changed`` / ``params changed`` / ``code changed``: those parts differ (several are joined
  with ", ");
* ``missing``: the record names this very key but its file is gone; ``damaged``: the file was there
  but unreadable (it is quarantined first);
* ``forced``: ``belladonna run --recompute`` asked for it.

Records are also the roots `belladonna store gc` keeps (`tasks.store_gc`). A reused output whose record
is missing or names another key gets its record (re)written, so the roots follow the latest run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from infra.storage import Store
from poison_core.errors import DatasetError, InputError
from tasks.keys import PARTS, StageKey

log = logging.getLogger(__name__)

RECORDS = "records"
REUSED = "reused"


def record_key(slot: str) -> str:
    return f"{RECORDS}/{hashlib.sha256(slot.encode()).hexdigest()[:20]}.json"


def read_record(store: Store, slot: str) -> dict[str, Any] | None:
    """The slot's record, or None when there is none or it cannot be read (a record is a hint, not data)."""
    key = record_key(slot)
    try:
        if not store.exists(key):
            return None
        record = json.loads(store.read_bytes(key))
    except (DatasetError, InputError, ValueError) as exc:
        log.warning("ignoring unreadable record of %s: %s", slot, exc)
        return None
    return record if isinstance(record, dict) and record.get("slot") == slot else None


def reason(previous: dict[str, Any] | None, stage: StageKey, *, forced: bool = False,
           damaged: bool = False) -> str:
    """Why the output of `stage` is computed now (see the module docstring for the words)."""
    if forced:
        return "forced"
    if damaged:
        return "damaged"
    if previous is None:
        return "new"
    before = previous.get("parts") if isinstance(previous.get("parts"), dict) else {}
    changed = [f"{part} changed" for part in PARTS if before.get(part) != stage.parts.get(part)]
    if changed:
        return ", ".join(changed)
    return "missing" if previous.get("key") == stage.key else "new"


def write_record(store: Store, stage: StageKey, previous: dict[str, Any] | None = None) -> None:
    """Record that `stage.slot` now holds `stage.key` (skipped when the record already says so)."""
    if previous is not None and previous.get("key") == stage.key and previous.get("parts") == stage.parts:
        return
    record = {"slot": stage.slot, "key": stage.key, "parts": stage.parts, "inputs": list(stage.inputs)}
    store.write_bytes(record_key(stage.slot), json.dumps(record, sort_keys=True).encode())


def read_records(store: Store) -> list[dict[str, Any]]:
    """Every readable record in the store."""
    records = []
    for key in store.list(RECORDS):
        try:
            record = json.loads(store.read_bytes(key))
        except (DatasetError, InputError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            records.append(record)
    return records


def stage_reasons(outputs: dict[str, dict[Any, Any]]) -> dict[str, dict[str, str]]:
    """Per stage, each output's label (its grid coordinates joined by '/') and why it was computed, or
    'reused'. `outputs` maps a stage to its StageOutputs by grid coordinates."""
    def label(coords: Any) -> str:
        parts = coords if isinstance(coords, tuple) else (coords,)
        return "/".join("clean" if p is None else str(p) for p in parts)

    return {stage: {label(k): getattr(o, "reason", REUSED) for k, o in found.items()}
            for stage, found in outputs.items()}


def reason_counts(reasons: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """Per stage, how many outputs were computed for each reason (reused ones are not counted)."""
    counts: dict[str, dict[str, int]] = {}
    for stage, by_label in reasons.items():
        tally: dict[str, int] = {}
        for why in by_label.values():
            if why != REUSED:
                tally[why] = tally.get(why, 0) + 1
        counts[stage] = dict(sorted(tally.items()))
    return counts


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """``ingest 1 (new), pretrain 0, craft 4 (code changed 2, new 2), ...``: the CLI's summary line."""
    parts = []
    for stage, tally in counts.items():
        total = sum(tally.values())
        why = f" ({', '.join(f'{r} {n}' for r, n in tally.items())})" if tally else ""
        parts.append(f"{stage} {total}{why}")
    return ", ".join(parts)
