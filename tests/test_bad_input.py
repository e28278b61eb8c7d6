"""Table-driven bad input: every case exits 2 with one line naming the problem and writes nothing."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pyarrow.parquet import read_table as pq_read
from pyarrow.parquet import write_table as pq_write

from belladonna.cli import main
from poison_core.config import ThreatModel
from poison_core.data import load_dataset, write_split
from poison_core.data.dataset import ImageDataset
from poison_core.data.idx import write_idx
from poison_core.poisons import PoisonSet, to_parquet_bytes

BASE = "name: t\ndataset: {name: digits, n_train: 200, n_test: 50}\nattacks: [{name: badnets}]\n"


def _fixtures(tmp: Path) -> dict[str, str]:
    """Files the cases point at: corrupt IDX, corrupt Parquet, mixed-size image folder, bad poisons."""
    idx = tmp / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    write_idx(idx / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    write_idx(idx / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(idx / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    pq = tmp / "pq"
    pq.mkdir()
    (pq / "train.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (pq / "test.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    tampered = tmp / "tampered"
    small = ImageDataset(np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2, ("a", "b"))
    write_split(small, str(tampered / "train.parquet"))
    write_split(small, str(tampered / "test.parquet"))
    table = pq_read(tampered / "train.parquet")
    flipped = table.set_column(2, "label", pa.array([1, 1, 1, 1], pa.int16()))  # content changed, metadata kept
    pq_write(flipped.replace_schema_metadata(table.schema.metadata), tampered / "train.parquet")
    folder = tmp / "imgs"
    from PIL import Image

    for cls, size in (("cat", 8), ("dog", 9)):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((size, size), np.uint8)).save(folder / cls / "x.png")
    train = load_dataset(__import__("poison_core.config", fromlist=["x"]).DatasetConfig(
        name="digits", n_train=200, n_test=50)).train
    pos = np.arange(2)
    loud = np.clip(train.images[pos].astype(int) + 40, 0, 255).astype(np.uint8)
    claims = {"attack": "badnets", "dataset_checksum": train.checksum()}
    breaking = PoisonSet(ids=train.ids[pos], images=loud, orig_labels=train.labels[pos],
                         poison_labels=train.labels[pos], threat=ThreatModel(), n_train=200, provenance=claims)
    (tmp / "eps.parquet").write_bytes(to_parquet_bytes(breaking))
    over = PoisonSet(ids=train.ids[:20], images=train.images[:20], orig_labels=train.labels[:20],
                     poison_labels=train.labels[:20], threat=ThreatModel(), n_train=200, provenance=claims)
    (tmp / "budget.parquet").write_bytes(to_parquet_bytes(over))
    loose = ThreatModel(epsilon=255, budget=1.0)  # metadata edited to pass its own audit
    forged = PoisonSet(ids=train.ids[:20], images=np.clip(train.images[:20].astype(int) + 120, 0, 255).astype(np.uint8),
                       orig_labels=train.labels[:20], poison_labels=(train.labels[:20] + 1) % 10, threat=loose,
                       n_train=200, provenance=claims)
    (tmp / "forged.parquet").write_bytes(to_parquet_bytes(forged))
    foreign = PoisonSet(ids=train.ids[:1], images=train.images[:1], orig_labels=train.labels[:1],
                        poison_labels=train.labels[:1], threat=ThreatModel(), n_train=200,
                        provenance={"attack": "witches_brew", "dataset_checksum": train.checksum()})
    (tmp / "foreign.parquet").write_bytes(to_parquet_bytes(foreign))
    (tmp / "base.yaml").write_text(BASE)
    (tmp / "tiny-budget.yaml").write_text(BASE + "threat: {budget: 0.001}\n")
    one = tmp / "oneclass" / "cat"
    one.mkdir(parents=True)
    for i in range(30):
        Image.fromarray(np.full((8, 8), i * 8, np.uint8)).save(one / f"{i}.png")
    pqdir = tmp / "pqdir"  # train.parquet is a folder
    write_split(small, str(pqdir / "test.parquet"))
    (pqdir / "train.parquet").mkdir()
    pqfifo = tmp / "pqfifo"  # train.parquet is a FIFO: reading it used to block for ever
    write_split(small, str(pqfifo / "test.parquet"))
    os.mkfifo(pqfifo / "train.parquet")
    mismatch = tmp / "mismatch"  # 8x8 train, 9x9 test
    write_split(small, str(mismatch / "train.parquet"))
    write_split(ImageDataset(np.zeros((4, 9, 9, 1), np.uint8), np.arange(4) % 2, ("a", "b")),
                str(mismatch / "test.parquet"))
    (tmp / "latin1.yaml").write_bytes(BASE.replace("name: t", "name: caf\xe9").encode("latin-1"))
    (tmp / "nan-run").mkdir()
    (tmp / "nan-run" / "results.json").write_text('{"summary": [{"attack": "a", "defense": "b", "n_seeds": 1, '
                                                  '"clean_acc": NaN}]}')
    return {"idx": str(idx), "pq": str(pq), "tampered": str(tampered), "imgs": str(folder),
            "oneclass": str(tmp / "oneclass"), "pqdir": str(pqdir), "pqfifo": str(pqfifo), "mismatch": str(mismatch)}


CASES = [
    # (id, yaml (None: use argv only), extra argv, expected text in the one line)
    ("malformed-yaml", "name: t\nattacks: [\n", [], "malformed YAML at line"),
    ("not-a-mapping", "- 1\n- 2\n", [], "must be a YAML mapping"),
    ("unknown-attack", BASE.replace("badnets", "frogs"), [], "unknown attack 'frogs'"),
    ("unknown-defense", BASE + "defenses: [{name: shield}]\n", [], "unknown defense 'shield'"),
    ("unknown-model", BASE + "victim: {model: {name: alexnet}}\n", [], "unknown model 'alexnet'"),
    ("unknown-dataset", BASE.replace("digits", "imagenet"), [], "unknown dataset 'imagenet'"),
    ("epsilon-high", BASE + "threat: {epsilon: 300}\n", [], "threat.epsilon"),
    ("epsilon-negative", BASE + "threat: {epsilon: -1}\n", [], "0 <= epsilon <= 255"),
    ("budget-zero", BASE + "threat: {budget: 0}\n", [], "0 < budget <= 1"),
    ("budget-high", BASE + "threat: {budget: 1.5}\n", [], "threat.budget"),
    ("epochs-zero", BASE + "victim: {train: {epochs: 0}}\n", [], "1 <= epochs <= 1000"),
    ("lr-negative", BASE + "victim: {train: {lr: -0.1}}\n", [], "victim.train.lr"),
    ("unknown-key", BASE + "colour: red\n", [], "colour: Extra inputs are not permitted"),
    ("unknown-threat-key", BASE + "threat: {radius: 2}\n", [], "threat.radius"),
    ("bad-attack-param", BASE.replace("{name: badnets}", "{name: badnets, params: {patch_size: 0}}"), [],
     "patch_size"),
    ("unknown-attack-param", BASE.replace("{name: badnets}", "{name: badnets, params: {colour: 1}}"), [],
     "colour"),
    ("label-out-of-range", BASE.replace("{name: badnets}", "{name: badnets, params: {target_class: 12}}"), [],
     "target_class: 12 is outside 0..9"),
    ("trigger-too-big", BASE.replace("{name: badnets}", "{name: badnets, params: {patch_size: 9}}"), [],
     "does not fit 8x8"),
    ("duplicate-seeds", BASE + "seeds: [1, 1]\n", [], "seeds must be distinct"),
    ("path-traversal-name", BASE.replace("name: t", "name: ../../etc"), [], "name: String should match"),
    ("path-traversal-id", BASE.replace("{name: badnets}", "{name: badnets, id: ../x}"), [], "id: String"),
    ("bad-device", BASE + "execution: {device: tpu}\n", [], "execution.device"),
    ("n-train-too-large", BASE.replace("n_train: 200", "n_train: 5000"), [], "dataset.n_train"),
    ("missing-dataset-folder", BASE.replace("{name: digits,", "{name: fashion-mnist, path: /nonexistent,"), [],
     "/nonexistent"),
    ("corrupt-idx", BASE.replace("{name: digits,", "{name: fashion-mnist, path: {idx},"), [],
     "train-images-idx3-ubyte"),
    ("corrupt-parquet", BASE.replace("{name: digits,", "{name: parquet, path: {pq},"), [],
     "not a readable Parquet file"),
    ("tampered-parquet-checksum", BASE.replace("{name: digits,", "{name: parquet, path: {tampered},"), [],
     "checksum mismatch"),
    ("image-shape-mismatch", BASE.replace("{name: digits,", "{name: imagefolder, path: {imgs},"), [],
     "all images must share one (H, W, C)"),
    ("missing-config", None, ["run", "{tmp}/absent.yaml"], "does not exist"),
    ("s3-without-credentials", BASE, ["--store", "s3://bucket/prefix"], "botocore's credential chain found none"),
    ("store-root-traversal", BASE, ["--store", "s3://bucket/../../x"], "store"),
    ("poisons-break-epsilon", None, ["audit", "{tmp}/eps.parquet", "{tmp}/base.yaml"], "exceeds epsilon 16/255"),
    ("poisons-over-budget", None, ["audit", "{tmp}/budget.parquet", "{tmp}/base.yaml"], "budget exceeded"),
    ("poisons-forged-metadata", None, ["audit", "{tmp}/forged.parquet", "{tmp}/base.yaml"],
     "epsilon 255 (expected 16)"),
    ("poisons-of-another-attack", None, ["audit", "{tmp}/foreign.parquet", "{tmp}/base.yaml"],
     "does not run"),
    ("clean-label-label-flip", BASE.replace("badnets", "label_flip") + "threat: {clean_label: true}\n", [],
     "attacks.label_flip: threat.clean_label"),
    ("budget-rounds-to-zero", BASE + "threat: {budget: 0.001}\n", [], "threat.budget: 0.001 of"),
    ("adversarial-class-outside", BASE + "threat: {targets: {adversarial_class: 10}}\n", [],
     "threat.targets.adversarial_class: 10 is outside 0..9"),
    ("val-leaves-no-train", BASE.replace("n_train: 200", "n_train: 2, val_fraction: 0.9"), [], "dataset"),
    ("one-class-dataset", BASE.replace("{name: digits, n_train: 200, n_test: 50}", "{name: imagefolder, path: {oneclass}}")
     + "threat: {budget: 0.2}\n", [],
     "num_classes must be at least 2"),
    ("num-cpus-over-machine", BASE + "execution: {num_cpus: 64}\n", [], "execution.num_cpus: 64 per job"),
    ("num-gpus-without-gpu", BASE + "execution: {num_gpus: 1}\n", [], "execution.num_gpus: 1 per job"),
    ("cuda-without-gpu", BASE + "execution: {device: cuda, num_gpus: 0}\n", [], "execution.device"),
    ("cuda-index-beyond-job-gpus", BASE + "execution: {device: 'cuda:1', num_gpus: 1}\n", [],
     "execution.device: 'cuda:1', but a job asks for 1 GPU(s)"),
    ("store-is-a-file", BASE, ["--store", "{tmp}/base.yaml"], "--store"),
    ("store-under-a-file", BASE, ["--store", "{tmp}/base.yaml/store"], "lies under the file"),
    ("out-is-a-file", None, ["run", "{tmp}/base.yaml", "--out", "{tmp}/base.yaml"], "--out"),
    ("validate-finds-budget", None, ["validate", "{tmp}/tiny-budget.yaml"], "threat.budget"),
    ("report-missing", None, ["report", "{tmp}/nowhere"], "has no results.json"),
    ("protocol-unknown", BASE + "victim: {protocol: moco}\n", [], "victim.protocol: Input should be"),
    ("transfer-without-source", BASE + "victim: {protocol: transfer}\n", [], "protocol 'transfer' needs pretrain"),
    # paths that are not regular files
    ("train-parquet-is-a-folder", BASE.replace("{name: digits,", "{name: parquet, path: {pqdir},"), [],
     "train.parquet' is a directory, not a regular file"),
    ("train-parquet-is-a-fifo", BASE.replace("{name: digits,", "{name: parquet, path: {pqfifo},"), [],
     "train.parquet' is a FIFO (named pipe), not a regular file"),
    ("audit-a-folder", None, ["audit", "{tmp}/idx", "{tmp}/base.yaml"], "idx' is a directory"),
    # text that is not what it claims
    ("config-not-utf8", None, ["validate", "{tmp}/latin1.yaml"], "latin1.yaml' is not UTF-8 text"),
    ("config-too-deep", BASE + "x: " + "[" * 3000 + "]" * 3000 + "\n", [], "malformed YAML: nested"),
    ("report-nan", None, ["report", "{tmp}/nan-run"], "NaN is not a JSON number"),
    # splits that do not fit together
    ("splits-differ-in-size", BASE.replace("{name: digits,", "{name: parquet, path: {mismatch},")
     .replace("badnets", "label_flip") + "threat: {epsilon: 0, budget: 0.5}\n", [], "image size 9x9x1"),
    # values that pass but mean nothing
    ("seeds-true", BASE + "seeds: [true]\n", [], "seeds: true is a boolean"),
    ("epochs-true", BASE + "victim: {train: {epochs: true}}\n", [], "victim.train.epochs: true is a boolean"),
    ("clean-noise-under-epsilon-0", BASE.replace("badnets", "error_min") + "threat: {epsilon: 0, clean_label: true}\n",
     [], "threat.epsilon: 0 leaves error_min nothing to change"),
    ("n-train-one", BASE.replace("n_train: 200", "n_train: 1"), [], "dataset.n_train: 1 leaves"),
    ("relabel-as-many-groups-as-classes", BASE + "victim: {protocol: relabel, relabel_classes: 10}\n", [],
     "victim.relabel_classes: 10 must be below the dataset's 10 classes"),
]


def _expired(*_):
    raise TimeoutError("the command did not answer within 120 s")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _fixtures(tmp)


@pytest.mark.parametrize("case_id, text, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, text, argv, expected, files, tmp_path, monkeypatch, capfd):
    tmp, paths = files
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BELLADONNA_STORE"):
        monkeypatch.delenv(name, raising=False)
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    out = tmp_path / "out"
    if text is not None:
        for key, value in paths.items():
            text = text.replace("{" + key + "}", value)
        config = tmp_path / "bench.yaml"
        config.write_text(text)
        args = ["run", str(config), "--out", str(out), *args]
    monkeypatch.setattr(sys, "argv", ["belladonna", *args])
    signal.signal(signal.SIGALRM, _expired)
    signal.alarm(120)  # a command that blocks (a FIFO read) fails the case instead of hanging the suite
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        signal.alarm(0)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], err
    assert lines[0].startswith("error: ")
    assert not out.exists()


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25
