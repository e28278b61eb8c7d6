"""Hostile files and values: a path of the wrong kind, text that is not what it claims, splits that do not
fit together, sizes that stored files claim, config values that pass but mean nothing.

Every CLI case runs `belladonna` in this process under a SIGALRM deadline (a FIFO that blocks would fail
the test instead of hanging it) and asserts: exit 2, one stderr line naming the path or field, nothing
written under --out, no process left behind.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import sys
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from belladonna.cli import main
from poison_core import limits
from poison_core.data import write_split
from poison_core.data.dataset import ImageDataset
from poison_core.data.idx import read_idx, write_idx
from poison_core.defenses.persist import MAX_MEMBERS, load_classifier
from poison_core.errors import DatasetError, InputError
from poison_core.evaluation import summarize
from poison_core.config import VictimConfig
from poison_core.models.io import save_model
from poison_core.protocols import victim_skeleton

DEADLINE_S = 120
BASE = "name: t\ndataset: {name: digits, n_train: 200, n_test: 50}\nattacks: [{name: badnets}]\n"


class Hung(Exception):
    """The command did not return within the deadline."""


@contextmanager
def deadline(seconds: int = DEADLINE_S):
    """Raise Hung in the main thread after `seconds` (interrupting a blocked open or read)."""
    def expire(*_):
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def children() -> set[int]:
    """PIDs of this process's live children."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.add(int(entry.name))
    return found


def refused(argv: list[str], monkeypatch, capfd, out: Path | None = None) -> str:
    """Run the CLI with `argv`; assert exit 2, one `error:` line, nothing under `out`, no process left."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BELLADONNA_STORE"):
        monkeypatch.delenv(name, raising=False)
    before = children()
    monkeypatch.setattr(sys, "argv", ["belladonna", *argv])
    with deadline(), pytest.raises(SystemExit) as info:
        main()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out is None or not out.exists()
    assert children() <= before
    return lines[0]


def run_refused(config: Path, tmp_path: Path, monkeypatch, capfd) -> str:
    out = tmp_path / "out"
    return refused(["run", str(config), "--out", str(out)], monkeypatch, capfd, out)


def bench(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return path


def split(shape: tuple[int, int, int], classes=("a", "b"), n: int = 20, name: str = "x") -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset(rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % len(classes),
                        classes, name=name)


# -- 1. paths that are not regular files --------------------------------------------------------------

def _parquet_folder(root: Path) -> Path:
    root.mkdir()
    write_split(split((8, 8, 1), name="p/train"), str(root / "train.parquet"))
    write_split(split((8, 8, 1), name="p/test"), str(root / "test.parquet"))
    return root


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


PATH_KINDS = ["fifo-config", "dir-config", "fifo-train-parquet", "dir-train-parquet", "fifo-image", "fifo-idx",
              "audit-dir", "audit-fifo", "report-fifo"]


@pytest.mark.parametrize("case", PATH_KINDS)
def test_a_path_of_the_wrong_kind_is_one_line_not_a_hang(case, tmp_path, monkeypatch, capfd):
    out = tmp_path / "out"
    config = bench(tmp_path, BASE)
    if case in ("fifo-config", "dir-config"):
        bad = _fifo(tmp_path / "c.yaml") if case == "fifo-config" else tmp_path / "c.yaml"
        bad.mkdir() if case == "dir-config" else None
        argv, kind = ["run", str(bad), "--out", str(out)], "a FIFO" if case == "fifo-config" else "a directory"
    elif case in ("fifo-train-parquet", "dir-train-parquet"):
        root = _parquet_folder(tmp_path / "pq")
        bad = root / "train.parquet"
        bad.unlink()
        _fifo(bad) if case == "fifo-train-parquet" else bad.mkdir()
        config = bench(tmp_path, BASE.replace("{name: digits, n_train: 200, n_test: 50}",
                                              f"{{name: parquet, path: {root}}}"))
        argv, kind = ["run", str(config), "--out", str(out)], "a FIFO" if case.startswith("fifo") else "a directory"
    elif case == "fifo-image":
        root = tmp_path / "imgs"
        from PIL import Image

        for cls in ("cat", "dog"):
            (root / cls).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(np.full((8, 8), i * 9, np.uint8)).save(root / cls / f"{i}.png")
        bad = _fifo(root / "dog" / "zz.png")
        config = bench(tmp_path, BASE.replace("{name: digits, n_train: 200, n_test: 50}",
                                              f"{{name: imagefolder, path: {root}}}") + "threat: {budget: 0.2}\n")
        argv, kind = ["run", str(config), "--out", str(out)], "a FIFO"
    elif case == "fifo-idx":
        root = tmp_path / "idx"
        root.mkdir()
        for prefix, n in (("train", 30), ("t10k", 10)):
            write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
        write_idx(root / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
        bad = _fifo(root / "train-images-idx3-ubyte")
        config = bench(tmp_path, BASE.replace("{name: digits, n_train: 200, n_test: 50}",
                                              f"{{name: fashion-mnist, path: {root}}}"))
        argv, kind = ["run", str(config), "--out", str(out)], "a FIFO"
    elif case in ("audit-dir", "audit-fifo"):
        bad = _fifo(tmp_path / "p.parquet") if case == "audit-fifo" else tmp_path / "p.parquet"
        bad.mkdir() if case == "audit-dir" else None
        argv, kind = ["audit", str(bad), str(config)], "a FIFO" if case == "audit-fifo" else "a directory"
    else:
        bad = _fifo(tmp_path / "run" / "results.json")
        argv, kind = ["report", str(bad.parent)], "a FIFO"
    line = refused(argv, monkeypatch, capfd, out)
    assert str(bad) in line and kind in line and "not a regular file" in line, line


# -- 2. text that is not what it claims ----------------------------------------------------------------

def test_config_text_that_is_not_utf8_or_too_deep_is_one_line(tmp_path, monkeypatch, capfd):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(BASE.replace("name: t", "name: caf\xe9").encode("latin-1"))
    line = run_refused(bad, tmp_path, monkeypatch, capfd)
    assert str(bad) in line and "not UTF-8" in line and "offset 9" in line, line
    for depth in (40, 5000):  # over our own limit; over Python's recursion limit (was RecursionError)
        deep = bench(tmp_path, BASE + "extra: " + "[" * depth + "]" * depth + "\n")
        line = run_refused(deep, tmp_path, monkeypatch, capfd)
        assert "malformed YAML" in line and "nested" in line, line


def _results(summary_patch: dict | None = None, **top) -> dict:
    rows = [{"attack": "badnets", "defense": "none", "seed": s, "clean_acc": 0.9 + s / 100, "asr": 0.8,
             "acc_drop": 0.01} for s in range(3)]
    summary = summarize(rows)
    summary[0].update(summary_patch or {})
    return {"summary": summary, "stage_seconds": {"craft": 1.5}, "recompute_reasons": {"craft": "new"}, **top}


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


REPORT_CASES = [
    ("not-utf8", b'{"summary": "caf\xe9"}', "not UTF-8"),
    ("not-json", "{summary: [", "not JSON"),
    ("top-level-list", json.dumps([1, 2]), "top level is a list"),
    ("name-is-a-list", json.dumps(_results({"attack": ["badnets"]})), "summary.0.attack"),
    ("rate-is-a-string", json.dumps(_results({"clean_acc": "0.9"})), "clean_acc: must be a finite number"),
    ("rate-is-nan", json.dumps(_results({"clean_acc": float("nan")})), "NaN is not a JSON number"),
    ("rate-is-infinite", json.dumps(_results({"asr": float("inf")})), "Infinity is not a JSON number"),
    ("rate-is-absurd", json.dumps(_results({"clean_acc": 7.5})), "clean_acc: 7.5 is outside 0..1"),
    ("interval-reversed", json.dumps(_results({"clean_acc_ci": [0.95, 0.85]})), "clean_acc_ci"),
    ("seeds-is-a-bool", json.dumps(_results({"n_seeds": True})), "summary.0.n_seeds"),
    ("seconds-is-a-string", json.dumps(_results(stage_seconds={"craft": "1.5"})), "stage_seconds.craft"),
    ("no-summary", json.dumps({"rows": []}), "summary: Field required"),
]


@pytest.mark.parametrize("case, content, expected", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_refuses_results_of_the_wrong_shape_in_one_line(case, content, expected, tmp_path, monkeypatch, capfd):
    path = _write(tmp_path, case, content)
    line = refused(["report", str(path.parent)], monkeypatch, capfd)
    assert str(path) in line and expected in line, line


def test_report_reads_a_real_summary_and_keeps_unknown_keys(tmp_path, monkeypatch, capfd):
    """The model is strict where the report reads and open elsewhere (new keys from newer writers)."""
    path = _write(tmp_path, "good", json.dumps(_results(nodes=["a"])))
    monkeypatch.setattr(sys, "argv", ["belladonna", "report", str(path.parent)])
    with deadline(), pytest.raises(SystemExit) as info:
        main()
    captured = capfd.readouterr()
    assert info.value.code == 0, captured.err
    assert "badnets" in captured.out and "0.910" in captured.out and "craft" in captured.out


# -- 3. splits that do not fit together ------------------------------------------------------------------

SPLIT_CASES = [
    ("image-size", (8, 8, 1), (9, 9, 1), ("a", "b"), "image size 9x9x1"),
    ("channels", (8, 8, 1), (8, 8, 3), ("a", "b"), "channels 8x8x3"),
    ("classes", (8, 8, 1), (8, 8, 1), ("a", "c"), "class"),
]


@pytest.mark.parametrize("case, train_shape, test_shape, test_classes, expected", SPLIT_CASES,
                         ids=[c[0] for c in SPLIT_CASES])
def test_splits_that_disagree_are_refused_before_any_work(case, train_shape, test_shape, test_classes, expected,
                                                         tmp_path, monkeypatch, capfd):
    root = tmp_path / "pq"
    write_split(split(train_shape, name="p/train"), str(root / "train.parquet"))
    write_split(split(test_shape, test_classes, name="p/test"), str(root / "test.parquet"))
    config = bench(tmp_path, BASE.replace("{name: digits, n_train: 200, n_test: 50}", f"{{name: parquet, path: {root}}}")
                   .replace("{name: badnets}", "{name: label_flip}") + "threat: {epsilon: 0, budget: 0.2}\n")
    line = run_refused(config, tmp_path, monkeypatch, capfd)
    assert str(root) in line and expected in line, line


# -- 4. sizes that stored files claim --------------------------------------------------------------------

@pytest.mark.parametrize("claimed", ["5000", str(MAX_MEMBERS + 1), "99999999999999", "-3", "two"])
def test_a_stored_ensemble_claiming_members_it_does_not_hold_is_refused_before_building(claimed, tmp_path):
    victim = VictimConfig.model_validate({"model": {"name": "mlp", "width": 4}})
    members = nn.ModuleList(victim_skeleton(victim, (8, 8, 1), 2) for _ in range(2))
    uri = str(tmp_path / "model.safetensors")
    save_model(members, uri, {"kind": "ensemble", "members": claimed, "defense_info": "{}"})
    built = []
    import poison_core.defenses.persist as persist

    real = persist.victim_skeleton
    persist.victim_skeleton = lambda *a: built.append(1) or real(*a)
    try:
        with deadline(), pytest.raises(InputError, match=r"model\.safetensors"):
            load_classifier(uri, victim, (8, 8, 1), 2, torch.device("cpu"))
    finally:
        persist.victim_skeleton = real
    assert built == []  # refused before a single member was built
    save_model(members, uri, {"kind": "ensemble", "members": "2", "defense_info": "{}"})
    classifier, _ = load_classifier(uri, victim, (8, 8, 1), 2, torch.device("cpu"))
    assert len(classifier.models) == 2


@pytest.mark.parametrize("declared", [(10, 28, 28), (1,)])
def test_a_gzip_bigger_than_its_header_declares_stops_at_the_declared_size(declared, tmp_path):
    """The IDX header says a few bytes; the stream inflates to 64 MiB. Memory stays near the declared
    size (was: up to the global limit, 8 GiB, before the refusal)."""
    header = struct.pack(">HBB", 0, 8, len(declared)) + struct.pack(f">{len(declared)}I", *declared)
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(64 * 2**20), compresslevel=9))
    tracemalloc.start()
    try:
        with deadline(), pytest.raises(DatasetError, match="decompresses to more than its header's"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    assert limits.MAX_DECODED_BYTES > 64 * 2**20  # so it was the header's size, not the global limit


# -- 8. config values that pass but mean nothing ---------------------------------------------------------

MEANINGLESS = [
    ("seeds-true", BASE + "seeds: [true]\n", "seeds: true is a boolean"),
    ("epochs-true", BASE + "victim: {train: {epochs: true}}\n", "victim.train.epochs: true is a boolean"),
    ("lr-false", BASE + "victim: {train: {lr: false}}\n", "victim.train.lr: false is a boolean"),
    ("attack-param-true", BASE.replace("{name: badnets}", "{name: badnets, params: {patch_size: true}}"),
     "patch_size: true is a boolean"),
    ("error-min-eps-0", BASE.replace("badnets", "error_min") + "threat: {epsilon: 0, clean_label: true}\n",
     "threat.epsilon: 0 leaves error_min nothing to change"),
    ("witches-brew-eps-0", BASE.replace("badnets", "witches_brew") + "threat: {epsilon: 0, clean_label: true}\n",
     "threat.epsilon: 0 leaves witches_brew nothing to change"),
    ("random-noise-eps-0", BASE.replace("badnets", "random_noise") + "threat: {epsilon: 0, clean_label: true}\n",
     "threat.epsilon: 0 leaves random_noise nothing to change"),
    ("n-train-1", BASE.replace("n_train: 200", "n_train: 1"), "dataset.n_train: 1 leaves 1 training sample"),
]


@pytest.mark.parametrize("case, text, expected", MEANINGLESS, ids=[c[0] for c in MEANINGLESS])
def test_values_that_pass_but_mean_nothing_are_refused(case, text, expected, tmp_path, monkeypatch, capfd):
    line = run_refused(bench(tmp_path, text), tmp_path, monkeypatch, capfd)
    assert expected in line, line
    assert "val_fraction" not in line


# -- 6. the tracking database and the OS -----------------------------------------------------------------

def _sqlite(path: Path, keep: float) -> None:
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("create table t (x)")
        db.executemany("insert into t values (?)", [("a" * 500,)] * 200)
    db.close()
    data = path.read_bytes()
    if keep < 0:  # the header and the size intact, every later page garbage: only SQLite's own check sees it
        path.write_bytes(data[:4096] + bytes((i * 7919) % 251 for i in range(len(data) - 4096)))
    else:
        path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else b"this is not a database" * 10)


OS_CASES = ["out-name-too-long", "store-name-too-long", "mlflow-db-truncated", "mlflow-db-not-sqlite", "mlflow-db-garbage",
            "prefect-home-is-a-file", "prefect-home-is-a-fifo"]


@pytest.mark.parametrize("case", OS_CASES)
def test_the_run_folder_and_its_services_are_checked_before_any_work(case, tmp_path, monkeypatch, capfd):
    config = bench(tmp_path, BASE.replace("badnets", "label_flip") + "threat: {epsilon: 0}\n")
    out = tmp_path / "out"
    argv = ["run", str(config), "--out"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    if case == "out-name-too-long":
        out = tmp_path / ("o" * 300)
        argv, expected = [*argv, str(out)], ("--out", "300 bytes")
    elif case == "store-name-too-long":
        argv, expected = [*argv, str(out), "--store", str(tmp_path / ("s" * 400))], ("--store", "400 bytes")
    elif case.startswith("mlflow-db"):
        out.mkdir()
        _sqlite(out / "mlflow.db", {"truncated": 0.5, "garbage": -1.0}.get(case.rsplit("-", 1)[1], 1.0))
        before = (out / "mlflow.db").read_bytes()
        argv = [*argv, str(out)]
        expected = (str(out / "mlflow.db"), "not an SQLite database" if case.endswith("sqlite") else "damaged",
                    "MLFLOW_TRACKING_URI")
    else:
        home = tmp_path / "prefect-home"
        home.write_text("x") if case.endswith("file") else os.mkfifo(home)
        argv, expected = [*argv, str(out)], (str(home), "PREFECT_HOME", "not a directory")
    line = refused(argv, monkeypatch, capfd, out if case in ("store-name-too-long", "prefect-home-is-a-file",
                                                           "prefect-home-is-a-fifo") else None)
    if case == "out-name-too-long":  # nothing written next to the config (out itself cannot even be stat'ed)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml"]
    assert all(text in line for text in expected), line
    if case.startswith("mlflow-db"):
        assert sorted(p.name for p in out.iterdir()) == ["mlflow.db"] and (out / "mlflow.db").read_bytes() == before
