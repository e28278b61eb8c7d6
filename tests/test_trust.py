"""Trust nothing read back: damaged stored outputs are quarantined and recomputed, a
PoisonSet stored under another key is refused, and sizes read from files are bounded before any
allocation. The CLI-level cases (tampered store inside a run, one-line failures, Ctrl-C, leaked
processes) are in tests/test_trust_cli.py."""

from __future__ import annotations

import gzip
import json
import struct
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.storage import Store
from poison_core import limits
from poison_core.config import load_benchmark
from poison_core.data import read_split, write_split
from poison_core.data.idx import read_idx
from poison_core.data.imagefolder import read_image
from poison_core.errors import AuditError, DatasetError
from poison_core.io import bytes_to_table, table_to_bytes
from poison_core.poisons import from_parquet_bytes, to_parquet_bytes
from tasks import stages
from tests.helpers import tiny_dataset

BENCH = """
name: trust
dataset: {name: digits, n_train: 120, n_test: 40, seed: 0}
victim: {model: {name: mlp, width: 8}, train: {epochs: 1}}
threat: {epsilon: 0, budget: 0.1}
attacks: [{name: label_flip, params: {mode: random}}, {name: random_labels}]
seeds: [0]
"""


@pytest.fixture()
def stored(tmp_path):
    """A store with one benchmark's dataset, PoisonSet, victim and cell, computed by the stages."""
    cfg = load_benchmark(BENCH)
    store = Store(str(tmp_path / "store"))
    prefix = stages.ingest(store, cfg.dataset).key
    attack, defense = cfg.attacks[0], cfg.defenses[0]
    poisons = stages.craft(store, cfg, prefix, attack, 0).key
    model = stages.retrain(store, cfg, prefix, defense, 0, poisons).key
    clean = stages.retrain(store, cfg, prefix, defense, 0, None).key
    cell = stages.evaluate_cell(store, cfg, prefix, attack.key, defense.key, 0, poisons, model, clean).key
    return store, cfg, prefix, {"poisons": poisons, "model": model, "clean": clean, "cell": cell}


def test_damaged_outputs_are_quarantined_named_and_recomputed(stored, caplog):
    store, cfg, prefix, keys = stored
    attack, defense = cfg.attacks[0], cfg.defenses[0]
    originals = {name: store.read_bytes(key) for name, key in keys.items()}
    store.write_bytes(keys["cell"], originals["cell"][: len(originals["cell"]) // 2])  # truncated JSON
    store.write_bytes(keys["model"], b"this is not safetensors")
    store.write_bytes(keys["poisons"], originals["poisons"][:100])  # truncated Parquet
    store.write_bytes(f"{prefix}/test.parquet", b"PAR1 junk")
    with caplog.at_level("WARNING", logger="infra.storage"):
        assert stages.ingest(store, cfg.dataset).computed
        assert stages.craft(store, cfg, prefix, attack, 0).computed
        assert stages.retrain(store, cfg, prefix, defense, 0, keys["poisons"]).computed
        out = stages.evaluate_cell(store, cfg, prefix, attack.key, defense.key, 0, keys["poisons"], keys["model"],
                                   keys["clean"])
    assert out.computed and json.loads(store.read_bytes(keys["cell"]))["attack"] == attack.key
    for name in ("cell", "poisons"):
        assert store.read_bytes(keys[name]) == originals[name]  # recomputed, byte-identical
    quarantined = store.list("quarantine")
    assert len(quarantined) == 4 and all(q.split("/", 2)[2] in {*keys.values(), f"{prefix}/test.parquet"}
                                         for q in quarantined)
    assert store.read_bytes(next(q for q in quarantined if q.endswith(keys["model"]))) == b"this is not safetensors"
    named = [r.getMessage() for r in caplog.records if "damaged output" in r.getMessage()]
    assert len(named) == 4 and any(store.uri(keys["model"]) in m and "safetensors" in m for m in named)
    assert not stages.craft(store, cfg, prefix, attack, 0).computed  # and reused from then on


def test_a_poison_set_moved_to_another_key_is_refused(stored):
    store, cfg, prefix, keys = stored
    other = stages.poison_key(cfg, prefix, cfg.attacks[1], 0)
    store.write_bytes(other, store.read_bytes(keys["poisons"]))  # label_flip's poisons under random_labels' key
    train = stages.load_splits(store, prefix).train
    with pytest.raises(AuditError, match="written as the output of"):
        stages.read_poisons(store, cfg, prefix, other, train)
    with pytest.raises(AuditError, match="not the PoisonSet of any attack"):
        stages.expected_threat(cfg, prefix, "poisons/label_flip-0000000000000000.parquet")
    with pytest.raises(AuditError, match="written as the output of"):  # the stage refuses it instead of reusing
        stages.craft(store, cfg, prefix, cfg.attacks[1], 0)


def test_idx_header_dimensions_cannot_wrap_around(tmp_path):
    """dims whose int64 product wraps to the payload length were accepted by np.prod."""
    dims = (2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    path = tmp_path / "wrap-idx3-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(">4I", *dims) + b"\x01" * 1)
    assert int(np.prod(dims, dtype=np.int64)) != limits.product(dims)
    with pytest.raises(DatasetError, match="need 34028236"):
        read_idx(path)


def test_gzip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 10_000)
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 50_000) + bytes(50_000)))
    with pytest.raises(DatasetError, match="decompresses to more than the limit of 10000 bytes"):
        read_idx(path)


def test_parquet_claiming_more_than_the_limit_is_refused_before_decoding(monkeypatch):
    data = table_to_bytes(pa.table({"x": pa.array(np.zeros(50_000, np.int64))}))
    assert bytes_to_table(data, "ok").num_rows == 50_000
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 1_000)
    with pytest.raises(DatasetError, match="claims .* decoded bytes, more than the limit"):
        bytes_to_table(data, "big.parquet")


def test_image_shapes_in_metadata_and_headers_are_bounded(tmp_path):
    train = tiny_dataset(n=8)
    uri = str(tmp_path / "train.parquet")
    write_split(train, uri)
    table = pq.read_table(uri)
    meta = dict(table.schema.metadata)
    meta[b"belladonna.shape"] = json.dumps([100_000, 100_000, 1]).encode()
    (tmp_path / "huge.parquet").write_bytes(table_to_bytes(table.replace_schema_metadata(meta)))
    with pytest.raises(DatasetError, match=r"image shape \[100000, 100000, 1\] is outside"):
        read_split(str(tmp_path / "huge.parquet"))
    from poison_core.config import ThreatModel
    from poison_core.poisons import PoisonSet

    ps = PoisonSet(ids=train.ids[:1], images=train.images[:1], orig_labels=train.labels[:1],
                   poison_labels=train.labels[:1], threat=ThreatModel(), n_train=len(train))
    ptable = pq.read_table(pa.BufferReader(to_parquet_bytes(ps)))
    pmeta = dict(ptable.schema.metadata)
    pmeta[b"belladonna.shape"] = json.dumps([1, 8, 64]).encode()
    with pytest.raises(DatasetError, match="is outside"):
        from_parquet_bytes(table_to_bytes(ptable.replace_schema_metadata(pmeta)))
    big = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(big)  # small on disk, 20 M pixels decoded
    with pytest.raises(DatasetError, match="is 5000x4000, larger than the limit"):
        read_image(big)


def test_no_node_that_fits_a_job_is_one_error_after_a_bounded_wait(fresh_ray):
    import ray

    from infra.ray_runner import ClusterError, check_cluster_resources
    from poison_core.config import ExecutionConfig

    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    check_cluster_resources(ExecutionConfig(num_cpus=1), wait=0)
    for execution in (ExecutionConfig(num_cpus=2), ExecutionConfig(num_gpus=1)):
        with pytest.raises(ClusterError, match=r"no node of the Ray cluster has that \(largest: 1 CPUs, 0 GPUs; "
                                               r"waited 0.5 s"):
            check_cluster_resources(execution, wait=0.5)


def test_unreachable_ray_address_fails_within_the_connect_timeout():
    import socket

    from infra.ray_runner import ClusterError, _probe

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        start = time.monotonic()
        with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}' within 1 s"):
            _probe(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - start < 30
    with pytest.raises(ClusterError, match="is not host:port"):
        _probe("nonsense", timeout=1.0)


def test_the_driver_hears_of_every_quarantined_output(stored, caplog):
    """A worker's warning stays in its own log: the store keeps why each output was moved aside, and the
    command that ran the flow reports each one (belladonna.cli._report_quarantined)."""
    import time

    store, cfg, prefix, keys = stored
    started = time.time()
    store.write_bytes(keys["model"], b"this is not safetensors")
    store.write_bytes(keys["cell"], b"{not json")
    assert stages.retrain(store, cfg, prefix, cfg.defenses[0], 0, keys["poisons"]).computed
    assert stages.evaluate_cell(store, cfg, prefix, cfg.attacks[0].key, cfg.defenses[0].key, 0, keys["poisons"],
                                keys["model"], keys["clean"]).computed
    found = dict(store.quarantined_since(started))
    assert {k.split("/", 2)[2] for k in found} == {keys["model"], keys["cell"]}
    assert all(store.read_bytes(k) for k in found)  # each names the moved file, which is there
    assert any("safetensors" in reason for reason in found.values())
    assert store.quarantined_since(started + 3600) == []
    from belladonna.cli import _report_quarantined

    with caplog.at_level("WARNING", logger="belladonna"):
        _report_quarantined(store, started)
    said = [r.getMessage() for r in caplog.records if r.name == "belladonna"]
    assert len(said) == 2 and any(store.uri(keys["model"]).rsplit("/", 1)[-1] in m for m in said)
