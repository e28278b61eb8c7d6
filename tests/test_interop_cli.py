"""`belladonna import` / `export` on digits, hostile inputs (exit 2, one line, nothing written), and one
grid with an imported poison set against every defense."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import load_benchmark
from poison_core.data import load_dataset
from poison_core.defenses import DEFENSES
from poison_core.interop import formats
from poison_core.poisons import read_poison_set
from tests.interop_helpers import benchmark_trial, pil

CONFIG = """
name: interop
dataset: {{name: digits, n_train: 300, n_test: 100}}
victim:
  model: {{name: mlp, width: 32}}
  train: {{epochs: 2, batch_size: 64}}
threat: {{epsilon: 8, budget: 0.02, clean_label: true}}
attacks:
  - {{name: imported, id: jht, params: {{format: benchmark, path: "{trial}"}}}}
defenses: {defenses}
seeds: [0]
"""


def belladonna(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _setup(tmp_path, defenses: str = "[{name: none}]", **trial):
    trial_dir = tmp_path / "trial"
    config = tmp_path / "interop.yaml"
    config.write_text(CONFIG.format(trial=trial_dir, defenses=defenses))
    cfg = load_benchmark(config)
    splits = load_dataset(cfg.dataset)
    info = benchmark_trial(trial_dir, splits.train, splits.test, **trial)
    return config, cfg, splits, info


def test_import_then_export_round_trips_through_the_store(tmp_path):
    config, cfg, splits, info = _setup(tmp_path)
    store = tmp_path / "store"
    proc = belladonna("import", "benchmark", str(tmp_path / "trial"), "--config", str(config), "--attack-id", "jht",
                      "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert "ok: 5 poisons of 300 (benchmark, goal targeted), 0 labels changed" in proc.stdout
    [stored] = list(store.glob("poisons/jht-*.parquet"))
    ps = read_poison_set(str(stored), splits.train, cfg.threat)
    assert np.array_equal(np.sort(ps.ids), np.sort(info["ids"]))
    # The grid's craft of the same attack config computes the same key: `belladonna run` reuses this file.
    from tasks import stages

    assert stored.relative_to(store).as_posix() == stages.poison_key(cfg, stages.dataset_prefix(cfg.dataset),
                                                                     cfg.attacks[0], 0)
    for fmt in formats.FORMATS:
        out = tmp_path / f"out-{fmt}"
        option = {"normalization": "mnist"} if fmt == "forest-packed" else {}  # digits: one channel
        proc = belladonna("export", str(stored), fmt, str(out), "--config", str(config),
                          *(f"--{k}={v}" for k, v in option.items()))
        assert proc.returncode == 0, proc.stderr
        back = make_attack("imported", {"format": fmt, "path": str(out), **option}).craft(
            CraftContext(train=splits.train, test=splits.test, threat=cfg.threat, seed=0))
        assert formats.same_poisons(ps, back)


def _hostile(tmp_path, splits, info, kind: str) -> None:
    trial = tmp_path / "trial"

    def put(name, obj):
        with (trial / name).open("wb") as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)

    if kind == "system":
        class System:
            def __reduce__(self):
                import os

                return os.system, (f"touch {tmp_path / 'pwned'}",)
        (trial / "poisons.pickle").write_bytes(pickle.dumps([System()]))
    elif kind == "unknown":
        from collections import OrderedDict

        put("poisons.pickle", OrderedDict(a=1))
    elif kind == "truncated":
        data = (trial / "poisons.pickle").read_bytes()
        (trial / "poisons.pickle").write_bytes(data[: len(data) // 2])
    elif kind == "50k":
        put("poisons.pickle", [(pil(splits.train.images[0]), 1)] * 50_000)
    elif kind == "mismatched":  # other training images of the same class
        put("base_indices.pickle", splits.train.ids[splits.train.labels == info["label"]][5:10].tolist())


@pytest.mark.parametrize("kind, message", [
    ("system", r"global '(posix|os)\.system' is forbidden"),
    ("unknown", r"global 'collections\.OrderedDict' is forbidden"),
    ("truncated", r"poisons\.pickle refused: (truncated|UnpicklingError)"),
    ("50k", r"poisons\.pickle is \d+ bytes, more than the \d+ this format can need here"),
    ("mismatched", r"[1-5] of 5 poisons do not match their bases in the clean training set, first base index \d+"),
    ("eps", r"perturbation L-inf 11/255 exceeds epsilon 8/255"),
])
def test_hostile_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, kind, message):
    config, cfg, splits, info = _setup(tmp_path, eps=11 if kind == "eps" else 8)
    _hostile(tmp_path, splits, info, kind)
    store = tmp_path / "store"
    proc = belladonna("import", "benchmark", str(tmp_path / "trial"), "--config", str(config), "--store", str(store))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), proc.stderr
    assert not store.exists() and not (tmp_path / "pwned").exists()


TINY_DEFENSE = {"dpa": {"k": 2, "epochs": 1}, "abl": {"isolation_epochs": 1, "unlearning_epochs": 1},
                "ueraser": {"repeats": 2}, "strip": {"n_overlays": 4}, "neural_cleanse": {"epochs": 2, "n_samples": 32}}


@pytest.mark.slow
def test_imported_poisons_run_against_every_defense(tmp_path):
    defenses = json.dumps([{"name": n, "params": TINY_DEFENSE.get(n, {})} for n in DEFENSES.names()])
    config, cfg, splits, _ = _setup(tmp_path, defenses=defenses)
    out = tmp_path / "out"
    proc = belladonna("run", str(config), "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "interop" / "results.json").read_text())
    rows = [r for r in results["rows"] if r["attack"] == "jht"]
    assert sorted(r["defense"] for r in rows) == sorted(DEFENSES.names())
    assert all(0.0 <= r["clean_acc"] <= 1.0 and "target_success" in r for r in rows)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("interop")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["defense"] for r in children if r.data.params.get("attack") == "jht") == \
        sorted(DEFENSES.names())
