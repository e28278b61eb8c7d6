"""A folder of images, one sub-folder per class: ``root/<class_name>/*.png|jpg|jpeg``.

Class names are the sorted sub-folder names. When ``root/train`` and ``root/test`` both exist
they are the splits (test classes must be a subset of train's); otherwise the one folder is
split by ``cfg.test_fraction``. Grayscale ("L") images give 1 channel, everything else is
converted to RGB; all images must share one (H, W, C). Ids are positions in (class, file name)
order within each source folder.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from poison_core.data.registry import DATASETS
from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.data.loaders import split_single_source
from poison_core.data.splits import finish_splits
from poison_core.errors import DatasetError
from poison_core.limits import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from poison_core.paths import read_regular

if TYPE_CHECKING:
    from poison_core.config import DatasetConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def class_folders(root: Path) -> list[str]:
    """Sorted names of the class sub-folders of `root` (hidden folders ignored)."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"dataset.path: {str(root)!r} has no class sub-folders; expected <path>/<class>/*.png")
    return names


def read_image(path: Path) -> np.ndarray:
    """(H, W, C) uint8: 1 channel for grayscale 'L' images, else RGB."""
    try:
        with Image.open(io.BytesIO(read_regular(path, "image"))) as img:
            width, height = img.size  # from the header: checked before the pixels are decoded
            if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
                raise DatasetError(f"image {str(path)!r} is {width}x{height}, larger than the limit of "
                                   f"{MAX_IMAGE_PIXELS} pixels and {MAX_IMAGE_SIDE} per side")
            decoded = img if img.mode in ("L", "RGB") else img.convert("RGB")
            array = np.asarray(decoded, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"image {str(path)!r} cannot be read: {exc}") from None
    return array[..., None] if array.ndim == 2 else array


def class_files(root: Path, cls: str) -> list[Path]:
    """The image files of class `cls` under `root`, in file-name order (what ids count)."""
    folder = root / cls
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def read_class_tree(root: Path, class_names: tuple[str, ...], name: str) -> ImageDataset:
    """All images under root/<class>/ for the given classes; one shared shape is required."""
    images, labels, shape, first = [], [], None, None
    for label, cls in enumerate(class_names):
        for path in class_files(root, cls):
            image = read_image(path)
            if shape is None:
                shape, first = image.shape, path
            elif image.shape != shape:
                raise DatasetError(f"image {str(path)!r} has shape {image.shape}, but {str(first)!r} has {shape}; "
                                   "all images must share one (H, W, C)")
            images.append(image)
            labels.append(label)
    if not images:
        raise DatasetError(f"dataset.path: no {'/'.join(IMAGE_SUFFIXES)} images under {str(root)!r}")
    return ImageDataset(np.stack(images), np.asarray(labels, dtype=np.int64), class_names, name=name)


def _read_train_test(root: Path) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) from root/train/<class>/ and root/test/<class>/, with train's class list."""
    classes = class_folders(root / "train")
    unknown = sorted(set(class_folders(root / "test")) - set(classes))
    if unknown:
        raise DatasetError(f"dataset.path: class folder {str(root / 'test' / unknown[0])!r} has no counterpart "
                           f"in {str(root / 'train')!r}")
    train = read_class_tree(root / "train", tuple(classes), "imagefolder/train")
    test = read_class_tree(root / "test", tuple(classes), "imagefolder/test")
    if train.image_shape != test.image_shape:
        raise DatasetError(f"dataset.path: test images have shape {test.image_shape}, train images "
                           f"{train.image_shape}; all images must share one (H, W, C)")
    return train, test


def _layout(cfg: "DatasetConfig") -> tuple[Path, bool]:
    """(root, whether it has train/ and test/ sub-folders)."""
    if not cfg.path:
        raise DatasetError("dataset.path: imagefolder needs a folder with one sub-folder per class")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset.path: image folder {str(root)!r} does not exist")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise DatasetError(f"dataset.path: {str(root)!r} has {present}/ but no {absent}/; give both or neither")
    return root, has_train


def imagefolder_sources(cfg: "DatasetConfig") -> list[tuple[str, str]]:
    """Every image file the loader reads, named by its path relative to the root."""
    root, split = _layout(cfg)
    tops = [root / "train", root / "test"] if split else [root]
    return [(str(path.relative_to(root)), str(path)) for top in tops for cls in class_folders(top)
            for path in class_files(top, cls)]


@DATASETS.register("imagefolder", summary="a folder of images, one sub-folder per class, optional train/ and test/",
                   sources=imagefolder_sources)
def load_imagefolder(cfg: "DatasetConfig") -> DatasetSplits:
    """Images under cfg.path/<class>/ (or cfg.path/{train,test}/<class>/), read with PIL."""
    root, has_train = _layout(cfg)
    if has_train:
        train, test = _read_train_test(root)
        log.info("read image folder %s: %d train, %d test", root, len(train), len(test))
        return finish_splits(cfg, train, test)
    full = read_class_tree(root, tuple(class_folders(root)), "imagefolder")
    log.info("read image folder %s: %d images in %d classes", root, len(full), full.num_classes)
    return split_single_source(cfg, full, "imagefolder")
