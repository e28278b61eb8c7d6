"""Dataset loaders for the DATASETS registry: digits, fashion-mnist and our own Parquet splits.

Each loader is a function ``(cfg: DatasetConfig) -> DatasetSplits``. It reads the source splits
(or splits a source without an official test set by ``cfg.test_fraction``), then
:func:`finish_splits` applies ``n_train`` / ``n_test`` / ``val_fraction``, all by ``cfg.seed``.
Ids are the sample's index in its source file (train and test each count from 0), except where a
single source is split, where both splits index the one source.
cifar10 and imagefolder live in their own modules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from poison_core.data.registry import DATASETS
from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.data.idx import read_idx_images, read_idx_labels
from poison_core.data.parquet import read_split
from poison_core.data.splits import TEST_STAGE, check_splits_agree, finish_splits, split_dataset
from poison_core.errors import DatasetError
from poison_core.io import exists

if TYPE_CHECKING:
    from poison_core.config import DatasetConfig

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HELP = f"run `apt-get install dataset-fashion-mnist` (installs {FASHION_MNIST_DIR}) or set dataset.path"


def load_dataset(cfg: "DatasetConfig") -> DatasetSplits:
    """The splits of the dataset named by `cfg.name`, subsampled as `cfg` asks."""
    return DATASETS.get(cfg.name)(cfg)


def split_single_source(cfg: "DatasetConfig", full: ImageDataset, base: str) -> DatasetSplits:
    """Split a dataset without an official test set by cfg.test_fraction (stratified), then finish."""
    train, test = split_dataset(full, cfg.test_fraction, (cfg.seed, TEST_STAGE))
    return finish_splits(cfg, train.replace(name=f"{base}/train"), test.replace(name=f"{base}/test"))


def digits_sources(cfg: "DatasetConfig") -> list[tuple[str, str]]:
    """The file scikit-learn reads the digits from (its version's copy of the UCI test set)."""
    from importlib.resources import files

    return [("digits.csv.gz", str(files("sklearn.datasets") / "data" / "digits.csv.gz"))]


@DATASETS.register("digits", paper="Alpaydin & Kaynak, 'Optical Recognition of Handwritten Digits', UCI 1998",
                   summary="1,797 8x8 grayscale digits shipped with scikit-learn; always available offline",
                   sources=digits_sources)
def load_digits(cfg: "DatasetConfig") -> DatasetSplits:
    """scikit-learn's digits, pixel values 0..16 scaled to 0..255 by round(v * 255 / 16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    full = ImageDataset(images, bunch.target.astype(np.int64), tuple(str(d) for d in range(10)), name="digits")
    return split_single_source(cfg, full, "digits")


def _find_idx(folder: Path, stem: str) -> Path:
    """`folder/stem` or `folder/stem.gz` (also under torchvision's FashionMNIST/raw layout)."""
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for candidate in (base / stem, base / f"{stem}.gz"):
            if candidate.exists():  # a folder or a FIFO by that name is refused when read
                return candidate
    raise DatasetError(f"fashion-mnist file {stem!r}(.gz) not found in {str(folder)!r}; {FASHION_MNIST_HELP}")


def _read_fashion_split(folder: Path, prefix: str, name: str) -> ImageDataset:
    """One split ('train' or 't10k') of the IDX files; ids are positions in the file."""
    images = read_idx_images(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx_labels(labels_path)
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(f"fashion-mnist {prefix}: {len(labels)} labels in {str(labels_path)!r} for images of "
                           f"shape {images.shape}; expected one label per (H, W) image")
    return ImageDataset(images[..., None], labels.astype(np.int64), FASHION_MNIST_CLASSES, name=name)


def _fashion_folder(cfg: "DatasetConfig") -> Path:
    folder = Path(cfg.path or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise DatasetError(f"dataset.path: fashion-mnist folder {str(folder)!r} does not exist; {FASHION_MNIST_HELP}")
    return folder


def fashion_mnist_sources(cfg: "DatasetConfig") -> list[tuple[str, str]]:
    """The four IDX files the loader reads."""
    folder = _fashion_folder(cfg)
    stems = [f"{split}-{kind}-idx{dim}-ubyte" for split in ("train", "t10k")
             for kind, dim in (("images", 3), ("labels", 1))]
    return [(stem, str(_find_idx(folder, stem))) for stem in stems]


@DATASETS.register("fashion-mnist", paper="Xiao, Rasul & Vollgraf, 'Fashion-MNIST', arXiv:1708.07747, 2017",
                   summary="70,000 28x28 grayscale clothing images (60k train / 10k test) from the IDX files",
                   sources=fashion_mnist_sources)
def load_fashion_mnist(cfg: "DatasetConfig") -> DatasetSplits:
    """The original IDX files (raw or .gz) in cfg.path, default /usr/share/datasets/fashion-mnist."""
    folder = _fashion_folder(cfg)
    train = _read_fashion_split(folder, "train", "fashion-mnist/train")
    test = _read_fashion_split(folder, "t10k", "fashion-mnist/test")
    log.info("read Fashion-MNIST from %s: %d train, %d test", folder, len(train), len(test))
    return finish_splits(cfg, train, test)


def _parquet_root(cfg: "DatasetConfig") -> str:
    if not cfg.path:
        raise DatasetError("dataset.path: the parquet dataset needs a folder or URI holding train.parquet "
                           "and test.parquet")
    root = cfg.path.rstrip("/")
    for split in ("train", "test"):
        if not exists(f"{root}/{split}.parquet"):
            raise DatasetError(f"dataset.path: {root}/{split}.parquet does not exist; write the splits with "
                               "poison_core.data.write_split")
    return root


def parquet_sources(cfg: "DatasetConfig") -> list[tuple[str, str]]:
    """train.parquet, test.parquet and val.parquet when present."""
    root = _parquet_root(cfg)
    splits = ["train", "test"] + (["val"] if exists(f"{root}/val.parquet") else [])
    return [(f"{split}.parquet", f"{root}/{split}.parquet") for split in splits]


@DATASETS.register("parquet", summary="Belladonna Parquet splits (train/test[/val].parquet) in a folder or fsspec URI",
                   sources=parquet_sources)
def load_parquet(cfg: "DatasetConfig") -> DatasetSplits:
    """train.parquet and test.parquet (optional val.parquet) written by write_split under cfg.path."""
    root = _parquet_root(cfg)
    train, test = read_split(f"{root}/train.parquet"), read_split(f"{root}/test.parquet")
    val = read_split(f"{root}/val.parquet") if exists(f"{root}/val.parquet") else None
    check_splits_agree(root, train, test, val)  # named by the folder, so the line says which files
    return finish_splits(cfg, train, test, val)
