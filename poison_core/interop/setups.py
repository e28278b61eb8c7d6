"""The 'Just How Toxic' benchmark's poison setups as the targeted attacks' key draw (Schwarzschild,
Goldblum, Gupta, Dickerson & Goldstein, ICML 2021; github.com/aks2203/poisoning-benchmark, how_to.md).

``poison_setups/*.pickle`` (``cifar10_transfer_learning.pickle``, ``cifar10_from_scratch.pickle``, and
the TinyImageNet pair) each hold a list of 100 dicts, one per trial, written with protocol 4:

* ``"target class"``: the target's label (a Python int, a numpy int64 in the TinyImageNet files);
* ``"target index"``: the target's index in the test set (a numpy int64 scalar);
* ``"base class"``: the class the bases come from, which is the poisoned label, i.e. the adversarial class;
* ``"base indices"``: a 1-d int64 numpy array of the bases' indices in the training set (25 per
  CIFAR-10 transfer-learning trial, 500 from scratch, 250 for TinyImageNet).

craft_poisons_*.py read ``setup_dicts[args.setup_idx]`` and index torchvision's ``CIFAR10(train=False)``
with the target index and ``CIFAR10(train=True)`` with the base indices: both are positions in the
dataset's original order, which is what a Belladonna id is (see poison_core.interop). Two of the CIFAR-10
transfer-learning setups (78 and 84) name one base twice; a training sample can be poisoned once, so a
repeated index is used once (logged).

The file is read with the restricted unpickler (numpy arrays and scalars, containers; any other global
is refused) after a size check; every field of every setup is checked for its type, every used setup
against the config's splits (ids present, target class = the target's label, base class != target class,
every base of the base class). A failure is one DatasetError line naming the file, the setup and the field.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.paths import read_regular
from poison_core.safe_pickle import numpy_globals, safe_loads

log = logging.getLogger(__name__)

FIELDS = ("target class", "target index", "base class", "base indices")
MAX_SETUPS_BYTES = 64 * 2**20
"""Largest setups file read (the benchmark's largest, cifar10_from_scratch.pickle, is 407 KB)."""
MAX_SETUPS = 100_000


@dataclass(frozen=True)
class Setup:
    """One trial of a setups file: its number in the file, the target's test id and class, the base
    class (the adversarial class) and the bases' training ids (distinct, in the file's order)."""

    number: int
    target_id: int
    target_class: int
    base_class: int
    base_ids: np.ndarray


def _read(path: str | Path) -> bytes:
    return read_regular(Path(path).expanduser(), "threat.targets.setups.path", MAX_SETUPS_BYTES)


def fingerprint(path: str | Path) -> str:
    """sha256 of the setups file's bytes (the stage key's input part: its content, never its path)."""
    return hashlib.sha256(_read(path)).hexdigest()


def _int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise DatasetError(f"{what} must be an integer, got bool")
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    if not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


def _indices(value: Any, what: str, most: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise DatasetError(f"{what} must be a 1-d integer array, got {value.dtype} {value.shape}")
        array = value.astype(np.int64)
    elif isinstance(value, (list, tuple)):
        array = np.asarray([_int(v, f"{what}[{i}]") for i, v in enumerate(value)], dtype=np.int64)
    else:
        raise DatasetError(f"{what} must be an integer array or list, got {type(value).__name__}")
    if not 1 <= len(array) <= most:
        raise DatasetError(f"{what} holds {len(array)} indices (allowed: 1..{most}, the training set's size)")
    return array


def _parse(entry: Any, number: int, what: str, most_bases: int) -> Setup:
    where = f"{what}: setup {number}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be a dict with keys {', '.join(map(repr, FIELDS))}, "
                           f"got {type(entry).__name__}")
    if set(entry) != set(FIELDS):
        missing = [k for k in FIELDS if k not in entry]
        extra = sorted(repr(k) for k in entry if k not in FIELDS)
        raise DatasetError(f"{where} has keys {sorted(map(repr, entry))}: "
                           + (f"missing {missing[0]!r}" if missing else f"unknown {extra[0]}")
                           + f" (expected {', '.join(map(repr, FIELDS))})")
    ints = {k: _int(entry[k], f"{where}'s {k!r}") for k in FIELDS[:3]}
    for key, value in ints.items():
        if value < 0:
            raise DatasetError(f"{where}'s {key!r} is {value}; allowed: >= 0")
    bases = _indices(entry["base indices"], f"{where}'s 'base indices'", most_bases)
    if (bases < 0).any():
        raise DatasetError(f"{where}'s 'base indices' holds {int(bases[bases < 0][0])}; allowed: >= 0")
    _, first = np.unique(bases, return_index=True)
    if len(first) < len(bases):
        log.warning("%s names %d base(s) more than once; each is poisoned once", where, len(bases) - len(first))
        bases = bases[np.sort(first)]
    return Setup(number, ints["target index"], ints["target class"], ints["base class"], bases)


def _check(setup: Setup, train: ImageDataset, test: ImageDataset, what: str) -> None:
    where, k = f"{what}: setup {setup.number}", train.num_classes
    for key, value in (("target class", setup.target_class), ("base class", setup.base_class)):
        if value >= k:
            raise DatasetError(f"{where}'s {key!r} is {value}; allowed: 0..{k - 1} ({train.name!r} has {k} classes)")
    if setup.base_class == setup.target_class:
        raise DatasetError(f"{where}'s 'base class' {setup.base_class} is the target's own class; a poison key "
                           "needs another class")
    if not np.isin(setup.target_id, test.ids):
        raise DatasetError(f"{where}'s 'target index' {setup.target_id} is not in the config's test split "
                           f"({len(test)} samples, ids {int(test.ids.min())}..{int(test.ids.max())}; a subsample "
                           "(n_test) keeps only some)")
    label = int(test.labels[test.positions(np.asarray([setup.target_id]))[0]])
    if label != setup.target_class:
        raise DatasetError(f"{where}'s 'target class' {setup.target_class} is not the label {label} of test "
                           f"index {setup.target_id}: the file is for another dataset or order")
    present = np.isin(setup.base_ids, train.ids)
    if not present.all():
        raise DatasetError(f"{where}'s 'base indices': {int((~present).sum())} of {len(present)} are not in the "
                           f"config's training split, first {int(setup.base_ids[~present][0])} ({len(train)} "
                           f"samples, ids {int(train.ids.min())}..{int(train.ids.max())})")
    labels = train.labels[train.positions(setup.base_ids)]
    wrong = labels != setup.base_class
    if wrong.any():
        raise DatasetError(f"{where}'s 'base indices': {int(wrong.sum())} of {len(wrong)} are not of base class "
                           f"{setup.base_class}, first {int(setup.base_ids[wrong][0])} (label {int(labels[wrong][0])})")


def load(path: str | Path, start: int, count: int, train: ImageDataset, test: ImageDataset) -> list[Setup]:
    """Setups ``start .. start + count - 1`` of the file at `path`, every entry's fields checked for type
    and the used ones against `train` and `test`."""
    what = str(path)
    data = safe_loads(_read(path), numpy_globals(), what)
    if not isinstance(data, (list, tuple)):
        raise DatasetError(f"{what}: expected a list of setup dicts, got {type(data).__name__}")
    if not 1 <= len(data) <= MAX_SETUPS:
        raise DatasetError(f"{what} holds {len(data)} setups (allowed: 1..{MAX_SETUPS})")
    setups = [_parse(entry, i, what, len(train)) for i, entry in enumerate(data)]
    if start + count > len(setups):
        raise DatasetError(f"{what} holds {len(setups)} setups; threat.targets.setups.start {start} + n_targets "
                           f"{count} asks for setups up to {start + count - 1}")
    chosen = setups[start:start + count]
    for setup in chosen:
        _check(setup, train, test, what)
    return chosen
