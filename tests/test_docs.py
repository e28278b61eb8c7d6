"""The README agrees with the code: its member tables are the registries' (belladonna.docs), its two set-up
commands are the ones CI runs, the files it links exist, and nothing in the repository cites a tracker's
issue numbers (the tracker is not part of the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from belladonna.docs import END, START, member_tables, replace_tables

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL_RUN = "python3 -m pip install -c constraints.txt -e . && belladonna run"
INSTALL_TEST = "python3 -m pip install -c constraints.txt -e '.[test]' && python3 -m pytest -q -n auto --dist loadfile"


def test_the_readme_member_tables_are_the_generators_output():
    start, end = README.index(START), README.index(END) + len(END)
    assert README[start:end] == member_tables(), "README.md is stale: run python3 -m belladonna.docs --write"


def test_every_registered_attack_and_defense_has_a_row():
    from poison_core.attacks import ATTACKS
    from poison_core.defenses import DEFENSES

    for name in [*ATTACKS.names(), *DEFENSES.names()]:
        assert f"| `{name}` |" in README, name


def test_replace_tables_refuses_a_readme_without_markers():
    with pytest.raises(ValueError, match="markers"):
        replace_tables("# no tables here\n", member_tables())
    assert replace_tables(f"a\n{START}\nold\n{END}\nb", "NEW") == "a\nNEWb"[:2] + "NEW\nb"


def test_the_two_setup_commands_are_the_readmes_and_ci_runs_the_second():
    assert f"\n{INSTALL_RUN}\n" in README and f"\n{INSTALL_TEST}\n" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == INSTALL_TEST


def test_the_readme_is_for_newcomers_and_its_links_exist():
    assert len(README.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target
    for path in ("docs/deploy.md", "docs/design.md", "CONTRIBUTING.md"):
        assert (ROOT / path).is_file(), path


def test_no_file_cites_a_tracker_issue_number():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    # a CSS or SVG colour (`color:#222`, `stroke='#999'`) is not an issue number
    pattern = re.compile(r"\bissue[- ]?#?\d+|\bissues? \d+|(?<![\w&:'])#\d{1,4}\b(?![0-9a-fA-F])", re.IGNORECASE)
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""} or not path.is_file():
            continue
        if name.startswith("tests/data/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line) and "noqa" not in line:
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_the_readmes_own_attack_passes_the_contract(monkeypatch):
    """The 'Your own attack' example is complete: run as written, it passes the contract every member passes."""
    import types

    from poison_core.contract import check_member

    section = README[README.index("## Your own"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    module = types.ModuleType("readme_attack")
    exec(compile(code, "README.md", "exec"), module.__dict__)  # our own README's code
    monkeypatch.setitem(__import__("sys").modules, "readme_attack", module)
    assert "epsilon" in check_member("attack", "readme_attack:CheckerNoise")
