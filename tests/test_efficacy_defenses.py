"""Efficacy of the defenses on real data (digits, always there), each cell run in-process.

* ABL against BadNets (10 % poisons, ConvNet) with the reference's isolation (10 epochs at lr 0.1 on
  the unshuffled set, ABL's defaults): attack success below 10 % for both unlearning procedures on
  the test's seed 0, clean accuracy within 12 points of the undefended victim (see ABL_DIGITS for the
  measurement over seeds 0-2; the reference's pure ascent on the isolated target-class images costs
  clean accuracy). ABL's gamma and isolation fraction are tuned to the 8x8 digits and the 15-epoch recipe
  (the paper's are for CIFAR-10 and 100 epochs), see ABL_DIGITS.
* Trimmed loss against 30 % random label flips: clearly higher accuracy than the undefended victim.
* DPA with k = 10 base models: a certified-accuracy curve that is high at r = 0 and non-increasing.
"""

from __future__ import annotations

import json

import logging

import numpy as np
import pytest

from poison_core.config import DatasetConfig, ModelConfig, TrainConfig, VictimConfig, load_benchmark
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, certified_accuracy, certified_radius, make_defense
from poison_core.experiment import run_benchmark

log = logging.getLogger(__name__)

# gamma 1.5: on digits clean losses fall fast, so with the paper's 0.5 the batch loss is held where
# poisons and clean samples overlap (measured isolation precision 0.01-0.67 at p = 5 %); at 1.5 it
# is 0.91-1.0. p = 8 % isolates most of the 10 % poisons; with the paper's 1 % the 90 % left in D_c
# re-teach the trigger during unlearning (ASR 0.28-1.0 over 4 seeds). Unlearning: the reference's
# 5 epochs at lr 5e-4 (ABL's defaults). Isolation: ABL's defaults, the reference's 10 epochs at lr 0.1
# on the unshuffled set. Fine-tuning without crop/flip (finetune_augment false): the victim's digits
# recipe has none, and a flipped 8x8 digit is another glyph (with it, seeds 0-2: ASR 0.30 / 0.11 / 0.38,
# clean 0.78 / 0.75 / 0.64). Measured with these params (benchmark seeds 0, 1, 2; undefended ASR 1.0,
# clean 0.987 / 0.987 / 0.991; this module's BADNETS run with `seeds: [0, 1, 2]`, each unlearning):
#   ascent:          ASR 0.035 / 0.020 / 0.059, clean 0.891 / 0.920 / 0.797, isolation precision
#                    0.79 / 0.98 / 1.00
#   descent_ascent:  ASR 0.000 / 1.000 / 0.003, clean 0.882 / 0.984 / 0.971 (same isolation; on seed 1
#                    its capped ascent leaves the trigger in, the reference's pure ascent does not)
# The test runs seed 0; the bars (ASR < 0.10, clean drop <= 0.12, precision >= 0.75) hold for every
# ascent seed but seed 2's clean drop (0.19), and for descent_ascent on seeds 0 and 2. With the earlier
# isolation (6 epochs at the victim's lr 0.05, shuffled): ascent ASR 0.042 / clean 0.920, descent_ascent
# 0.069 / 0.984 (seed 0).
ABL_DIGITS = {"gamma": 1.5, "isolation_fraction": 0.08, "unlearning_epochs": 5, "unlearning_lr": 0.0005,
              "finetune_augment": False}
ABL_CLEAN_DROP = {"ascent": 0.12, "descent_ascent": 0.12}

BADNETS = """
name: efficacy-abl
dataset: {name: digits, seed: 0}
victim:
  model: {name: convnet}
  train: {epochs: 15, batch_size: 64, lr: 0.05}
threat: {epsilon: 255, budget: 0.1, clean_label: false}
attacks:
  - name: badnets
    params: {target_class: 0, patch_size: 3}
defenses:
  - name: none
  - name: abl
    params: {ABL_PARAMS}
seeds: [0]
"""

FLIPS = """
name: efficacy-trimmed
dataset: {name: digits, seed: 0}
victim:
  model: {name: convnet}
  train: {epochs: 15, batch_size: 64, lr: 0.05}
threat: {epsilon: 0, budget: 0.3, clean_label: false}
attacks:
  - name: label_flip
defenses:
  - name: none
  - name: trimmed_loss
    params: {alpha: 0.7, warmup_epochs: 5}
seeds: [0]
"""


def _by_defense(result):
    return {row["defense"]: row for row in result.rows}


@pytest.mark.slow
@pytest.mark.parametrize("unlearning", ["ascent", "descent_ascent"])
def test_abl_removes_the_badnets_backdoor_on_digits(unlearning):
    params = {**ABL_DIGITS, "unlearning": unlearning}
    config = BADNETS.replace("{ABL_PARAMS}", json.dumps(params))  # JSON is YAML: None becomes null
    rows = _by_defense(run_benchmark(load_benchmark(config)))
    undefended, abl = rows["none"], rows["abl"]
    log.info("abl %s: ASR %.3f clean acc %.3f (undefended ASR %.3f clean acc %.3f)", unlearning, abl["asr"],
             abl["clean_acc"], undefended["asr"], undefended["clean_acc"])
    assert undefended["asr"] >= 0.9, "the attack must work on the undefended victim"
    assert undefended["baseline_asr"] <= 0.05, "the no-poison victim must not call patched images the target"
    assert abl["asr"] < 0.10, f"ABL ASR {abl['asr']:.3f}"
    assert abl["clean_acc"] >= undefended["clean_acc"] - ABL_CLEAN_DROP[unlearning], (abl["clean_acc"],
                                                                                       undefended["clean_acc"])
    assert abl["defense_isolation_precision"] >= 0.75


@pytest.mark.slow
def test_trimmed_loss_resists_random_label_flips_on_digits():
    rows = _by_defense(run_benchmark(load_benchmark(FLIPS)))
    undefended, trimmed = rows["none"], rows["trimmed_loss"]
    assert undefended["clean_acc"] <= undefended["baseline_clean_acc"] - 0.05, "30 % flips must hurt"
    assert trimmed["clean_acc"] >= undefended["clean_acc"] + 0.03, (trimmed["clean_acc"], undefended["clean_acc"])


@pytest.mark.slow
def test_dpa_certified_accuracy_curve_on_digits():
    splits = load_dataset(DatasetConfig(name="digits", seed=0))
    victim = VictimConfig(model=ModelConfig(name="convnet", width=16),
                          train=TrainConfig(epochs=15, batch_size=64, lr=0.05))
    result = make_defense("dpa", {"k": 10, "epochs": 30}).fit(DefenseContext(train=splits.train, victim=victim,
                                                                               seed=0))
    votes = result.classifier.votes(splits.test.images)
    assert votes.shape == (len(splits.test), 10) and np.all(votes.sum(axis=1) == 10)
    radii = np.arange(0, 7)
    curve = certified_accuracy(votes, splits.test.labels, radii)
    assert np.all(np.diff(curve) <= 0), curve
    assert curve[0] >= 0.9 and curve[2] >= 0.8, curve
    assert curve[6] == 0.0 and certified_radius(votes).max() <= 5  # 10 voters certify at most 5 changes
