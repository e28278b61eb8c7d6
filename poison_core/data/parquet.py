"""Belladonna's dataset file: one split of an ImageDataset as one Parquet file (format version 1).

Columns: ``id: int64``, ``image: fixed_size_list<uint8>[H*W*C]`` (HWC order), ``label: int16``.
Schema metadata (JSON values): ``belladonna.shape`` [H, W, C], ``belladonna.class_names``,
``belladonna.name``, ``belladonna.checksum`` (ImageDataset.checksum()), ``belladonna.format_version``.
Writes are atomic and deterministic (the same dataset gives a byte-identical file); reads
recompute the checksum, so a tampered or damaged file is refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.io import (atomic_write_bytes, bytes_to_table, column_to_images, images_to_column, read_bytes,
                            table_to_bytes)
from poison_core.limits import check_image_shape

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
META_SHAPE = "belladonna.shape"
META_CLASSES = "belladonna.class_names"
META_NAME = "belladonna.name"
META_CHECKSUM = "belladonna.checksum"
META_VERSION = "belladonna.format_version"
META_KEYS = (META_SHAPE, META_CLASSES, META_NAME, META_CHECKSUM, META_VERSION)
LABEL_MAX = int(np.iinfo(np.int16).max)


def _schema(row_width: int) -> pa.Schema:
    """The column schema of a dataset file whose images have `row_width` = H*W*C pixels."""
    return pa.schema([("id", pa.int64()), ("image", pa.list_(pa.uint8(), row_width)), ("label", pa.int16())])


def dataset_to_table(dataset: ImageDataset) -> pa.Table:
    """The Arrow table (with Belladonna schema metadata) that `write_split` stores."""
    if dataset.num_classes - 1 > LABEL_MAX:
        raise DatasetError(f"dataset {dataset.name!r}: {dataset.num_classes} classes; the int16 label column "
                           f"allows at most {LABEL_MAX + 1}")
    meta = {META_SHAPE: list(dataset.image_shape), META_CLASSES: list(dataset.class_names),
            META_NAME: dataset.name, META_CHECKSUM: dataset.checksum(), META_VERSION: FORMAT_VERSION}
    metadata = {key.encode(): json.dumps(value).encode() for key, value in meta.items()}
    schema = _schema(int(np.prod(dataset.image_shape))).with_metadata(metadata)
    columns = [pa.array(dataset.ids, type=pa.int64()), images_to_column(dataset.images),
               pa.array(dataset.labels.astype(np.int16), type=pa.int16())]
    return pa.Table.from_arrays(columns, schema=schema)


def write_split(dataset: ImageDataset, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write one split to `uri` (any fsspec URI) atomically."""
    atomic_write_bytes(uri, table_to_bytes(dataset_to_table(dataset)), storage_options)
    log.info("wrote dataset %r (%d samples) to %s", dataset.name, len(dataset), uri)


def _metadata(table: pa.Table, what: str) -> dict[str, Any]:
    """The decoded Belladonna metadata of `table`; a missing or malformed key raises DatasetError."""
    raw = table.schema.metadata or {}
    meta = {}
    for key in META_KEYS:
        if key.encode() not in raw:
            raise DatasetError(f"{what}: schema metadata {key!r} is missing; not a Belladonna dataset file")
        try:
            meta[key] = json.loads(raw[key.encode()])
        except (ValueError, UnicodeDecodeError):
            raise DatasetError(f"{what}: schema metadata {key!r} is not valid JSON") from None
    if meta[META_VERSION] != FORMAT_VERSION:
        raise DatasetError(f"{what}: format version {meta[META_VERSION]!r} is not supported "
                           f"(allowed: {FORMAT_VERSION!r})")
    shape = meta[META_SHAPE]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise DatasetError(f"{what}: schema metadata {META_SHAPE!r} must be [H, W, C] positive integers, got {shape!r}")
    check_image_shape(shape, what)
    if not (isinstance(meta[META_CLASSES], list) and all(isinstance(c, str) for c in meta[META_CLASSES])):
        raise DatasetError(f"{what}: schema metadata {META_CLASSES!r} must be a list of strings")
    return meta


def _check_columns(table: pa.Table, row_width: int, what: str) -> None:
    """Raise DatasetError unless `table` has exactly the expected columns and no nulls."""
    expected = _schema(row_width)
    if table.schema.remove_metadata() != expected:
        got = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        want = ", ".join(f"{f.name}: {f.type}" for f in expected)
        raise DatasetError(f"{what}: columns are ({got}); expected ({want})")
    for name in table.column_names:
        if table.column(name).null_count:
            raise DatasetError(f"{what}: column {name!r} has {table.column(name).null_count} null values; none allowed")
    if any(chunk.flatten().null_count for chunk in table.column("image").chunks):
        raise DatasetError(f"{what}: column 'image' has null pixel values; none allowed")


def table_to_dataset(table: pa.Table, what: str) -> ImageDataset:
    """Inverse of `dataset_to_table`; checks columns, metadata and the checksum."""
    meta = _metadata(table, what)
    shape = tuple(meta[META_SHAPE])
    _check_columns(table, int(np.prod(shape)), what)
    dataset = ImageDataset(
        images=column_to_images(table.column("image"), shape, what),
        labels=table.column("label").to_numpy().astype(np.int64),
        class_names=tuple(meta[META_CLASSES]),
        ids=table.column("id").to_numpy().astype(np.int64),
        name=str(meta[META_NAME]),
    )
    computed = dataset.checksum()
    if computed != meta[META_CHECKSUM]:
        raise DatasetError(f"{what}: checksum mismatch: stored {meta[META_CHECKSUM]}, computed {computed}")
    return dataset


def read_split(uri: str, storage_options: dict[str, Any] | None = None) -> ImageDataset:
    """Read one split written by `write_split`, verifying its checksum."""
    what = f"dataset file {uri!r}"
    dataset = table_to_dataset(bytes_to_table(read_bytes(uri, storage_options), what), what)
    log.debug("read dataset %r (%d samples) from %s", dataset.name, len(dataset), uri)
    return dataset
