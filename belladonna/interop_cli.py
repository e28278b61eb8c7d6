"""`belladonna import` and `belladonna export`: other tools' poison files in and out of the store.

import: FORMAT files -> the `imported` attack (poison_core.attacks.imported) crafts, i.e. reads,
matches and audits them against the config's dataset and threat model -> the PoisonSet is written to
the store under the key a grid run of that attack would use (so `belladonna run` reuses it). Nothing
is written until the poisons have passed every check. export: a stored PoisonSet (a Parquet file, or
a run folder's results.json entry) -> FORMAT files in a new folder, written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from poison_core.errors import InputError

FORMAT_HELP = "benchmark, forest-numpy, forest-full, forest-packed or arrays (see docs/interop.md)."
NORMALIZATION_HELP = ("forest-packed only: the normalisation forest used (cifar10, cifar100, mnist, imagenet, "
                      "tinyimagenet, none); default cifar10 on CIFAR-10.")


def import_poisons(fmt: str = typer.Argument(..., metavar="FORMAT", help=FORMAT_HELP),
                   path: Path = typer.Argument(..., help="The poison files: a trial folder, an export folder or an .npz."),
                   config: Path = typer.Option(..., help="Benchmark YAML: its dataset, threat model and store key."),
                   attack_id: Optional[str] = typer.Option(None, help="Grid id of this import (the config's attack "
                                                           "with this id gives the threat model); default 'imported'."),
                   store: Optional[str] = typer.Option(None, help="Store root; default $BELLADONNA_STORE or runs/store."),
                   normalization: Optional[str] = typer.Option(None, help=NORMALIZATION_HELP)
                   ) -> None:
    """Read another tool's poisons into an audited PoisonSet in the config's store."""
    from belladonna.cli import _load, console
    from poison_core.attacks import CraftContext, make_attack
    from poison_core.config import AttackConfig
    from poison_core.data import load_dataset
    from poison_core.interop import formats
    from poison_core.seeding import derive_seed

    cfg = _load(config)
    formats.get(fmt)
    key = attack_id or "imported"
    named = next((a for a in cfg.attacks if a.key == key), None)
    params = {"format": fmt, "path": str(path), **({"normalization": normalization} if normalization else {})}
    attack = AttackConfig(name="imported", id=attack_id, params=params,
                          threat=named.threat if named is not None else None)
    threat, seed = cfg.threat_for(attack), cfg.seeds[0]
    splits = load_dataset(cfg.dataset)
    poison_set = make_attack(attack.name, attack.params).craft(CraftContext(
        train=splits.train, test=splits.test, threat=threat, seed=derive_seed(seed, "craft", attack.key)))
    from infra.storage import Store
    from tasks import stages

    target = Store(store or os.environ.get("BELLADONNA_STORE") or "runs/store")
    prefix = stages.ingest(target, cfg.dataset).key
    uri = target.write_poison_set(stages.poison_key(cfg, prefix, attack, seed), poison_set, splits.train)
    console.print(f"ok: {len(poison_set)} poisons of {len(splits.train)} ({fmt}, goal "
                  f"{poison_set.targets.get('kind')}), {int(poison_set.flipped.sum())} labels changed -> {uri}",
                  markup=False, highlight=False, soft_wrap=True)


def _poison_uri(source: Path, which: Optional[str]) -> str:
    """A PoisonSet file, or the entry `which` (ATTACK/seedN; optional when there is one) of a run's results."""
    results = source / "results.json" if source.is_dir() else source
    if results.suffix != ".json":
        return str(source)
    try:
        record = json.loads(results.read_text(encoding="utf-8"))
        poisons, root = record["poisons"], record["store"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{results} is not a Belladonna results file with poisons ({type(exc).__name__})") from None
    if which is None and len(poisons) == 1:
        which = next(iter(poisons))
    if which not in poisons:
        raise InputError(f"--poisons: choose one of {', '.join(sorted(poisons))} (got {which!r})")
    return f"{root.rstrip('/')}/{poisons[which]}"


def export_poisons(source: Path = typer.Argument(..., metavar="RUN_OR_POISONSET",
                                                 help="A PoisonSet Parquet file, or a run folder / results.json."),
                   fmt: str = typer.Argument(..., metavar="FORMAT", help=FORMAT_HELP),
                   out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
                   config: Path = typer.Option(..., help="The benchmark YAML whose dataset the poisons claim."),
                   poisons: Optional[str] = typer.Option(None, help="Which of a run's PoisonSets: ATTACK/seedN."),
                   normalization: Optional[str] = typer.Option(None, help=NORMALIZATION_HELP)
                   ) -> None:
    """Write a stored PoisonSet in another tool's format (audited on the way out)."""
    from belladonna.cli import _load, console
    from poison_core.data import load_dataset
    from poison_core.interop import formats
    from poison_core.poisons import audit_file

    cfg = _load(config)
    formats.get(fmt)
    splits = load_dataset(cfg.dataset)
    poison_set, _threat = audit_file(_poison_uri(source, poisons), splits.train, cfg)
    written = formats.write(fmt, out, poison_set, splits.train, splits.test, normalization=normalization)
    console.print(f"ok: {len(poison_set)} poisons as {fmt}: {len(written)} files in {out}", markup=False,
                  highlight=False, soft_wrap=True)
