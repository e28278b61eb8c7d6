"""``belladonna store gc``: find the stored outputs that no current key uses, and remove them.

The roots are the slot records (`tasks.records`): each names the key its slot holds now and the upstream
keys that output was made from. An output is live when a root names it or it lies under a live dataset
prefix; a craft's checkpoints are live while their PoisonSet's key is. Everything else under the
output folders (``datasets/``, ``poisons/``, ``models/``, ``cells/``, ``checkpoints/``, ``quarantine/``,
``quarantine-reasons/``) was written under keys no run uses any more: older code, older data, older
parameters, or a store written before records existed. Such outputs are never reused (their keys cannot come back unless the
code, data and parameters do), so removing them only frees space.

A file modified within the grace period is kept whatever it is: a run in progress writes its output
before its record (git's ``gc.pruneExpire`` protects concurrent writers the same way). A craft
interrupted longer ago than that, whose configuration has since changed, loses its checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from infra.storage import Store
from tasks.records import read_records

OUTPUT_FOLDERS = ("datasets", "poisons", "models", "cells", "checkpoints", "quarantine", "quarantine-reasons")
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class Collection:
    """What a gc found: the garbage (key, bytes), and how many output files it keeps."""

    garbage: tuple[tuple[str, int], ...]
    kept: int

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.garbage)


def live_keys(store: Store) -> set[str]:
    """Every key a record names, as its output or as an input of it."""
    live: set[str] = set()
    for record in read_records(store):
        live.add(record["key"])
        live.update(k for k in record.get("inputs", []) if isinstance(k, str))
    return live


def _is_live(key: str, live: set[str]) -> bool:
    if key in live:
        return True
    top, _, rest = key.partition("/")
    head = rest.split("/", 1)[0]
    if top == "datasets":
        return f"datasets/{head}" in live
    if top == "checkpoints":
        return f"poisons/{head}.parquet" in live
    return False


def collect(store: Store, grace_seconds: float = DEFAULT_GRACE_SECONDS, now: float | None = None) -> Collection:
    """The store's garbage (nothing is removed)."""
    live = live_keys(store)
    cutoff = (time.time() if now is None else now) - grace_seconds
    garbage, kept = [], 0
    for folder in OUTPUT_FOLDERS:
        for key, size, modified in store.list_details(folder):
            if _is_live(key, live) or modified > cutoff:
                kept += 1
            else:
                garbage.append((key, size))
    return Collection(tuple(garbage), kept)


def remove(store: Store, found: Collection) -> None:
    """Delete the garbage `collect` found."""
    for key, _ in found.garbage:
        store.delete(key)
