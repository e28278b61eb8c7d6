"""Code fingerprints: a hash of the source that computes an output, derived from the source itself.

A stored output's key includes the fingerprint of the code that made it, so a fix to an attack, a
defense, the trainer or the evaluation recomputes exactly the outputs that code touches, with no
version number to bump by hand.

What a fingerprint covers. ``code_fingerprint(["poison_core.attacks.badnets", ...])`` hashes the
given modules and every module they import, transitively, inside the *tracked* packages: ``poison_core``
and each given module's own top-level package (so a plug-in's helpers count, a third-party library's
do not; the torch and numpy versions are hashed instead). Imports are read from the compiled
bytecode (``IMPORT_NAME``), function-level imports included, and ``from package import name`` counts
the sub-module ``name`` when there is one, else the package.

Two rules keep one attack's edit from recomputing the whole grid (the registries make
``poison_core`` one import cycle):

* *registration imports are not dependencies*: a registry package's ``__init__`` imports every member
  module only to register it; those edges are dropped and those import statements are left out of
  the package's hash (adding a member to the registry recomputes nothing). A stage that uses a
  member names the member's module explicitly;
* *the source is hashed as its token stream without comments, blank lines, indentation width and
  docstrings*, so those do not change a fingerprint; any change to what the code does does (a change
  of layout inside a statement, such as a new line break in brackets, does not either; an added
  parenthesis does, which only recomputes).

No Python syntax tree is built (no ``ast.parse``): on CPython before 3.11.8 the syntax-tree
constructor keeps its recursion depth in one interpreter-wide counter, and two threads building trees
at once can fail either of them with ``SystemError: AST constructor recursion depth mismatch``
(python/cpython#106905; fixed in 3.11.8 by #113035). A flow's stages fingerprint code while other
threads of the same process (the tracking warm-up's matplotlib, ``inspect.signature``) parse literals,
so the fingerprint uses only the tokenizer and the compiler, which keep no such shared state.

Each module's source is read once per process: a fingerprint describes the code that this process
runs, which was imported from that source.
"""

from __future__ import annotations

import dis
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import sys
import tokenize
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from types import CodeType

TRACKED = "poison_core"
REGISTRY_PACKAGES = ("poison_core.attacks", "poison_core.defenses")
"""Packages whose ``__init__`` imports member modules only to register them."""
_CONSTANT_LOADS = ("LOAD_CONST", "LOAD_SMALL_INT")
"""How the compiler pushes an import's level and fromlist (``LOAD_SMALL_INT``: Python 3.14's small ints)."""


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
    """(digest of the module's token stream without comments and docstrings, the tracked modules it
    imports)."""
    path, is_package = _source_path(name)
    source = path.read_bytes()
    package = name if is_package else name.rpartition(".")[0]
    tracked = {TRACKED, name.partition(".")[0]}
    registry = name if name in REGISTRY_PACKAGES else None
    imports: set[str] = set()
    for level, fromlist, target, top in _import_instructions(compile(source, str(path), "exec", dont_inherit=True)):
        if top and registry and _registers_members(level, target, fromlist, registry):
            continue
        imports.update(_import_targets(level, target, fromlist, package, tracked))
    imports.discard(name)
    return _token_digest(source, registry), tuple(sorted(imports))


def _import_instructions(code: CodeType, top: bool = True) -> Iterator[tuple[int, tuple[str, ...] | None, str, bool]]:
    """(level, fromlist, module, at module level) of every import the compiled code performs, nested
    functions and classes included: ``LOAD_CONST level; LOAD_CONST fromlist; IMPORT_NAME module``."""
    consts: list[object] = []
    for instruction in dis.get_instructions(code):
        if instruction.opname == "IMPORT_NAME":
            level, fromlist = (consts[-2], consts[-1]) if len(consts) == 2 else (None, None)
            if not isinstance(level, int) or not (fromlist is None or isinstance(fromlist, tuple)):
                # never skip an import silently: a missed dependency would let a stale output be served
                raise RuntimeError(f"{code.co_filename}:{instruction.positions.lineno if instruction.positions else '?'}: "
                                   f"cannot read the import of {instruction.argval!r} from this Python's bytecode")
            yield level, fromlist, str(instruction.argval), top
        consts = consts[-1:] + [instruction.argval] if instruction.opname in _CONSTANT_LOADS else []
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _import_instructions(const, top=False)


def _import_targets(level: int, target: str, fromlist: tuple[str, ...] | None, package: str,
                    tracked: set[str]) -> list[str]:
    """The tracked modules an import binds (a sub-module when `from pkg import sub` names one)."""
    if fromlist is None:
        names = [target]
    else:
        base = _absolute(level, target, package)
        if base.partition(".")[0] not in tracked:  # never look up (and so import) an untracked package
            return []
        names = [sub if _exists(sub := f"{base}.{alias}") else base for alias in fromlist]
    return sorted({n for n in names if n.partition(".")[0] in tracked and _exists(n)})


def _absolute(level: int, target: str, package: str) -> str:
    if not level:
        return target
    parts = package.split(".")
    parts = parts[: len(parts) - level + 1]
    return ".".join([*parts, target] if target else parts)


def _registers_members(level: int, target: str, fromlist: tuple[str, ...] | None, package: str) -> bool:
    """Whether an import is ``from <package> import a, b`` binding only sub-modules: a registration import."""
    return (level == 0 and target == package and fromlist is not None
            and all(_exists(f"{package}.{alias}") for alias in fromlist))


def _token_digest(source: bytes, registry: str | None) -> str:
    """sha256 of the source's tokens, one logical line at a time, leaving out comments, blank lines,
    indentation width, docstrings and every other statement that is only a plain string literal (a
    no-op), and, in a registry package, its registration imports."""
    digest = hashlib.sha256()
    line: list[tokenize.TokenInfo] = []
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
            continue
        if token.type in (tokenize.INDENT, tokenize.DEDENT):
            digest.update(tokenize.tok_name[token.type].encode() + b"\0")
            continue
        line.append(token)
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if not _is_no_op(line) and not (registry and _is_registration(line, registry)):
                digest.update(b"\1".join(t.string.encode() for t in line) + b"\0")
            line = []
    return digest.hexdigest()


def _is_no_op(line: list[tokenize.TokenInfo]) -> bool:
    """A logical line that is only plain (not f-) string literals: a docstring or a bare string."""
    strings = line[:-1]
    return bool(strings) and all(t.type == tokenize.STRING and "f" not in t.string.partition(t.string[-1])[0].lower()
                                 for t in strings)


def _is_registration(line: list[tokenize.TokenInfo], package: str) -> bool:
    """``from <package> import a, b`` (parentheses allowed, no aliases) where each name is a sub-module."""
    words = [t.string for t in line[:-1] if t.string not in ("(", ")", ",")]
    if len(words) < 4 or words[0] != "from" or "import" not in words:
        return False
    at = words.index("import")
    names = words[at + 1:]
    return "".join(words[1:at]) == package and "as" not in names \
        and all(_exists(f"{package}.{alias}") for alias in names)


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
