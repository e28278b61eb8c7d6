"""Dataset fingerprints: a hash of the bytes a dataset is read from, never of its path.

Each loader in the DATASETS registry declares its source files (``sources=`` on registration: a
function ``(cfg) -> [(name, uri), ...]``); the fingerprint hashes every file's name relative to the
dataset, its size and its content. Rewriting an image in place, replacing a Parquet split or moving
the same files to another folder is therefore seen for what it is: new content, or the same.

Content is read in full (sha256) for local files: measured in `benchmarks/results/keys.md`, this takes
tens of milliseconds for Fashion-MNIST's 30 MB of IDX files, so no cache of (path, size, mtime) is kept
and no same-size rewrite within the file system's timestamp granularity can go unseen. A remote
object (S3) is identified by its size and the ETag its server computed from its content, so an
unchanged Parquet split on S3 is not downloaded again to be recognised; an object store that reports
no ETag is read and hashed like a local file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from poison_core.data.registry import DATASETS
from poison_core.errors import DatasetError
from poison_core.io import filesystem

if TYPE_CHECKING:
    from poison_core.config import DatasetConfig

Source = tuple[str, str]
"""(name within the dataset, local path or fsspec URI)."""


def dataset_fingerprint(cfg: "DatasetConfig") -> str:
    """sha256 (16 hex chars) over the dataset's source files: names, sizes and contents."""
    entry = DATASETS.entry(cfg.name)
    sources = entry.extra.get("sources")
    if sources is None:
        raise DatasetError(f"dataset {cfg.name!r} declares no source files; register it with sources=...")
    return files_fingerprint(sources(cfg))


def files_fingerprint(files: Sequence[Source]) -> str:
    """sha256 (16 hex chars) over (name, size, content digest) of every file, in name order."""
    digest = hashlib.sha256()
    for name, uri in sorted(files):
        size, content = file_digest(uri)
        digest.update(f"{name}\0{size}\0{content}\n".encode())
    return digest.hexdigest()[:16]


def file_digest(uri: str) -> tuple[int, str]:
    """(size, content digest) of one file: sha256 of the bytes, or a remote store's ETag."""
    if "://" not in uri or uri.startswith("file://"):
        return _local_digest(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DatasetError(f"dataset source {uri!r} does not exist") from None
    etag = info.get("ETag") or info.get("etag")
    size = int(info.get("size") or 0)
    if etag:
        return size, f"etag:{str(etag).strip(chr(34))}"
    with fs.open(path, "rb") as handle:
        return size, hashlib.file_digest(handle, "sha256").hexdigest()


def _local_digest(path: str) -> tuple[int, str]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"dataset source {path!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"dataset source {path!r} is not a regular file")
    with open(path, "rb") as handle:
        return info.st_size, hashlib.file_digest(handle, "sha256").hexdigest()
