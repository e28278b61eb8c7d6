"""``belladonna store``: look after a store (``gc``: remove what no current key uses)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="Look after a store: list and remove outputs that no current key uses.")
console = Console(width=None if sys.stdout.isatty() else 160)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def gc(out: Path = typer.Option(Path("runs"), help="Run folder whose store (OUT/store) is meant when no --store."),
       store: Optional[str] = typer.Option(None, help="Store root (path or s3://bucket/prefix); "
                                           "default: $BELLADONNA_STORE or OUT/store."),
       dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed, with sizes; remove nothing."),
       grace: float = typer.Option(3600.0, min=0, max=10 * 365 * 86400,
                                   help="Keep files modified within this many seconds (a run in progress).")) -> None:
    """Remove stored outputs that no slot record names (older code, data or parameters; stores from before
    records). Never a file that a current key, or an input of one, still uses."""
    from infra.storage import Store
    from poison_core.errors import InputError
    from tasks.store_gc import collect, remove

    target = Store(store or os.environ.get("BELLADONNA_STORE") or str(out / "store"))
    if not target.is_s3 and not Path(target.root).is_dir():
        raise InputError(f"--store: {target.root!r} is not a folder holding a store")
    found = collect(target, grace)
    for key, size in found.garbage:
        console.print(f"{'would remove' if dry_run else 'removing'} {key} ({_size(size)})", highlight=False)
    if not dry_run:
        remove(target, found)
    verb = "would free" if dry_run else "freed"
    console.print(f"{len(found.garbage)} unused file(s), {verb} {_size(found.bytes)}; kept {found.kept} in use "
                  f"or newer than {grace:.0f} s; store {target.root}", highlight=False)
