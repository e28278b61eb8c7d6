"""The DATASETS registry of loaders (its own module, so the loaders register into it without importing the
package that imports them)."""

from poison_core.registry import Registry

DATASETS: Registry = Registry("dataset", group="belladonna.datasets")
DATASETS.check = lambda obj: None if callable(obj) else f"{obj!r} is not a loader (a callable cfg -> DatasetSplits)"
