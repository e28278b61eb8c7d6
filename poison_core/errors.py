"""Typed errors. Each message is one line that names the field or object at fault."""

from __future__ import annotations


class BelladonnaError(Exception):
    """Base of every error Belladonna raises on purpose."""


class InputError(BelladonnaError):
    """Bad user input (config, name, file). The CLI maps it to exit code 2."""


class ConfigError(InputError, ValueError):
    """A config field is missing, unknown or out of its allowed range."""


class UnknownNameError(InputError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(InputError):
    """A plug-in member (entry point or import string) that cannot be used: it fails to import, is not
    what its registry holds, registers a name twice or shadows a built-in."""


class DatasetError(InputError):
    """A dataset file is missing, truncated, corrupt or of the wrong shape."""


class AuditError(BelladonnaError):
    """A PoisonSet breaks its threat model (epsilon, budget, labels, ids)."""


class WorkerLost(BelladonnaError):
    """A stateful worker (a Ray actor of MetaPoison's ensemble) died; its state is gone."""
