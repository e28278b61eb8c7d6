"""Two benchmarks writing to the same store at the same time do not corrupt each other: outputs
they share are written atomically under content keys, and every file passes its audit after."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from belladonna.lifecycle.reaper import descendants, kill_recorded
from infra.storage import Store
from poison_core.config import load_benchmark
from tests.pipeline_helpers import QUIET, audit_store

SHARED = """
name: {name}
dataset: {{name: digits, n_train: 400, n_test: 150, seed: 0}}
victim:
  model: {{name: convnet, width: 8}}
  train: {{epochs: 3, batch_size: 64}}
threat: {{epsilon: 255, budget: 0.05}}
attacks:
  - {{name: badnets}}
  - {{name: label_flip, threat: {{epsilon: 0, budget: 0.2}}}}
seeds: [{seeds}]
"""


@pytest.mark.slow
def test_two_benchmarks_share_a_store(tmp_path):
    store = tmp_path / "store"
    procs = []
    for name, seeds in (("first", "0, 1"), ("second", "1, 2")):  # seed 1 is computed by both
        config = tmp_path / f"{name}.yaml"
        config.write_text(SHARED.format(name=name, seeds=seeds))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "belladonna.cli", "run", str(config), "--out", str(tmp_path / name),
             "--store", str(store)], env={**os.environ, **QUIET}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=1500) for p in procs]  # bounded, and generous for a loaded machine
    finally:
        for p in procs:  # only what these runs started, by PID (each run's own watcher stops the rest)
            kill_recorded(descendants(p.pid))
            if p.poll() is None:
                p.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    both = load_benchmark(tmp_path / "first.yaml").model_copy(update={"seeds": (0, 1, 2)})
    counts = audit_store(Store(str(store)), both)
    assert counts.pop("records") > 0  # each benchmark's slot records (tasks.records), one per output it used
    assert counts == {"datasets": 2, "poisons": 6, "models": 9, "cells": 6}
    rows = {}
    for name in ("first", "second"):
        for row in json.loads((tmp_path / name / name / "results.json").read_text())["rows"]:
            rows.setdefault((row["attack"], row["seed"]), []).append(row)
    shared = [r for (attack, seed), r in rows.items() if seed == 1]
    assert shared and all(len(r) == 2 and r[0] == r[1] for r in shared)
