"""One registry mechanism for attacks, defenses, models and datasets (after timm's `_registry`).

    MODELS = Registry("model", group="belladonna.models")

    @MODELS.register("convnet", paper="...", summary="...")
    def convnet(...): ...

    MODELS.get("convnet")             # the object
    MODELS.get("mypkg.nets:WideNet")  # an importable object named by an import string
    MODELS.get("nope")                # UnknownNameError: unknown model 'nope'; known: convnet, ...

Members come from three places, all checked by the registry's ``check`` (e.g. "an Attack subclass"):

* built-ins, registered by decorator when their module is imported;
* plug-ins: installed distributions' entry points in the registry's group (``belladonna.attacks``,
  ``.defenses``, ``.models``, ``.datasets``); the entry point's name is the member's name. They are
  listed when first needed and imported only when a config or a listing uses them (lazily);
* import strings ``package.module:attribute``, for code that is importable but not registered.

A plug-in that fails to import, fails the check, registers a name twice or shadows a built-in is
*broken*: using it raises one :class:`PluginError` line naming the entry point, its distribution and
the error; every other member still works, and listings show it as broken.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from poison_core.errors import PluginError, UnknownNameError

T = TypeVar("T")
BUILT_IN = "built-in"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with the paper it implements, a one-line summary and where it comes from
    (``built-in``, ``<distribution> <version>`` for a plug-in, ``import string``)."""

    name: str
    obj: T
    paper: str = ""
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = BUILT_IN


class Registry(Generic[T]):
    """Name -> object map filled by a decorator, entry points and import strings; lookups of unknown
    names fail loudly. `check(obj)` returns why an object cannot be a member (None when it can);
    `adapt(obj)` turns an accepted object into the member (e.g. a torchvision model into a builder)."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self.check: Callable[[Any], str | None] = lambda obj: None
        self.adapt: Callable[[Any], Any] = lambda obj: obj
        self._entries: dict[str, Entry[T]] = {}
        self._pending: dict[str, importlib.metadata.EntryPoint] = {}
        self._broken: dict[str, str] = {}
        self._imported: dict[str, Entry[T]] = {}
        """Import-string members, resolved on demand: usable by name, but not listed as registered."""
        self._discovered = False

    def register(self, name: str, *, paper: str = "", summary: str = "", **extra: Any) -> Callable[[T], T]:
        """Decorator: register `obj` under `name`. Registering a name twice is an error."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            point = self._pending.pop(name, None)
            if point is not None:  # a plug-in listed before this built-in registered
                self._broken[name] = (f"plug-in entry point {name!r} ({self.group}) from {_distribution(point)}: "
                                      f"shadows the built-in {self.kind} {name!r}")
            self._entries[name] = Entry(name, obj, paper, summary, dict(extra))
            return obj

        return decorator

    def entry(self, name: str) -> Entry[T]:
        if name in self._entries:
            return self._entries[name]
        if name in self._imported:
            return self._imported[name]
        self._discover()
        if name in self._pending:
            self._load(name)
        if name in self._broken:
            raise PluginError(self._broken[name])
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return self._import_string(name)
        known = ", ".join(self.names()) or "(none)"
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known} "
                               f"(or an import string package.module:attribute)")

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> list[str]:
        """Built-in and plug-in names (plug-ins are not imported for this)."""
        self._discover()
        return sorted({*self._entries, *self._pending} - set(self._broken))

    def entries(self) -> Iterator[Entry[T]]:
        """Every usable member, plug-ins imported (a listing needs their papers and summaries)."""
        self._discover()
        for name in list(self._pending):
            self._load(name)
        for name in sorted(self._entries):
            yield self._entries[name]

    def broken(self) -> dict[str, str]:
        """Plug-ins that cannot be used, with the one-line reason (after loading the pending ones)."""
        self._discover()
        for name in list(self._pending):
            self._load(name)
        return dict(sorted(self._broken.items()))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.entry(name)
        except (UnknownNameError, PluginError):
            return False
        return True

    def _discover(self) -> None:
        """List the group's entry points once (reading metadata only; nothing is imported)."""
        if self._discovered or self.group is None:
            return
        self._discovered = True
        for point in importlib.metadata.entry_points(group=self.group):
            where = _distribution(point)
            if point.name in self._entries:
                self._broken[point.name] = (f"plug-in entry point {point.name!r} ({self.group}) from {where}: "
                                            f"shadows the built-in {self.kind} {point.name!r}")
            elif point.name in self._pending:
                first = _distribution(self._pending.pop(point.name))
                self._broken[point.name] = (f"plug-in entry point {point.name!r} ({self.group}) from {where}: "
                                            f"the name is registered twice (also by {first})")
            elif point.name not in self._broken:
                self._pending[point.name] = point

    def _load(self, name: str) -> None:
        point = self._pending.pop(name)
        where = _distribution(point)
        try:
            obj = point.load()
            reason = self.check(obj)
            if reason is None:
                obj = self.adapt(obj)
        except Exception as exc:  # noqa: BLE001 - a plug-in may fail in any way; it must not take the rest down
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if reason is not None:
            self._broken[name] = f"plug-in entry point {name!r} ({self.group}) from {where}: {reason}"
            return
        if name in self._entries and self._entries[name].obj is not obj:
            self._broken[name] = (f"plug-in entry point {name!r} ({self.group}) from {where}: "
                                  f"the name is registered twice")
            return
        previous = self._entries.get(name)
        self._entries[name] = Entry(name, obj, getattr(obj, "paper", "") or (previous.paper if previous else ""),
                                    getattr(obj, "summary", "") or (previous.summary if previous else ""),
                                    dict(previous.extra) if previous else _extra(obj), where)

    def _import_string(self, name: str) -> Entry[T]:
        module, _, attribute = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - an import string runs the user's code
            raise PluginError(f"{self.kind} {name!r}: cannot import {attribute!r} from {module!r} "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        reason = self.check(obj)
        if reason is not None:
            raise PluginError(f"{self.kind} {name!r}: {reason}")
        entry = Entry(name, self.adapt(obj), getattr(obj, "paper", ""), getattr(obj, "summary", ""), _extra(obj),
                      "import string")
        self._imported[name] = entry
        return entry


def _extra(obj: Any) -> dict[str, Any]:
    """Registration extras a plug-in object declares as attributes (a dataset loader's `sources`)."""
    return {"sources": obj.sources} if callable(getattr(obj, "sources", None)) else {}


def _distribution(point: importlib.metadata.EntryPoint) -> str:
    dist = point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
