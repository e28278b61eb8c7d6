"""Datasets: the in-memory ImageDataset, the DATASETS registry of loaders, Parquet I/O, splitting.

    from poison_core.config import DatasetConfig
    from poison_core.data import load_dataset

    splits = load_dataset(DatasetConfig(name="digits", n_train=500, seed=0))
    splits.train.images  # uint8 (500, 8, 8, 1)

Registered loaders: digits (embedded default), fashion-mnist, cifar10, imagefolder, parquet.
`DATASETS` lives in poison_core.data.registry, which the loader modules register into; nothing here
imports poison_core.config at import time, and config never imports this package (names are checked by poison_core.members).
"""

from poison_core.data.registry import DATASETS
from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.data.parquet import read_split, write_split
from poison_core.data.splits import split_dataset, subsample
from poison_core.data.loaders import load_dataset
from poison_core.data import cifar, imagefolder  # noqa: F401  (register their loaders)

__all__ = ["ImageDataset", "DatasetSplits", "DATASETS", "load_dataset", "write_split", "read_split",
           "split_dataset", "subsample"]
