"""One answer to "which threat model does this PoisonSet answer to" (poison_core.threat): the stage runner
(tasks.stages.expected_threat, by store key) and the audit command (`belladonna audit`, by the attack in
the file's provenance) agree, for a dirty-label attack, a clean-label one, imported poisons and an
attack with its own threat model beside a second config of the same attack."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from belladonna.cli import main
from poison_core.config import load_benchmark
from poison_core.data import load_dataset
from poison_core.errors import AuditError
from poison_core.poisons import PoisonSet, audit_file, to_parquet_bytes
from poison_core.threat import answering_threats
from tasks import keys, stages

DATASET = "dataset: {name: digits, n_train: 200, n_test: 50}\n"
CASES = {
    # case: (benchmark YAML after name and dataset, grid member whose poisons are checked, poisons)
    "dirty-label": ("threat: {epsilon: 8, budget: 0.02}\nattacks: [{name: label_flip}]\n", "label_flip", 3),
    "clean-label": ("threat: {epsilon: 6, budget: 0.03, clean_label: true}\nattacks: [{name: error_min}]\n",
                    "error_min", 4),
    "imported": ("threat: {epsilon: 5, budget: 0.04}\nattacks: [{name: imported, params: {format: arrays, "
                 "path: '{npz}'}}]\n", "imported", 2),
    "own-threat": ("threat: {epsilon: 8, budget: 0.02}\nattacks: [{name: label_flip}, {name: label_flip, id: wide, "
                   "threat: {epsilon: 12, budget: 0.25}}]\n", "wide", 30),
}


def _poisons(train, threat, attack: str, count: int) -> PoisonSet:
    """`count` unchanged training images under `threat` (valid under it, and only under it)."""
    pos = np.arange(count)
    return PoisonSet(ids=train.ids[pos], images=train.images[pos], orig_labels=train.labels[pos],
                     poison_labels=train.labels[pos], threat=threat, n_train=len(train),
                     provenance={"attack": attack, "dataset_checksum": train.checksum()})


@pytest.mark.parametrize("case", list(CASES))
def test_stage_and_audit_command_agree(case, tmp_path, monkeypatch, capfd):
    body, member, count = CASES[case]
    npz = tmp_path / "imported.npz"
    np.savez(npz, images=np.zeros((1, 8, 8, 1), np.uint8), indices=np.array([0]))
    config = tmp_path / "bench.yaml"
    config.write_text(f"name: {case}\n{DATASET}{body.replace('{npz}', str(npz))}")
    cfg = load_benchmark(config)
    attack = next(a for a in cfg.attacks if a.key == member)
    prefix = keys.dataset_prefix(cfg.dataset)
    staged = stages.expected_threat(cfg, prefix, keys.poison_key(cfg, prefix, attack, cfg.seeds[0]))
    assert staged == cfg.threat_for(attack)

    train = load_dataset(cfg.dataset).train
    path = tmp_path / "poisons.parquet"
    path.write_bytes(to_parquet_bytes(_poisons(train, staged, attack.name, count)))
    _, audited = audit_file(str(path), train, cfg)
    assert audited == staged

    monkeypatch.setattr(sys, "argv", ["belladonna", "audit", str(path), str(config)])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capfd.readouterr().err
    out = capfd.readouterr().out
    assert f"ok: {count} poisons of {len(train)} (budget {staged.budget})" in out, out
    assert f"<= {staged.epsilon}/255" in out, out


def test_the_resolver_itself():
    cfg = load_benchmark(f"name: t\n{DATASET}" + CASES["own-threat"][0])
    plain, wide = cfg.attacks
    assert answering_threats(cfg, "label_flip") == (cfg.threat, wide.threat)  # by name: both, in grid order
    assert answering_threats(cfg, "label_flip", member="wide") == (wide.threat,)  # by member: one
    assert answering_threats(cfg, "label_flip", member="label_flip") == (cfg.threat,)
    with pytest.raises(AuditError, match=r"^f\.parquet: made by attack 'badnets', which benchmark 't' does not run "
                                         r"\(it runs: label_flip\)"):
        answering_threats(cfg, "badnets", what="f.parquet")
    with pytest.raises(AuditError, match="as member 'narrow'"):
        answering_threats(cfg, "label_flip", member="narrow")
