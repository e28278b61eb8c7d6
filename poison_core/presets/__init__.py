"""Benchmark presets shipped inside the package, so they exist wherever Belladonna is installed.

* ``quickstart``: the CLI's default (``belladonna run`` with no config): digits, two attacks, one defense.
* ``nightly``: the scheduled deployment's default (``prefect.yaml``, ``config: nightly``): digits, the
  label-flip and backdoor attacks against no defense and two filter / robust-training defenses.

A benchmark's ``config`` may name a preset wherever it takes a path or YAML text: :func:`resolve`
turns a bare name (no path separator, no suffix, no file of that name) into the preset's YAML text.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from poison_core.errors import ConfigError

SUFFIX = ".yaml"


def names() -> list[str]:
    """The shipped presets' names, sorted."""
    return sorted(p.name.removesuffix(SUFFIX) for p in resources.files(__name__).iterdir()
                  if p.name.endswith(SUFFIX))


def preset_text(name: str) -> str:
    """The YAML text of the preset `name`; a ConfigError naming the known presets if there is none."""
    if name not in names():
        raise ConfigError(f"config {name!r} is neither a file nor a preset (presets: {', '.join(names())})")
    return resources.files(__name__).joinpath(f"{name}{SUFFIX}").read_text(encoding="utf-8")


def is_preset_name(source: str | Path) -> bool:
    """Whether `source` reads as a preset's name rather than a path or YAML text: a bare word such as
    ``nightly`` that names no existing file."""
    if not isinstance(source, str) or not source or "\n" in source or source.lstrip().startswith("{"):
        return False
    return "/" not in source and "\\" not in source and not Path(source).suffix and not Path(source).exists()


def resolve(source: str | Path) -> str | Path:
    """`source` unchanged (a path or YAML text), or the preset's YAML text when it names a preset."""
    return preset_text(source) if is_preset_name(source) else source  # type: ignore[arg-type]
