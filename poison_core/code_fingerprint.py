"""Code fingerprints: a hash of the source that computes an output, derived from the source itself.

A stored output's key includes the fingerprint of the code that made it, so a fix to an attack, a
defense, the trainer or the evaluation recomputes exactly the outputs that code touches, with no
version number to bump by hand.

What a fingerprint covers. ``code_fingerprint(["poison_core.attacks.badnets", ...])`` hashes the
given modules and every module they import, transitively, inside the *tracked* packages: ``poison_core``
and each given module's own top-level package (so a plug-in's helpers count, a third-party library's
do not; the torch and numpy versions are hashed instead). Imports are read from the syntax tree,
function-level imports included, and ``from package import name`` counts the sub-module ``name``
when there is one, else the package.

Two rules keep one attack's edit from recomputing the whole grid (the registries make
``poison_core`` one import cycle):

* *registration imports are not dependencies*: a registry package's ``__init__`` imports every member
  module only to register it; those edges are dropped and those import statements are left out of
  the package's hash (adding a member to the registry recomputes nothing). A stage that uses a
  member names the member's module explicitly;
* *the source is hashed as a syntax tree without docstrings*, so comments, docstrings and formatting
  do not change a fingerprint; any change to what the code does does.

Each module's tree is read once per process: a fingerprint describes the code that this process
runs, which was imported from that source.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

TRACKED = "poison_core"
REGISTRY_PACKAGES = ("poison_core.attacks", "poison_core.defenses")
"""Packages whose ``__init__`` imports member modules only to register them."""


def member_module(obj: object) -> str:
    """The name of the module that defines `obj` (a registered class or function; an adapted object is
    followed to what it wraps, ``__wrapped__``)."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    module = inspect.getmodule(obj)
    if module is None:
        raise ValueError(f"{obj!r} has no module; cannot fingerprint its source")
    return module.__name__


def code_fingerprint(modules: Iterable[str]) -> str:
    """sha256 (16 hex chars) of the modules' import closure within the tracked packages, with the
    torch and numpy versions (their kernels determine the numbers too)."""
    closure = import_closure(tuple(sorted(set(modules))))
    digest = hashlib.sha256()
    for name in closure:
        digest.update(f"{name}\0{_module_digest(name)}\n".encode())
    digest.update(f"torch {_version('torch')} numpy {_version('numpy')}".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def import_closure(roots: tuple[str, ...]) -> tuple[str, ...]:
    """Sorted names of `roots` and every tracked module they import, transitively."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(_parsed(name)[1])
    return tuple(sorted(seen))


def _module_digest(name: str) -> str:
    return _parsed(name)[0]


@lru_cache(maxsize=None)
def _parsed(name: str) -> tuple[str, tuple[str, ...]]:
    """(digest of the module's docstring-free syntax tree, the tracked modules it imports)."""
    path, is_package = _source_path(name)
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    tracked = {TRACKED, name.partition(".")[0]}
    imports: set[str] = set()
    registration = name in REGISTRY_PACKAGES
    for node in ast.walk(tree):
        if registration and _registers_members(node, name):
            node.names = []  # type: ignore[attr-defined]
            continue
        imports.update(_import_targets(node, package, tracked))
    _strip_docstrings(tree)
    digest = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
    imports.discard(name)
    return digest, tuple(sorted(imports))


def _import_targets(node: ast.AST, package: str, tracked: set[str]) -> list[str]:
    """The tracked modules an import statement binds (a sub-module when `from pkg import sub` names one)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        if base.partition(".")[0] not in tracked:  # never look up (and so import) an untracked package
            return []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if _exists(sub) else base)
    return sorted({n for n in names if n.partition(".")[0] in tracked and _exists(n)})


def _registers_members(node: ast.AST, package: str) -> bool:
    """Whether `node` is ``from <package> import a, b`` binding only sub-modules: a registration import."""
    return (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == package
            and all(_exists(f"{package}.{alias.name}") for alias in node.names))


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


@lru_cache(maxsize=None)
def _exists(name: str) -> bool:
    try:
        return _source_path(name) is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=None)
def _source_path(name: str) -> tuple[Path, bool]:
    """(source file, is a package) of module `name`, from the loaded module or its import spec."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise ImportError(f"no Python source for module {name!r}")
        origin = spec.origin
    path = Path(origin)
    if path.suffix != ".py":
        raise ImportError(f"module {name!r} has no Python source ({path.name})")
    return path, path.name == "__init__.py"


@lru_cache(maxsize=None)
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
