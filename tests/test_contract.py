"""Every registered member passes the contract (poison_core.contract), a built-in the moment it is
registered: the list is read from the registries, never typed by hand. A member's quick settings are its
own ``smoke`` (and an attack's ``smoke_threat``)."""

from __future__ import annotations

import pytest

from poison_core.attacks import ATTACKS
from poison_core.contract import check_member
from poison_core.defenses import DEFENSES
from poison_core.models import MODELS

MEMBERS = ([("attack", n) for n in ATTACKS.names()] + [("defense", n) for n in DEFENSES.names()]
           + [("model", n) for n in MODELS.names()])


@pytest.mark.parametrize("kind, name", MEMBERS, ids=[f"{k}-{n}" for k, n in MEMBERS])
def test_member_passes_the_contract(kind, name):
    passed = check_member(kind, name)
    assert passed and all(isinstance(check, str) for check in passed)


def test_every_member_documents_its_paper_and_summary():
    for registry in (ATTACKS, DEFENSES, MODELS):
        for entry in registry.entries():
            assert entry.summary, f"{registry.kind} {entry.name!r} has no summary"
            if registry is not MODELS:
                assert entry.paper and entry.obj.__doc__, f"{registry.kind} {entry.name!r} has no paper or docstring"
