"""Datasets: the in-memory ImageDataset, the DATASETS registry of loaders, Parquet I/O, splitting.

    from poison_core.config import DatasetConfig
    from poison_core.data import load_dataset

    splits = load_dataset(DatasetConfig(name="digits", n_train=500, seed=0))
    splits.train.images  # uint8 (500, 8, 8, 1)

Registered loaders: digits (embedded default), fashion-mnist, cifar10, imagefolder, parquet.
`DATASETS` is defined before the loader modules are imported, so they can register into it;
nothing here imports poison_core.config at import time (config imports this package lazily).
"""

from poison_core.registry import Registry

DATASETS: Registry = Registry("dataset", group="belladonna.datasets")
DATASETS.check = lambda obj: None if callable(obj) else f"{obj!r} is not a loader (a callable cfg -> DatasetSplits)"

from poison_core.data.dataset import DatasetSplits, ImageDataset  # noqa: E402
from poison_core.data.parquet import read_split, write_split  # noqa: E402
from poison_core.data.splits import split_dataset, subsample  # noqa: E402
from poison_core.data.loaders import load_dataset  # noqa: E402
from poison_core.data import cifar, imagefolder  # noqa: E402,F401  (register their loaders)

__all__ = ["ImageDataset", "DatasetSplits", "DATASETS", "load_dataset", "write_split", "read_split",
           "split_dataset", "subsample"]
