"""CIFAR-10 from a local ``cifar-10-batches-py`` folder, read with a restricted unpickler.

The batches are Python pickles. Unpickling runs arbitrary code, so they are read with the restricted
unpickler of poison_core.safe_pickle, which resolves exactly the globals a numpy array needs
and refuses every other one. A download (only when ``cfg.download`` is set and the folder is missing)
fetches and md5-checks the official archive through torchvision's download helper, then reads it
with the same restricted unpickler.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poison_core.data.registry import DATASETS
from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.data.splits import finish_splits
from poison_core.errors import DatasetError
from poison_core.safe_pickle import numpy_globals, safe_loads
from poison_core.paths import read_regular

if TYPE_CHECKING:
    from poison_core.config import DatasetConfig

log = logging.getLogger(__name__)

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
DEFAULT_ROOT = Path("~/.cache/belladonna/cifar10")
ROW_BYTES = 32 * 32 * 3
CIFAR_HELP = "set dataset.path to a folder holding cifar-10-batches-py (or dataset.download: true with a network)"


def load_pickle(path: Path) -> Any:
    """Unpickle `path` with CifarUnpickler (encoding='bytes'); any failure raises DatasetError."""
    data = read_regular(path, "CIFAR file")
    return safe_loads(data, numpy_globals(), f"CIFAR file {str(path)!r}", encoding="bytes")


def _field(obj: Any, key: str, path: Path) -> Any:
    """obj[key] of an unpickled dict, accepting bytes or str keys; else DatasetError."""
    if not isinstance(obj, dict):
        raise DatasetError(f"CIFAR file {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    for candidate in (key.encode(), key):
        if candidate in obj:
            return obj[candidate]
    raise DatasetError(f"CIFAR file {str(path)!r} has no {key!r} entry")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3) HWC, labels int64 (N,)) of one batch file."""
    batch = load_pickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise DatasetError(f"CIFAR file {str(path)!r}: 'data' must be uint8 (N, {ROW_BYTES}), "
                           f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or \
            not all(isinstance(x, (int, np.integer)) for x in labels):
        raise DatasetError(f"CIFAR file {str(path)!r}: 'labels' must be {len(data)} integers")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_class_names(path: Path) -> tuple[str, ...]:
    """The label names of batches.meta, decoded from bytes."""
    names = _field(load_pickle(path), "label_names", path)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"CIFAR file {str(path)!r}: 'label_names' must be a list of strings")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def resolve_folder(root: Path) -> Path | None:
    """`root` itself if it holds the batches, else `root/cifar-10-batches-py` if that does, else None."""
    for folder in (root, root / BATCHES_DIR):
        if (folder / META_FILE).is_file():
            return folder
    return None


def download(root: Path) -> None:
    """Fetch and extract the official archive into `root` (md5-checked); failure raises DatasetError."""
    try:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures all end here
        raise DatasetError(f"dataset.download: fetching CIFAR-10 into {str(root)!r} failed "
                           f"({type(exc).__name__}: {exc}); no network? {CIFAR_HELP}") from None


def read_folder(folder: Path) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of a cifar-10-batches-py folder; ids are positions in batch order."""
    classes = read_class_names(folder / META_FILE)
    parts = [read_batch(folder / name) for name in TRAIN_BATCHES]
    train = ImageDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         classes, name="cifar10/train")
    test_images, test_labels = read_batch(folder / TEST_BATCH)
    return train, ImageDataset(test_images, test_labels, classes, name="cifar10/test")


def _batches_folder(cfg: "DatasetConfig") -> Path:
    """The folder holding the batches (downloaded first when cfg.download asks and it is missing)."""
    root = Path(cfg.path).expanduser() if cfg.path else DEFAULT_ROOT.expanduser()
    folder = resolve_folder(root)
    if folder is None and cfg.download:
        download(root)
        folder = resolve_folder(root)
    if folder is None:
        raise DatasetError(f"dataset.path: no CIFAR-10 batches ({META_FILE}) in {str(root)!r} or "
                           f"{str(root / BATCHES_DIR)!r}; {CIFAR_HELP}")
    return folder


def cifar10_sources(cfg: "DatasetConfig") -> list[tuple[str, str]]:
    """The meta file and the six batches the loader reads."""
    folder = _batches_folder(cfg)
    return [(name, str(folder / name)) for name in (META_FILE, *TRAIN_BATCHES, TEST_BATCH)]


@DATASETS.register("cifar10", paper="Krizhevsky, 'Learning Multiple Layers of Features from Tiny Images', 2009",
                   summary="60,000 32x32 colour images in 10 classes from a local cifar-10-batches-py folder",
                   sources=cifar10_sources)
def load_cifar10(cfg: "DatasetConfig") -> DatasetSplits:
    """CIFAR-10 from cfg.path (the batches folder or its parent), default ~/.cache/belladonna/cifar10."""
    folder = _batches_folder(cfg)
    train, test = read_folder(folder)
    log.info("read CIFAR-10 from %s: %d train, %d test", folder, len(train), len(test))
    return finish_splits(cfg, train, test)
