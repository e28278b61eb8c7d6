"""The one in-memory dataset form: uint8 NHWC images, int64 labels, int64 ids, class names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poison_core.errors import DatasetError


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A split of labelled images.

    images: uint8 array (N, H, W, C) with C in {1, 3}; labels: int64 (N,) in [0, num_classes);
    ids: int64 (N,) unique sample ids, stable across subsampling and poisoning (default 0..N-1).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    ids: np.ndarray = field(default=None)  # type: ignore[arg-type]  # filled in __post_init__
    name: str = ""

    def __post_init__(self) -> None:
        images, labels = self.images, np.asarray(self.labels)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(f"dataset {self.name!r}: images must be a uint8 array (N, H, W, C), "
                               f"got {getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
        if images.shape[-1] not in (1, 3):
            raise DatasetError(f"dataset {self.name!r}: images must have 1 or 3 channels, got {images.shape[-1]}")
        if labels.shape != (len(images),):
            raise DatasetError(f"dataset {self.name!r}: {len(labels)} labels for {len(images)} images")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"dataset {self.name!r}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        k = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise DatasetError(f"dataset {self.name!r}: label {int(labels.max()) if labels.max() >= k else int(labels.min())} "
                               f"is outside 0..{k - 1} ({k} classes)")
        ids = np.arange(len(images), dtype=np.int64) if self.ids is None else np.asarray(self.ids)
        if ids.shape != (len(images),) or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(f"dataset {self.name!r}: ids must be {len(images)} integers")
        ids = ids.astype(np.int64, copy=False)
        if len(np.unique(ids)) != len(ids):
            raise DatasetError(f"dataset {self.name!r}: ids are not unique")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ImageDataset":
        """The samples at positional `indices` (ids are kept)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, self.ids[idx],
                            self.name if name is None else name)

    def replace(self, **changes) -> "ImageDataset":
        """A copy with some of images / labels / ids / class_names / name replaced."""
        fields: dict[str, Any] = {"images": self.images, "labels": self.labels, "class_names": self.class_names,
                                  "ids": self.ids, "name": self.name}
        fields.update(changes)
        return ImageDataset(**fields)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positional indices of `ids`; raises DatasetError naming the first id not present."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), bool)
        if not np.all(found):
            missing = ids[~found][0]
            raise DatasetError(f"dataset {self.name!r}: id {int(missing)} is not present")
        return order[pos]

    def checksum(self) -> str:
        """sha256 over shape, ids, labels, images and class names: equal content, equal checksum."""
        h = hashlib.sha256()
        h.update(repr((self.images.shape, self.class_names)).encode())
        for arr in (self.ids, self.labels.astype(np.int64), self.images):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class DatasetSplits:
    """Train / validation / test splits of one dataset (val may be empty)."""

    train: ImageDataset
    test: ImageDataset
    val: ImageDataset | None = None
