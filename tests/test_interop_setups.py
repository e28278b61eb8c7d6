"""The benchmark's poison setups as the targeted attacks' key draw: the file's targets, classes and bases
are what a craft uses (in a craft and through `belladonna run`), its content is in the stage key, and
hostile or wrong files are one line naming the file and the field."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig, load_benchmark
from poison_core.data import load_dataset
from poison_core.errors import ConfigError, DatasetError
from poison_core.interop import setups as setup_files
from poison_core.models import build_model
from poison_core.poisons import read_poison_set
from poison_core.training import train_model
from tests.interop_helpers import benchmark_setups

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=300, n_test=100, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test


def setups_threat(path, n_targets=3, start=0, budget=0.05) -> ThreatModel:
    return ThreatModel(epsilon=8, budget=budget, clean_label=True, targets=TargetSelection(
        mode="setups", n_targets=n_targets, setups={"path": str(path), "start": start}))


@pytest.fixture(scope="module")
def surrogate(one_thread):
    model = build_model(ModelConfig(name="mlp", width=16), TRAIN.image_shape, TRAIN.num_classes, seed=0)
    train_model(model, TRAIN, TrainConfig(epochs=1, batch_size=64), device="cpu", seed=0)
    return model


FAST = {"poison_frogs": {"steps": 2}, "bullseye_polytope": {"steps": 2}, "witches_brew": {"steps": 2, "restarts": 1}}


def craft(threat, surrogate, seed=0, name="poison_frogs"):
    return make_attack(name, FAST[name]).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=seed, surrogates=[surrogate]))


def _ids(setups) -> np.ndarray:
    return np.sort(np.concatenate([s["base indices"] for s in setups]))


@pytest.mark.parametrize("name", sorted(FAST))
def test_craft_uses_the_setups_targets_classes_and_bases(tmp_path, surrogate, name):
    written = benchmark_setups(tmp_path / "setups.pickle", TRAIN, TEST, n_setups=4)
    ps = craft(setups_threat(tmp_path / "setups.pickle", n_targets=2, start=1), surrogate, name=name)
    used = written[1:3]
    assert np.array_equal(np.sort(ps.ids), _ids(used))
    assert ps.targets["target_ids"] == [int(s["target index"]) for s in used]
    assert ps.targets["adversarial_classes"] == ps.targets["base_classes"] == [s["base class"] for s in used]
    assert ps.targets["true_classes"] == [s["target class"] for s in used]
    # No draw is left: another seed crafts for the same keys and bases.
    other = craft(setups_threat(tmp_path / "setups.pickle", n_targets=2, start=1), surrogate, seed=7, name=name)
    assert np.array_equal(np.sort(other.ids), np.sort(ps.ids)) and other.targets == ps.targets


def test_repeated_and_shared_bases_are_used_once(tmp_path, surrogate):
    written = benchmark_setups(tmp_path / "s.pickle", TRAIN, TEST, n_setups=2)
    written[0]["base indices"] = np.concatenate([written[0]["base indices"], written[0]["base indices"][:1]])
    written[1]["base class"] = written[0]["base class"]  # the same class, so a base can be shared
    same = TEST.ids[(TEST.labels != written[0]["base class"])][:1]
    written[1]["target index"], written[1]["target class"] = np.int64(same[0]), int(
        TEST.labels[TEST.positions(same)][0])
    others = np.setdiff1d(TRAIN.ids[TRAIN.labels == written[0]["base class"]], written[0]["base indices"])
    written[1]["base indices"] = np.concatenate([written[0]["base indices"][:2], others[-2:]])
    (tmp_path / "s.pickle").write_bytes(pickle.dumps(written, protocol=4))
    ps = craft(setups_threat(tmp_path / "s.pickle", n_targets=2), surrogate)
    assert len(ps) == len(set(ps.ids.tolist())) == 6  # 4 + the second key's 2 bases not already used
    assert set(written[0]["base indices"].tolist()) <= set(ps.ids.tolist())


def test_budget_smaller_than_the_setups_is_refused(tmp_path, surrogate):
    benchmark_setups(tmp_path / "s.pickle", TRAIN, TEST, n_setups=3, n_bases=4)
    with pytest.raises(ConfigError, match=r"threat.budget: setups 0..2 of .* hold 12 bases; the budget 0.03 of "
                                          r"300 training samples allows 9 \(raise budget to at least 0.04"):
        craft(setups_threat(tmp_path / "s.pickle", budget=0.03), surrogate)


def test_stage_key_follows_the_file_content_not_its_path(tmp_path):
    from tasks import keys

    benchmark_setups(tmp_path / "a.pickle", TRAIN, TEST)
    shutil.copy(tmp_path / "a.pickle", tmp_path / "b.pickle")
    benchmark_setups(tmp_path / "c.pickle", TRAIN, TEST, seed=5)
    base = load_benchmark(CONFIG.format(path=tmp_path / "a.pickle", n=3))

    def key(name, **targets):
        threat = base.threat.model_copy(update={"targets": base.threat.targets.model_copy(update={
            "setups": base.threat.targets.setups.model_copy(update={"path": str(tmp_path / name), **targets})})})
        cfg = base.model_copy(update={"threat": threat})
        return keys.poison_stage(cfg, "datasets/digits-x", cfg.attacks[0], 0)

    a, b, c, a1 = key("a.pickle"), key("b.pickle"), key("c.pickle"), key("a.pickle", start=1)
    assert a.key == b.key and a.parts["input"] != c.parts["input"] and a.parts["params"] == c.parts["params"]
    assert a1.parts["params"] != a.parts["params"]
    # A selection without a setups file dumps without the field: keys made before it are unchanged.
    assert "setups" not in TargetSelection().model_dump()


CONFIG = """
name: setups
dataset: {{name: digits, n_train: 300, n_test: 100}}
victim:
  model: {{name: mlp, width: 16}}
  train: {{epochs: 1, batch_size: 64}}
threat:
  epsilon: 8
  budget: 0.05
  clean_label: true
  targets: {{mode: setups, n_targets: {n}, setups: {{path: "{path}"}}}}
attacks:
  - {{name: poison_frogs, params: {{steps: 2}}}}
defenses: [{{name: none}}]
seeds: [0]
"""


def belladonna(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BELLADONNA_STORE"}
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow  # a whole run (surrogate, craft, victim, cell): about 75 s on a loaded 2-core machine
def test_belladonna_run_crafts_for_the_setups(tmp_path):
    written = benchmark_setups(tmp_path / "setups.pickle", TRAIN, TEST, n_setups=3)
    config = tmp_path / "setups.yaml"
    config.write_text(CONFIG.format(path=tmp_path / "setups.pickle", n=3))
    out = tmp_path / "out"
    proc = belladonna("run", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "setups" / "results.json").read_text())
    [row] = [r for r in results["rows"] if r["attack"] == "poison_frogs"]
    assert row["n_targets"] == 3
    uri = f"{results['store'].rstrip('/')}/{results['poisons']['poison_frogs/seed0']}"
    ps = read_poison_set(uri, TRAIN, load_benchmark(config).threat)
    assert np.array_equal(np.sort(ps.ids), _ids(written))
    assert ps.targets["target_ids"] == [int(s["target index"]) for s in written]


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _entry(**change):
    good = {"target class": int(TEST.labels[0]), "target index": np.int64(TEST.ids[0]),
            "base class": int((TEST.labels[0] + 1) % 10),
            "base indices": TRAIN.ids[TRAIN.labels == (TEST.labels[0] + 1) % 10][:3].astype(np.int64)}
    good.update(change)
    return good


def _without(key):
    entry = _entry()
    entry.pop(key)
    return entry


HOSTILE = [
    ([_System()], r"global '(posix|os|nt)\.system' is forbidden"),
    ({"a": 1}, r"expected a list of setup dicts, got dict"),
    ([], r"holds 0 setups \(allowed: 1\.\.100000\)"),
    ([("target class", 1)], r"setup 0 must be a dict"),
    ([_without("base indices")], r"setup 0 has keys .*: missing 'base indices'"),
    ([{**_entry(), "extra": 1}], r"setup 0 has keys .*: unknown 'extra'"),
    ([_entry(**{"target index": "7"})], r"setup 0's 'target index' must be an integer, got str"),
    ([_entry(**{"target class": True})], r"setup 0's 'target class' must be an integer, got bool"),
    ([_entry(**{"base indices": np.zeros(3)})], r"setup 0's 'base indices' must be a 1-d integer array, got float64"),
    ([_entry(**{"base indices": np.zeros((2, 2), np.int64)})], r"'base indices' must be a 1-d integer array"),
    ([_entry(**{"base indices": np.arange(301)})], r"'base indices' holds 301 indices \(allowed: 1\.\.300"),
    ([_entry(**{"base indices": [1, -4]})], r"'base indices' holds -4; allowed: >= 0"),
    ([_entry(**{"target index": np.int64(-1)})], r"setup 0's 'target index' is -1; allowed: >= 0"),
    ([_entry(**{"target index": np.int64(10**9)})], r"setup 0's 'target index' 1000000000 is not in the config's "
                                                    r"test split \(100 samples"),
    ([_entry(**{"base class": 10})], r"setup 0's 'base class' is 10; allowed: 0\.\.9"),
    ([_entry(**{"target class": int((TEST.labels[0] + 2) % 10)})], r"'target class' \d is not the label \d of test "
                                                                   r"index \d+: the file is for another dataset"),
    ([_entry(**{"base class": int(TEST.labels[0])})], r"'base class' \d is the target's own class"),
    ([_entry(**{"base indices": np.asarray([TRAIN.ids[0], 10**6])})],
     r"'base indices': 1 of 2 are not in the config's training split, first 1000000"),
    ([_entry(**{"base indices": TRAIN.ids[:12].astype(np.int64)})], r"'base indices': \d+ of 12 are not of base "
                                                                    r"class \d, first \d+"),
]


@pytest.mark.parametrize("payload, message", HOSTILE)
def test_hostile_or_wrong_setups_are_one_line_naming_file_and_field(tmp_path, payload, message):
    path = tmp_path / "setups.pickle"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DatasetError, match=message) as info:
        setup_files.load(path, 0, 1, TRAIN, TEST)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_more_setups_than_the_file_holds_are_refused(tmp_path):
    (tmp_path / "s.pickle").write_bytes(pickle.dumps([_entry()], protocol=4))
    assert len(setup_files.load(tmp_path / "s.pickle", 0, 1, TRAIN, TEST)) == 1
    with pytest.raises(DatasetError, match=r"holds 1 setups; threat.targets.setups.start 1 \+ n_targets 2 asks for "
                                           r"setups up to 2"):
        setup_files.load(tmp_path / "s.pickle", 1, 2, TRAIN, TEST)


def test_oversized_and_special_files_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.pickle"
    with big.open("wb") as handle:
        handle.truncate(setup_files.MAX_SETUPS_BYTES + 1)  # sparse: no 64 MiB written
    with pytest.raises(DatasetError, match=r"is \d+ bytes, more than the limit of 67108864"):
        setup_files.load(big, 0, 1, TRAIN, TEST)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DatasetError, match="is a FIFO"):
        setup_files.load(tmp_path / "fifo", 0, 1, TRAIN, TEST)


def test_config_needs_the_file_exactly_in_setups_mode():
    with pytest.raises(ValueError, match="given exactly when mode is 'setups'"):
        TargetSelection(mode="setups")
    with pytest.raises(ValueError, match="given exactly when mode is 'setups'"):
        TargetSelection(mode="random", setups={"path": "x.pickle"})
    with pytest.raises(ValueError, match="leave adversarial_class unset"):
        TargetSelection(mode="setups", setups={"path": "x.pickle"}, adversarial_class=2)


@pytest.mark.parametrize("kind, message", [
    ("system", r"threat\.targets\.setups: .*setups\.pickle refused: UnpicklingError: global '(posix|os)\.system'"),
    ("range", r"threat\.targets\.setups: .*setups\.pickle: setup 0's 'target index' 1000000000 is not in the "
              r"config's test split"),
])
def test_run_refuses_a_hostile_setups_file_with_exit_2_before_crafting(tmp_path, kind, message):
    path = tmp_path / "setups.pickle"
    payload = [_System()] if kind == "system" else [_entry(**{"target index": np.int64(10**9)})]
    path.write_bytes(pickle.dumps(payload, protocol=4))
    config = tmp_path / "setups.yaml"
    config.write_text(CONFIG.format(path=path, n=1))
    proc = belladonna("run", str(config), "--out", str(tmp_path / "out"), timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert not list((tmp_path / "out").glob("**/poisons/*.parquet"))
