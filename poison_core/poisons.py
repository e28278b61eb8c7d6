"""PoisonSet: the packed poison, its Parquet form, its audit, and `apply`.

A PoisonSet stores the poisoned pixels themselves as uint8 (what is stored is exactly what a
victim trains on), one row per poisoned training sample, with targets, trigger and provenance in
the schema metadata. Every write and every read runs :func:`audit` against the clean training
set: L-inf perturbation <= epsilon on the uint8 grid, count <= floor(budget * n), labels unchanged
for clean-label attacks, ids present and unique, labels in range. A violation raises AuditError.

An optional colour part (MetaPoison's ReColorAdv option): `color`, float32 (P, *grid, C) parameters,
stored as column ``color`` with ``belladonna.color_grid``. The audit checks |theta| <= color_epsilon (any
colour part fails under 0), recomputes the colour-shifted base from the clean image and theta (float64,
rounded to the nearest grey level, as the crafting side rounds it: recolor.shifted_base) and holds the
additive part, poison minus that base, to epsilon on the uint8 grid: at most eps + 0.5 grey levels from
the real-valued colour-shifted image. A PoisonSet without a colour part is written and audited as before.

A reader audits against the threat model *it* expects (the config's, for the attack that produced the
file), never the one the file records about itself: metadata edited to epsilon 255 / budget 1 / not
clean-label is a mismatch with the expected threat model, and a file that claims another clean dataset
(its recorded checksum) is refused before its pixels are compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from poison_core import __version__
from poison_core.config import BenchmarkConfig, ThreatModel
from poison_core.data.dataset import ImageDataset
from poison_core.errors import AuditError, DatasetError
from poison_core.limits import check_image_shape
from poison_core.threat import answering_threats
from poison_core.io import (atomic_write_bytes, bytes_to_table, column_to_images, images_to_column,
                            read_bytes, table_to_bytes)

FORMAT_VERSION = "1"
_META = "belladonna."


@dataclass(frozen=True, eq=False)
class PoisonSet:
    """Poisoned samples of one training set under one threat model.

    ids: int64 (P,) training-sample ids; images: uint8 (P, H, W, C) poisoned pixels;
    orig_labels / poison_labels: int64 (P,); n_train: size of the training set crafted against;
    targets: JSON-able description of the attacked test points (ids, adversarial classes);
    trigger: JSON-able trigger spec for backdoors (see poison_core.triggers) or None;
    provenance: attack, params, seed, dataset / surrogate checksums, code version;
    color: float32 (P, *grid, C) colour parameters (ReColorAdv) or None for no colour part.
    """

    ids: np.ndarray
    images: np.ndarray
    orig_labels: np.ndarray
    poison_labels: np.ndarray
    threat: ThreatModel
    n_train: int
    targets: dict[str, Any] = field(default_factory=dict)
    trigger: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    color: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("ids", "orig_labels", "poison_labels"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(self.ids):
            raise AuditError(f"poison images must be uint8 (P, H, W, C) with P={len(self.ids)}, "
                             f"got {images.dtype} {images.shape}")
        if not (len(self.orig_labels) == len(self.poison_labels) == len(self.ids)):
            raise AuditError("poison ids, orig_labels and poison_labels differ in length")
        object.__setattr__(self, "images", images)
        if self.color is not None:
            object.__setattr__(self, "color", np.asarray(self.color, dtype=np.float32))
            if self.color.ndim < 3 or len(self.color) != len(self.ids):
                raise AuditError(f"colour parameters must be (P, *grid, C), P={len(self.ids)}; got {self.color.shape}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def flipped(self) -> np.ndarray:
        """Boolean mask of rows whose label was changed."""
        return self.orig_labels != self.poison_labels


def audit(poison_set: PoisonSet, train: ImageDataset, threat: ThreatModel | None = None) -> None:
    """Raise AuditError unless `poison_set` is a valid poison of `train` under `threat`.

    `threat` is the threat model the caller expects (a reader passes the config's); when given, the
    threat model the PoisonSet records must equal it, the dataset checksum it records must be that of
    `train`, and every bound is checked against `threat`, not against the file's own metadata. The
    crafting side, which built the PoisonSet from its threat model, may leave it out.
    """
    expected = poison_set.threat if threat is None else threat
    if threat is not None:
        _check_claims(poison_set, train, threat)
    n = len(train)
    if poison_set.n_train != n:
        raise AuditError(f"poison set was crafted for {poison_set.n_train} training samples, dataset has {n}")
    limit = expected.max_poisons(n)
    if len(poison_set) > limit:
        raise AuditError(f"budget exceeded: {len(poison_set)} poisons > floor({expected.budget} * {n}) = {limit}")
    if len(np.unique(poison_set.ids)) != len(poison_set.ids):
        raise AuditError("poison ids are not unique")
    try:
        pos = train.positions(poison_set.ids)
    except DatasetError as exc:
        raise AuditError(f"poison id not in the training set: {exc}") from None
    if poison_set.images.shape[1:] != train.images.shape[1:]:
        raise AuditError(f"poison image shape {poison_set.images.shape[1:]} != dataset shape {train.images.shape[1:]}")
    if not np.array_equal(poison_set.orig_labels, train.labels[pos]):
        raise AuditError("orig_label differs from the training set's label")
    k = train.num_classes
    if len(poison_set) and (poison_set.poison_labels.min() < 0 or poison_set.poison_labels.max() >= k):
        raise AuditError(f"poison_label outside 0..{k - 1}")
    if expected.clean_label and np.any(poison_set.flipped):
        raise AuditError(f"clean-label threat model but {int(poison_set.flipped.sum())} labels were changed")
    if poison_set.color is not None:
        _check_color(poison_set.color, train.images.shape[-1], expected)
    if len(poison_set):
        linf = additive_linf(poison_set, train)
        if linf > expected.epsilon:
            over = "" if poison_set.color is None else " over the colour-shifted base"
            raise AuditError(f"perturbation L-inf {linf}/255{over} exceeds epsilon {expected.epsilon}/255")


def additive_linf(poison_set: PoisonSet, train: ImageDataset) -> int:
    """L-inf distance, in /255, of the poisons from their clean images, or with a colour part from the
    colour-shifted base recomputed from the clean images and the stored colour parameters."""
    if not len(poison_set):
        return 0
    base = train.images[train.positions(poison_set.ids)]
    if poison_set.color is not None:
        # imported here: poison_core.attacks imports this module
        from poison_core.recolor import shifted_base

        base = shifted_base(base, poison_set.color)
    return int(np.abs(poison_set.images.astype(np.int16) - base.astype(np.int16)).max())


def _check_color(color: np.ndarray, channels: int, threat: ThreatModel) -> None:
    """The colour parameters' shape and their bound: |theta| <= color_epsilon (compared in float32)."""
    from poison_core.recolor import check_shape

    if threat.color_epsilon == 0:
        raise AuditError("poison set has a colour perturbation (colour parameters), but threat.color_epsilon is 0: "
                         "no colour perturbation is allowed")
    try:
        check_shape(color.shape, channels)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    bound = np.float32(threat.color_epsilon)
    if not np.all(np.abs(color) <= bound):
        worst = float(np.max(np.abs(color)))  # nan where a parameter is not a number
        raise AuditError(f"colour parameter {worst:.6g} exceeds threat.color_epsilon {threat.color_epsilon}")


def _check_claims(poison_set: PoisonSet, train: ImageDataset, threat: ThreatModel) -> None:
    """The file's own claims against the reader's: its threat model and its clean dataset."""
    recorded, wanted = poison_set.threat.model_dump(), threat.model_dump()
    differ = [f"{k} {recorded.get(k)!r} (expected {wanted.get(k)!r})" for k in dict.fromkeys([*wanted, *recorded])
              if recorded.get(k) != wanted.get(k)]
    if differ:
        raise AuditError(f"recorded threat model differs from the expected one: {', '.join(differ)}")
    claimed = poison_set.provenance.get("dataset_checksum")
    if claimed is None:
        raise AuditError("poison set records no dataset checksum (provenance.dataset_checksum)")
    if claimed != train.checksum():
        raise AuditError(f"poison set claims clean dataset {str(claimed)[:16]}..., "
                         f"not this training set ({train.checksum()[:16]}...)")


def apply(poison_set: PoisonSet, train: ImageDataset) -> ImageDataset:
    """The poisoned training set: poisoned pixels and labels swapped in at the poisoned ids."""
    audit(poison_set, train)
    pos = train.positions(poison_set.ids)
    images, labels = train.images.copy(), train.labels.copy()
    images[pos] = poison_set.images
    labels[pos] = poison_set.poison_labels
    return train.replace(images=images, labels=labels, name=f"{train.name}+poison")


def poison_mask(poison_set: PoisonSet, train: ImageDataset) -> np.ndarray:
    """Boolean (N,) mask of the training samples that `poison_set` poisons (ground truth for filters)."""
    mask = np.zeros(len(train), dtype=bool)
    mask[train.positions(poison_set.ids)] = True
    return mask


def to_parquet_bytes(poison_set: PoisonSet) -> bytes:
    """Deterministic Parquet bytes: the same PoisonSet gives the same bytes."""
    order = np.argsort(poison_set.ids, kind="stable")
    columns = {
        "id": pa.array(poison_set.ids[order], pa.int64()),
        "image": images_to_column(poison_set.images[order]),
        "orig_label": pa.array(poison_set.orig_labels[order], pa.int16()),
        "poison_label": pa.array(poison_set.poison_labels[order], pa.int16()),
    }
    if poison_set.color is not None:
        color = poison_set.color[order]
        width = int(np.prod(color.shape[1:]))
        columns["color"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(color).reshape(-1), pa.float32()), width)
    table = pa.table(columns)
    meta = {
        "format_version": FORMAT_VERSION,
        "shape": list(poison_set.images.shape[1:]),
        "threat": poison_set.threat.model_dump(mode="json"),
        "n_train": poison_set.n_train,
        "targets": poison_set.targets,
        "trigger": poison_set.trigger,
        "provenance": {"code_version": __version__, **poison_set.provenance},
    }
    if poison_set.color is not None:
        meta["color_grid"] = list(poison_set.color.shape[1:])
    encoded = {f"{_META}{k}".encode(): json.dumps(v, sort_keys=True, separators=(",", ":")).encode()
               for k, v in sorted(meta.items())}
    return table_to_bytes(table.replace_schema_metadata(encoded))


def from_parquet_bytes(data: bytes, what: str = "poison set") -> PoisonSet:
    table = bytes_to_table(data, what)
    raw = table.schema.metadata or {}
    try:
        meta = {k.decode().removeprefix(_META): json.loads(v) for k, v in raw.items()
                if k.decode().startswith(_META)}
        shape = tuple(int(s) for s in meta["shape"])
        check_image_shape(shape, what)
        threat = ThreatModel.model_validate(meta["threat"])
        columns = {name: table.column(name) for name in ("id", "image", "orig_label", "poison_label")}
        color = _read_color(table, meta)
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f"{what}: missing or invalid Belladonna metadata/columns ({exc})") from None
    return PoisonSet(
        ids=columns["id"].to_numpy(), images=column_to_images(columns["image"], shape, what),
        orig_labels=columns["orig_label"].to_numpy(), poison_labels=columns["poison_label"].to_numpy(),
        threat=threat, n_train=int(meta["n_train"]), targets=meta.get("targets") or {},
        trigger=meta.get("trigger"), provenance=meta.get("provenance") or {}, color=color)


def _read_color(table: pa.Table, meta: dict[str, Any]) -> np.ndarray | None:
    """The optional colour column, reshaped by its recorded grid (P, *grid, C); None where both are absent."""
    has_column, grid = "color" in table.column_names, meta.get("color_grid")
    if not has_column and grid is None:
        return None
    if not has_column or grid is None:
        raise ValueError("a colour column needs its grid (belladonna.color_grid) and the other way round")
    shape = tuple(int(g) for g in grid)
    if not 1 <= len(shape) <= 4 or not all(1 <= g <= 64 for g in shape):
        raise ValueError(f"colour grid {list(shape)} is outside 1..64 points per axis")
    arr = table.column("color").combine_chunks()
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != int(np.prod(shape)):
        raise ValueError(f"colour column {arr.type} does not match grid {list(shape)}")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape((len(arr), *shape))


def write_poison_set(poison_set: PoisonSet, uri: str, train: ImageDataset,
                     storage_options: dict[str, Any] | None = None) -> None:
    """Audit, then write atomically (temp + rename locally, single PUT on object stores)."""
    audit(poison_set, train)
    atomic_write_bytes(uri, to_parquet_bytes(poison_set), storage_options)


def read_poison_set(uri: str, train: ImageDataset, threat: ThreatModel,
                    storage_options: dict[str, Any] | None = None) -> PoisonSet:
    """Read and audit against the clean training set it claims to poison and the threat model the
    reader expects; an AuditError names the file."""
    poison_set = from_parquet_bytes(read_bytes(uri, storage_options), what=str(uri))
    try:
        audit(poison_set, train, threat)
    except AuditError as exc:
        raise AuditError(f"{uri}: {exc}") from None
    return poison_set


def audit_file(uri: str, train: ImageDataset, cfg: BenchmarkConfig,
               storage_options: dict[str, Any] | None = None) -> tuple[PoisonSet, ThreatModel]:
    """Audit a PoisonSet file against the threat model `cfg` gives the attack that produced it (the
    attack named in its provenance; poison_core.threat decides); returns it with that threat model. With
    several attacks of that name in `cfg`, the file passes if it is a valid poison under one of their
    threat models."""
    poison_set = from_parquet_bytes(read_bytes(uri, storage_options), what=str(uri))
    failures = []
    for threat in answering_threats(cfg, poison_set.provenance.get("attack"), what=str(uri)):
        try:
            audit(poison_set, train, threat)
            return poison_set, threat
        except AuditError as exc:
            failures.append(str(exc))
    raise AuditError(f"{uri}: {'; '.join(failures)}")
