"""PoisonSet audit (property-tested), Parquet round trip, apply, determinism."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poison_core.config import ThreatModel
from poison_core.errors import AuditError, DatasetError
from poison_core.poisons import (PoisonSet, apply, audit, from_parquet_bytes, poison_mask, read_poison_set,
                                 to_parquet_bytes, write_poison_set)
from poison_core.io import table_to_bytes
from tests.helpers import tiny_dataset

TRAIN = tiny_dataset(n=64)


def make_set(positions, delta=0, eps=8, budget=0.25, clean=False, flip=False) -> PoisonSet:
    pos = np.asarray(positions)
    images = np.clip(TRAIN.images[pos].astype(int) + delta, 0, 255).astype(np.uint8)
    labels = TRAIN.labels[pos]
    new = (labels + 1) % TRAIN.num_classes if flip else labels
    return PoisonSet(ids=TRAIN.ids[pos], images=images, orig_labels=labels, poison_labels=new,
                     threat=ThreatModel(epsilon=eps, budget=budget, clean_label=clean), n_train=len(TRAIN),
                     provenance={"attack": "x", "dataset_checksum": TRAIN.checksum()})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eps=st.integers(0, 255), budget=st.floats(0.02, 1.0), data=st.data())
def test_audit_accepts_every_valid_set(eps, budget, data):
    limit = ThreatModel(budget=budget).max_poisons(len(TRAIN))
    count = data.draw(st.integers(0, limit))
    pos = data.draw(st.permutations(range(len(TRAIN))))[:count]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    delta = rng.integers(-eps, eps + 1, size=(count, *TRAIN.image_shape))
    base = TRAIN.images[list(pos)].astype(int)
    images = np.clip(base + delta, 0, 255).astype(np.uint8)
    ps = PoisonSet(ids=TRAIN.ids[list(pos)], images=images, orig_labels=TRAIN.labels[list(pos)],
                   poison_labels=TRAIN.labels[list(pos)], n_train=len(TRAIN),
                   threat=ThreatModel(epsilon=eps, budget=budget, clean_label=True))
    audit(ps, TRAIN)


@settings(max_examples=60, deadline=None)
@given(eps=st.integers(0, 254), excess=st.integers(1, 255), pixel=st.integers(0, 63), data=st.data())
def test_audit_rejects_every_out_of_epsilon_set(eps, excess, pixel, data):
    pos = np.array([3, 10])
    images = TRAIN.images[pos].copy()
    flat = images.reshape(len(pos), -1)
    base = int(flat[1, pixel])
    step = eps + excess
    if base + step <= 255:
        flat[1, pixel] = base + step
    elif base - step >= 0:
        flat[1, pixel] = base - step
    else:
        return  # no pixel value that far from base exists on the uint8 grid
    ps = PoisonSet(ids=TRAIN.ids[pos], images=images, orig_labels=TRAIN.labels[pos], poison_labels=TRAIN.labels[pos],
                   threat=ThreatModel(epsilon=eps, budget=0.5), n_train=len(TRAIN))
    with pytest.raises(AuditError, match=r"exceeds epsilon"):
        audit(ps, TRAIN)


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(0.01, 0.9), extra=st.integers(1, 5))
def test_audit_rejects_every_over_budget_set(budget, extra):
    limit = ThreatModel(budget=budget).max_poisons(len(TRAIN))
    count = min(limit + extra, len(TRAIN))
    ps = make_set(range(count), budget=budget)
    with pytest.raises(AuditError, match="budget exceeded"):
        audit(ps, TRAIN)


def test_audit_rejects_changed_labels_under_clean_label_and_foreign_ids():
    with pytest.raises(AuditError, match="clean-label threat model but 2 labels were changed"):
        audit(make_set([1, 2], clean=True, flip=True), TRAIN)
    ps = make_set([1, 2])
    bad_ids = PoisonSet(ids=np.array([1, 2]), images=ps.images, orig_labels=ps.orig_labels,
                        poison_labels=ps.poison_labels, threat=ps.threat, n_train=ps.n_train)
    with pytest.raises(AuditError, match="not in the training set"):
        audit(bad_ids, TRAIN)
    wrong_n = PoisonSet(ids=ps.ids, images=ps.images, orig_labels=ps.orig_labels, poison_labels=ps.poison_labels,
                        threat=ps.threat, n_train=65)
    with pytest.raises(AuditError, match="crafted for 65"):
        audit(wrong_n, TRAIN)
    wrong_orig = PoisonSet(ids=ps.ids, images=ps.images, orig_labels=ps.orig_labels + 1,
                           poison_labels=ps.poison_labels, threat=ps.threat, n_train=ps.n_train)
    with pytest.raises(AuditError, match="orig_label differs"):
        audit(wrong_orig, TRAIN)
    out_of_range = PoisonSet(ids=ps.ids, images=ps.images, orig_labels=ps.orig_labels,
                             poison_labels=np.array([0, 9]), threat=ps.threat, n_train=ps.n_train)
    with pytest.raises(AuditError, match="poison_label outside 0..3"):
        audit(out_of_range, TRAIN)


def test_apply_swaps_pixels_and_labels_at_ids_only():
    ps = make_set([5, 7, 9], delta=4, flip=True)
    poisoned = apply(ps, TRAIN)
    mask = poison_mask(ps, TRAIN)
    assert mask.sum() == 3 and mask[[5, 7, 9]].all()
    assert np.array_equal(poisoned.images[~mask], TRAIN.images[~mask])
    assert np.array_equal(poisoned.labels[mask], ps.poison_labels)
    assert np.array_equal(poisoned.ids, TRAIN.ids)


def test_parquet_round_trip_is_exact_and_deterministic(tmp_path):
    ps = make_set([9, 2, 30], delta=-3, flip=True)
    ps = PoisonSet(ids=ps.ids, images=ps.images, orig_labels=ps.orig_labels, poison_labels=ps.poison_labels,
                   threat=ps.threat, n_train=ps.n_train, targets={"kind": "availability"},
                   trigger={"kind": "patch", "size": 2}, provenance={**ps.provenance, "seed": 3})
    uri = str(tmp_path / "p.parquet")
    write_poison_set(ps, uri, TRAIN)
    back = read_poison_set(uri, TRAIN, ps.threat)
    order = np.argsort(ps.ids)
    assert np.array_equal(back.ids, ps.ids[order]) and np.array_equal(back.images, ps.images[order])
    assert np.array_equal(back.poison_labels, ps.poison_labels[order]) and back.threat == ps.threat
    assert back.trigger == ps.trigger and back.provenance["attack"] == "x" and "code_version" in back.provenance
    assert to_parquet_bytes(ps) == to_parquet_bytes(back)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_write_refuses_invalid_set_and_writes_nothing(tmp_path):
    uri = tmp_path / "bad.parquet"
    with pytest.raises(AuditError):
        write_poison_set(make_set([1], delta=20, eps=8), str(uri), TRAIN)
    assert not uri.exists()


def test_read_audits_against_dataset_and_rejects_corrupt_bytes(tmp_path):
    ps = make_set([1, 2], delta=5, eps=8)
    uri = str(tmp_path / "p.parquet")
    write_poison_set(ps, uri, TRAIN)
    other = TRAIN.replace(images=np.clip(TRAIN.images.astype(int) + 60, 0, 255).astype(np.uint8))
    with pytest.raises(AuditError, match="claims clean dataset"):
        read_poison_set(uri, other, ps.threat)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        read_poison_set(str(tmp_path / "junk.parquet"), TRAIN, ps.threat)
    with pytest.raises(DatasetError, match="does not exist"):
        read_poison_set(str(tmp_path / "missing.parquet"), TRAIN, ps.threat)
    with pytest.raises(DatasetError):
        from_parquet_bytes(b"")


def tampered(ps: PoisonSet, **meta) -> bytes:
    """`ps`'s Parquet bytes with schema metadata entries replaced, as an editor of the file would."""
    table = pq.read_table(pa.BufferReader(to_parquet_bytes(ps)))
    raw = dict(table.schema.metadata)
    for name, value in meta.items():
        raw[f"belladonna.{name}".encode()] = json.dumps(value).encode()
    return table_to_bytes(table.replace_schema_metadata(raw))


def test_reader_audits_against_its_own_threat_model_not_the_files_metadata(tmp_path):
    """Metadata edited to epsilon 255 / budget 1 / dirty-label, with pixels moved by 120 and labels
    flipped, is refused against the threat model the reader expects."""
    expected = ThreatModel(epsilon=8, budget=0.05, clean_label=True)
    pos = np.arange(20)
    images = np.clip(TRAIN.images[pos].astype(int) + 120, 0, 255).astype(np.uint8)
    labels = TRAIN.labels[pos]
    loose = ThreatModel(epsilon=255, budget=1.0, clean_label=False)
    forged = PoisonSet(ids=TRAIN.ids[pos], images=images, orig_labels=labels,
                       poison_labels=(labels + 1) % TRAIN.num_classes, threat=loose, n_train=len(TRAIN),
                       provenance={"attack": "x", "dataset_checksum": TRAIN.checksum()})
    audit(forged, TRAIN)  # valid against its own (edited) metadata: that was the hole
    uri = tmp_path / "forged.parquet"
    uri.write_bytes(to_parquet_bytes(forged))
    with pytest.raises(AuditError, match=r"forged.parquet: recorded threat model differs.*epsilon 255 \(expected 8\)"):
        read_poison_set(str(uri), TRAIN, expected)
    # Even with the threat metadata put back, the data is checked against the expected bounds.
    honest_meta = PoisonSet(ids=forged.ids, images=forged.images, orig_labels=forged.orig_labels,
                            poison_labels=forged.poison_labels, threat=expected, n_train=len(TRAIN),
                            provenance=forged.provenance)
    with pytest.raises(AuditError, match="budget exceeded"):
        audit(honest_meta, TRAIN, expected)


def test_reader_refuses_a_file_claiming_another_dataset_or_none(tmp_path):
    ps = make_set([1, 2], delta=3, eps=8)
    uri = tmp_path / "p.parquet"
    uri.write_bytes(tampered(ps, provenance={"attack": "x", "dataset_checksum": "0" * 64}))
    with pytest.raises(AuditError, match="claims clean dataset 0000"):
        read_poison_set(str(uri), TRAIN, ps.threat)
    uri.write_bytes(tampered(ps, provenance={"attack": "x"}))
    with pytest.raises(AuditError, match="records no dataset checksum"):
        read_poison_set(str(uri), TRAIN, ps.threat)
