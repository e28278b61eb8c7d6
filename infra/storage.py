"""The artifact store: a root URI (local folder or ``s3://bucket/prefix``) holding datasets, poisons, models.

Keys are relative, ``/``-separated, and every part matches ``[A-Za-z0-9._=+-]+`` (no ``.``/``..``),
so no key can leave the store. Writes are atomic (:func:`poison_core.io.atomic_write_bytes`). On S3,
requests use bounded botocore retries and short timeouts from :class:`~infra.settings.Settings`; an
unreachable endpoint, a missing bucket or a refused access becomes one :class:`StorageError` line that
names the URI and the cause. Stages name outputs with :func:`content_key` (a hash of every input).

S3 credentials are AWS's standard chain as botocore resolves it (:func:`infra.settings.s3_credential_source`):
a store no link of it can serve is refused when it is opened, in one line, not inside a worker later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import contextlib
import re
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.settings import Settings, s3_credential_source
from poison_core import io as core_io
from poison_core import poisons
from poison_core.data.dataset import ImageDataset
from poison_core.data.parquet import read_split
from poison_core.config import ThreatModel
from poison_core.errors import AuditError, BelladonnaError, InputError
from poison_core.poisons import PoisonSet

REASONS = "quarantine-reasons"
"""``quarantine-reasons/<UTC time>/<key>``: why the output at ``quarantine/<UTC time>/<key>`` was moved aside."""

log = logging.getLogger(__name__)

KEY_PART = re.compile(r"^[A-Za-z0-9._=+-]{1,255}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_PROTOCOLS = ("s3", "s3a")
HASH_CHARS = 16


class StorageError(BelladonnaError):
    """The store cannot be reached or refuses the request (network, missing bucket, access denied)."""


def check_key(*parts: str) -> str:
    """The ``/``-joined key of `parts`; InputError naming the key if any part could escape the store."""
    raw = "/".join(str(p) for p in parts)
    if not parts or "\\" in raw or raw.startswith("/"):
        raise InputError(f"store key {raw!r} is not a relative key (no backslashes, no leading '/')")
    for piece in raw.split("/"):
        if piece in ("", ".", "..") or not KEY_PART.match(piece):
            raise InputError(f"store key {raw!r} has an invalid part {piece!r}: "
                             "parts must match [A-Za-z0-9._=+-]+ and not be empty, '.' or '..'")
    return raw


def content_hash(payload: Mapping[str, Any]) -> str:
    """First 16 hex chars of sha256 over canonical JSON (sorted keys, no spaces, no NaN)."""
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"content key payload is not canonical JSON: {exc}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def content_key(*parts: str, payload: Mapping[str, Any], suffix: str = "") -> str:
    """``parts/<hash><suffix>``: the key of an output determined by `payload`, e.g. ``poisons/3f..e1.parquet``."""
    return check_key(*parts, content_hash(payload) + suffix)


def _is_s3(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in _S3_PROTOCOLS if "://" in uri else False


def _normalise_root(root: str) -> str:
    root = str(root).strip()
    if not root:
        raise InputError("store root is empty: set BELLADONNA_STORE")
    root = root.removeprefix("file://")
    if "://" not in root:
        return str(Path(root).expanduser().resolve())
    protocol, rest = root.split("://", 1)
    rest = rest.strip("/")
    if protocol.lower() in _S3_PROTOCOLS:
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise InputError(f"store root {root!r} has no valid S3 bucket name")
        if prefix:
            check_key(prefix)
    return f"{protocol}://{rest}"


class Store:
    """Keyed bytes and PoisonSets under one root URI. ``Store()`` reads ``BELLADONNA_STORE`` and credentials."""

    def __init__(self, root: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.root = _normalise_root(root if root is not None else self.settings.store)
        self.is_s3 = _is_s3(self.root)
        if self.is_s3:
            s3_credential_source(self.settings, self.root)
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this root (credentials included: never log this dict)."""
        if not self.is_s3:
            return {}
        s = self.settings
        client: dict[str, Any] = {}
        if s.s3_endpoint:
            client["endpoint_url"] = s.s3_endpoint
        if s.aws_region:
            client["region_name"] = s.aws_region
        options: dict[str, Any] = {
            "key": s.aws_access_key_id.get_secret_value() if s.aws_access_key_id else None,
            "secret": s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
            "client_kwargs": client,
            "config_kwargs": {"retries": {"max_attempts": s.s3_retries, "mode": "standard"},
                              "connect_timeout": s.s3_connect_timeout, "read_timeout": s.s3_read_timeout},
            "use_listings_cache": False,
        }
        if s.aws_session_token:
            options["token"] = s.aws_session_token.get_secret_value()
        if s.aws_profile and not s.has_credentials:
            options["profile"] = s.aws_profile
        return options

    def check_writable(self) -> None:
        """InputError unless this root can hold the store: a local root must be (or be creatable as) a
        writable folder; an S3 root's bucket must exist and be reachable (StorageError otherwise)."""
        if self.is_s3:
            with self._guard("check", self.root):
                return
        check_local_folder(self.root, "--store")

    def uri(self, *parts: str) -> str:
        """Full URI of a key (``uri()`` is the root itself)."""
        return f"{self.root}/{check_key(*parts)}" if parts else self.root

    def exists(self, key: str) -> bool:
        uri = self.uri(key)
        with self._guard("check", uri):
            return core_io.exists(uri, self.storage_options)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Atomically write `data` at `key`; returns its URI."""
        uri = self.uri(key)
        with self._guard("write", uri):
            core_io.atomic_write_bytes(uri, data, self.storage_options)
        log.debug("wrote %d bytes to %s", len(data), uri)
        return uri

    def read_bytes(self, key: str) -> bytes:
        """Bytes at `key`; DatasetError if absent, StorageError if the store cannot be read."""
        uri = self.uri(key)
        with self._guard("read", uri):
            return core_io.read_bytes(uri, self.storage_options)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under `prefix` (all keys when empty), relative to the root; temp files skipped."""
        uri = self.uri(prefix) if prefix else self.root
        with self._guard("list", uri):
            fs, base = core_io.filesystem(self.root, self.storage_options)
            _, path = core_io.filesystem(uri, self.storage_options)
            found = fs.find(path) if fs.exists(path) else []
        base = base.rstrip("/") + "/"
        keys = (p[len(base):] for p in found if p.startswith(base))
        return sorted(k for k in keys if not core_io.is_tmp(k.rsplit("/", 1)[-1]))

    def list_details(self, prefix: str = "") -> list[tuple[str, int, float]]:
        """(key, size in bytes, modification time in seconds since the epoch) under `prefix`, sorted;
        temp files skipped. S3's LastModified stands for the modification time."""
        uri = self.uri(prefix) if prefix else self.root
        with self._guard("list", uri):
            fs, base = core_io.filesystem(self.root, self.storage_options)
            _, path = core_io.filesystem(uri, self.storage_options)
            found = fs.find(path, detail=True) if fs.exists(path) else {}
        base = base.rstrip("/") + "/"
        rows = []
        for name, info in found.items():
            key = name[len(base):] if name.startswith(base) else None
            if key is None or core_io.is_tmp(key.rsplit("/", 1)[-1]):
                continue
            modified = info.get("mtime", info.get("LastModified"))
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0.0)
            rows.append((key, int(info.get("size") or 0), stamp))
        return sorted(rows)

    def sweep_orphans(self, writers_gone: Collection[int] = ()) -> list[str]:
        """Remove the temporary files of atomic writes whose writer died on this host (a SIGKILLed
        worker or driver); see :func:`poison_core.io.sweep_orphans`. An S3 store has none (one PUT)."""
        if self.is_s3:
            return []
        _, path = core_io.filesystem(self.root)
        removed = core_io.sweep_orphans(path, writers_gone) if os.path.isdir(path) else []
        if removed:
            log.info("removed %d temporary file(s) left by killed writers under %s", len(removed), self.root)
        return removed

    def delete(self, key: str, missing_ok: bool = True) -> None:
        """Remove `key`; a missing key is fine unless ``missing_ok=False`` (then StorageError)."""
        uri = self.uri(key)
        with self._guard("delete", uri):
            fs, path = core_io.filesystem(uri, self.storage_options)
            if missing_ok and not fs.exists(path):
                return
            fs.rm_file(path)

    def read_split(self, key: str) -> ImageDataset:
        """The dataset split at `key` (checksum verified); a transport failure is one StorageError line."""
        uri = self.uri(key)
        with self._guard("read", uri):
            return read_split(uri, self.storage_options)

    def quarantine(self, key: str, reason: str) -> str:
        """Move the damaged output at `key` aside to ``quarantine/<UTC time>/<key>`` (kept, not deleted),
        so its stage recomputes it; logs one warning that names both places and the reason."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = check_key("quarantine", stamp, key)
        source_uri, target_uri = self.uri(key), self.uri(target)
        with self._guard("quarantine", source_uri):
            fs, source = core_io.filesystem(source_uri, self.storage_options)
            _, dest = core_io.filesystem(target_uri, self.storage_options)
            if not self.is_s3:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.mv(source, dest)
        with contextlib.suppress(Exception):  # the reason beside it, for the driver's report (best effort)
            core_io.atomic_write_bytes(self.uri(REASONS, stamp, key), reason.encode(), self.storage_options)
        log.warning("damaged output %s (%s): moved to %s and recomputed", source_uri, reason, target_uri)
        return target

    def quarantined_since(self, started: float) -> list[tuple[str, str]]:
        """(key moved aside, reason) for every output quarantined at or after `started` (seconds since the
        epoch, whole-second resolution): what a driver reports, since a worker's warning stays in its log."""
        since = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(int(started)))
        found = []
        for key in self.list(REASONS):
            _, stamp, moved = key.split("/", 2)
            if stamp >= since:
                found.append((f"quarantine/{stamp}/{moved}", self.read_bytes(key).decode("utf-8", "replace")))
        return found

    def write_poison_set(self, key: str, poison_set: PoisonSet, train: ImageDataset) -> str:
        """Audit and atomically write a PoisonSet at `key`, recording the key in its provenance (what
        :meth:`read_poison_set` checks); returns its URI."""
        uri = self.uri(key)
        keyed = replace(poison_set, provenance={**poison_set.provenance, "store_key": key})
        with self._guard("write", uri):
            poisons.write_poison_set(keyed, uri, train, self.storage_options)
        return uri

    def read_poison_set(self, key: str, train: ImageDataset, threat: ThreatModel) -> PoisonSet:
        """Read the PoisonSet at `key` and audit it against the clean training set and the threat model
        the reader expects. A file that records another key than the one it is stored under (copied or
        moved from another output) is refused: its content is not the output of this key."""
        uri = self.uri(key)
        with self._guard("read", uri):
            poison_set = poisons.read_poison_set(uri, train, threat, self.storage_options)
        recorded = poison_set.provenance.get("store_key")
        if recorded != key:
            raise AuditError(f"{uri}: stored under {key!r} but written as the output of {recorded!r}; "
                             "its content is not this key's")
        return poison_set

    content_key = staticmethod(content_key)

    @contextmanager
    def _guard(self, action: str, uri: str) -> Iterator[None]:
        """Check the bucket once, then turn transport / permission failures into one StorageError line."""
        try:
            if self.is_s3:
                self._bound_s3fs_retries()
                if not self._bucket_checked:
                    self._check_bucket()
            yield
        except BelladonnaError:
            raise
        except _transport_errors() as exc:
            raise StorageError(f"cannot {action} {uri!r}: {_cause(exc)}") from exc

    def _bound_s3fs_retries(self) -> None:
        """Leave retrying to botocore (bounded by Settings): s3fs would otherwise retry timeouts 5 more times.

        fsspec caches one filesystem per (options, thread, process), so the instance of this thread is set.
        """
        fs, _ = core_io.filesystem(self.root, self.storage_options)
        fs.retries = 1

    def _check_bucket(self) -> None:
        fs, path = core_io.filesystem(self.root, self.storage_options)
        bucket = path.split("/", 1)[0]
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(f"s3 store {self.root!r}: bucket {bucket!r} does not exist") from None
        except PermissionError:
            raise StorageError(f"s3 store {self.root!r}: access to bucket {bucket!r} denied") from None
        self._bucket_checked = True


def check_local_folder(path: str | Path, what: str) -> None:
    """InputError naming `what` unless `path` is a writable folder or could be created as one (its
    nearest existing ancestor is a writable folder). Checks only: creates nothing."""
    from infra.local_checks import check_name_lengths

    check_name_lengths(path, what)  # before any stat, which would raise ENAMETOOLONG
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {str(existing)!r}"
        raise InputError(f"{what}: {str(path)!r} {where}; it must be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {str(existing)!r} is not writable by this user")


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    except ImportError:
        pass
    return tuple(errors)


def _cause(exc: BaseException) -> str:
    """One line for the cause: endpoint refused, not found, access denied, or the error's first line."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, PermissionError):
        return f"access denied ({text})" if text else "access denied"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text})" if text else "not found"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
