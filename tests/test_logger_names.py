"""One name for a module's logger: every module of the five packages that keeps a module-level
``logging.getLogger(...)`` binds it to ``log`` (not ``logger``, ``_log``, ...), so a grep for ``log.`` finds
every message a module writes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("belladonna", "flows", "tasks", "infra", "poison_core")


def _is_get_logger(value: ast.expr) -> bool:
    func = value.func if isinstance(value, ast.Call) else None
    return (isinstance(func, ast.Attribute) and func.attr == "getLogger"
            and isinstance(func.value, ast.Name) and func.value.id == "logging")


def logger_names(source: str) -> list[str]:
    """The names that module-level assignments of ``logging.getLogger(...)`` in `source` bind."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and _is_get_logger(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def test_the_check_sees_a_wrong_name():
    assert logger_names("import logging\nlogger = logging.getLogger(__name__)\n") == ["logger"]
    assert logger_names("import logging\nlog: logging.Logger = logging.getLogger('x')\n") == ["log"]
    assert logger_names("import logging\ndef f():\n    logger = logging.getLogger(__name__)\n") == []


def test_every_module_logger_is_named_log():
    seen, wrong = 0, []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "infra/ray/" in path.as_posix() or "infra/kuberay/" in path.as_posix():
                continue
            for name in logger_names(path.read_text(encoding="utf-8")):
                seen += 1
                if name != "log":
                    wrong.append(f"{path.relative_to(ROOT)}: {name}")
    assert seen >= 40, f"only {seen} module loggers found: is the walk looking in the right place?"
    assert not wrong, "module loggers must be named `log`: " + ", ".join(wrong)
