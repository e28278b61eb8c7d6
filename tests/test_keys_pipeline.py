"""The key contract end to end: a dataset rewritten in place, a Parquet split replaced on a real S3 endpoint
(moto), and a member's source edited between two processes each recompute exactly what they determine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from infra.storage import Store
from poison_core.config import DatasetConfig
from poison_core.data import write_split
from tasks import stages
from tests.helpers import tiny_dataset
from tests.s3server import s3_env_fixture, moto_endpoint_fixture  # noqa: F401  (fixtures)
from tests.test_cli import belladonna
from tests.test_keys import write_folder


def test_replacing_a_parquet_split_on_s3_recomputes_ingest(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint.endpoint)  # how the parquet loader reaches moto
    root = f"s3://{s3_env.bucket}/datasets/mine"
    options = {"client_kwargs": {"endpoint_url": s3_env.endpoint.endpoint}}
    train, test = tiny_dataset(n=64, seed=0), tiny_dataset(n=32, seed=1)
    write_split(train, f"{root}/train.parquet", options)
    write_split(test, f"{root}/test.parquet", options)
    cfg = DatasetConfig(name="parquet", path=root)
    store = Store(str(tmp_path / "store"))
    first = stages.ingest(store, cfg, "s3")
    again = stages.ingest(store, cfg, "s3")
    assert (first.reason, again.reason, again.key) == ("new", "reused", first.key)
    replaced = train.replace(images=np.ascontiguousarray(255 - train.images))  # same shape and size, new pixels
    write_split(replaced, f"{root}/train.parquet", options)
    third = stages.ingest(store, cfg, "s3")
    assert third.computed and third.reason == "input changed" and third.key != first.key
    assert np.array_equal(stages.load_splits(store, third.key).train.images,
                          stages.load_splits(store, third.key).train.images)
    assert not np.array_equal(stages.load_splits(store, third.key).train.images,
                              stages.load_splits(store, first.key).train.images)


PLUGIN = '''
"""A test-only attack outside poison_core: relabels floor(budget * n) samples by `shift` classes."""
import numpy as np
from pydantic import Field

from poison_core.attacks.base import Attack, AttackParams, Crafted, register_attack

OFFSET = 0


class ShiftParams(AttackParams):
    shift: int = Field(1, ge=1, le=9)


@register_attack
class Shift(Attack):
    name = "keytest_shift"
    paper = "none (a test member)"
    summary = "relabel by a shift"
    Params = ShiftParams
    label_policy = "dirty"

    def _craft(self, ctx, n_poison, rng):
        pos = np.sort(rng.choice(len(ctx.train.labels), size=n_poison, replace=False))
        new = (ctx.train.labels[pos] + self.params.shift + OFFSET) % ctx.train.num_classes
        if np.any(new == ctx.train.labels[pos]):
            new = (new + 1) % ctx.train.num_classes
        return Crafted(positions=pos, images=ctx.train.images[pos], poison_labels=new,
                       targets={"kind": "availability"})
'''

GRID = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import keytest_plugin.shift  # registers keytest_shift
    from infra.storage import Store
    from poison_core.config import load_benchmark
    from tasks import stages

    cfg = load_benchmark(sys.argv[2])
    store = Store(sys.argv[3])
    prefix = stages.ingest(store, cfg.dataset, cfg.name).key
    defense, out = cfg.defenses[0], {}
    clean = stages.retrain(store, cfg, prefix, defense, 0, None)
    for attack in cfg.attacks:
        poisons = stages.craft(store, cfg, prefix, attack, 0)
        model = stages.retrain(store, cfg, prefix, defense, 0, poisons.key)
        cell = stages.evaluate_cell(store, cfg, prefix, attack.key, defense.key, 0, poisons.key, model.key, clean.key)
        out[attack.key] = [poisons.reason, model.reason, cell.reason, json.loads(store.read_bytes(cell.key))["clean_acc"]]
    out["clean"] = clean.reason
    print(json.dumps(out))
''')

CONFIG = """
name: keys-plugin
dataset: {name: digits, n_train: 200, n_test: 100, seed: 0}
victim: {model: {name: mlp, width: 16}, train: {epochs: 1, batch_size: 64}}
threat: {epsilon: 0, budget: 0.2}
attacks:
  - {name: keytest_shift}
  - {name: label_flip}
seeds: [0]
"""


@pytest.mark.slow
def test_editing_a_members_source_recomputes_its_outputs_only(tmp_path):
    package = tmp_path / "plugins" / "keytest_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "shift.py").write_text(PLUGIN)
    config, script = tmp_path / "grid.yaml", tmp_path / "grid.py"
    config.write_text(CONFIG)
    script.write_text(GRID)

    def run() -> dict:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "plugins"), str(config),
                               str(tmp_path / "store")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()
    assert first["keytest_shift"][:3] == ["new"] * 3 and first["label_flip"][:3] == ["new"] * 3
    (package / "shift.py").write_text(PLUGIN.replace('"""A test-only attack', '"""Reworded: a test-only attack'))
    assert run()["keytest_shift"][:3] == ["reused"] * 3  # a docstring is not code
    (package / "shift.py").write_text(PLUGIN.replace("OFFSET = 0", "OFFSET = 1"))
    edited = run()
    assert edited["keytest_shift"][:3] == ["code changed", "input changed", "input changed"]
    assert edited["label_flip"][:3] == ["reused"] * 3 and edited["clean"] == "reused"
    (package / "shift.py").write_text(PLUGIN.replace("OFFSET = 0", "OFFSET = 1")
                                      .replace("Field(1, ge=1", "Field(2, ge=1"))
    default = run()  # a changed default: the params (defaults filled in) and the source both changed
    assert default["keytest_shift"][:3] == ["params changed, code changed", "input changed", "input changed"]
    assert default["label_flip"][:3] == ["reused"] * 3


@pytest.mark.slow
def test_run_recomputes_a_rewritten_imagefolder_says_why_and_forces_on_request(tmp_path):
    write_folder(tmp_path / "images", pixels=0, n=20)
    config = tmp_path / "bench.yaml"
    config.write_text(f"""
name: folder
dataset: {{name: imagefolder, path: {tmp_path / 'images'}, test_fraction: 0.3}}
victim: {{model: {{name: mlp, width: 16}}, train: {{epochs: 3, batch_size: 16}}}}
threat: {{epsilon: 0, budget: 0.2}}
attacks: [{{name: label_flip}}]
seeds: [0]
""")
    out = tmp_path / "out"

    def run(*extra: str) -> tuple[str, dict]:
        proc = belladonna("run", str(config), "--out", str(out), *extra)
        assert proc.returncode == 0, proc.stderr
        line = next(s for s in proc.stdout.splitlines() if s.startswith("computed (not reused)"))
        return line, json.loads((out / "folder" / "results.json").read_text())

    line, first = run()
    assert "ingest 1 (new 1)" in line and "craft 1 (new 1)" in line and "evaluate 1 (new 1)" in line
    write_folder(tmp_path / "images", pixels=128, n=20)  # same names and sizes, new pixels
    line, rewritten = run()
    assert "ingest 1 (input changed 1)" in line and "craft 1 (input changed 1)" in line
    assert "retrain 2 (input changed 2)" in line and "evaluate 1 (input changed 1)" in line
    assert rewritten["reasons"]["craft"] == {"label_flip/0": "input changed"}
    assert rewritten["poisons"] != first["poisons"]
    line, forced = run("--recompute", "label_flip")  # everything else unchanged: reused
    assert "ingest 0, pretrain 0, craft 1 (forced 1), retrain 1 (forced 1), evaluate 1 (forced 1)" in line
    assert forced["reasons"]["retrain"] == {"clean/none/0": "reused", "label_flip/none/0": "forced"}
    assert forced["rows"] == rewritten["rows"]  # a forced recompute reproduces the stored result
    bad = belladonna("run", str(config), "--out", str(out), "--recompute", "nosuch")
    assert bad.returncode == 2 and "--recompute: 'nosuch'" in bad.stderr

    from mlflow import MlflowClient

    parent = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(forced["mlflow"]["run_id"])
    assert parent.data.tags["pipeline.reasons.craft"] == "craft 1 (forced 1)"
