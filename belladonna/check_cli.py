"""``belladonna check attack|defense|model NAME``: the contract every member passes (poison_core.contract)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 160)


def check_member_command(kind: str = typer.Argument(..., help="attack, defense or model"),
                         name: str = typer.Argument(..., help="A registered name, a plug-in's entry point or an "
                                                    "import string package.module:attribute")) -> None:
    """Run the contract the built-ins pass on one member (a plug-in's author runs this before publishing).

    Exit 0 when every check passes, 1 when one fails (one line naming the check), 2 for an unknown kind
    or name."""
    from poison_core.contract import KINDS, ContractError, check_member
    from poison_core.errors import InputError

    if kind not in KINDS:
        raise InputError(f"KIND: {kind!r} is not one of {', '.join(KINDS)}")
    try:
        passed = check_member(kind, name)
    except ContractError as exc:
        console.print(f"FAIL {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for check in passed:
        console.print(f"ok   {kind} {name}: {check}", markup=False, highlight=False)
    console.print(f"{kind} {name!r} passes the contract ({len(passed)} checks)", markup=False, highlight=False)
