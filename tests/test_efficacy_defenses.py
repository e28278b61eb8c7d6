"""Efficacy of the defenses on real data (digits, always there), each cell run in-process.

* ABL against BadNets (10 % poisons, ConvNet): attack success below 10 % for both unlearning
  procedures; clean accuracy within 8 points of the undefended victim for the reference's pure ascent
  on the isolated set (measured ASR 0.042, clean 0.920 vs 0.987 undefended: the ascent on 107
  target-class images costs clean accuracy) and within 5 points for our descent_ascent variant
  (measured ASR 0.069, clean 0.984; 0.072 / 0.987 at its former lr 1e-3). ABL's isolation
  parameters are tuned to the 8x8 digits and the 15-epoch recipe (the paper's defaults are for CIFAR-10
  and 100 epochs), see ABL_DIGITS.
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
# 5 epochs at lr 5e-4. Measured for the default "ascent" (seed 0): lr 5e-4 ASR 0.042 / clean 0.920;
# lr 1e-3 ASR 0.010 / clean 0.906; lr 5e-4 with 4 epochs ASR 0.134 / clean 0.944 (undefended 0.987).
# Isolation at the victim's lr on shuffled batches and fine-tuning without crop/flip (the rules this
# setting was measured with before the reference's lr 0.1, unshuffled loader and augmented fine-tune
# became ABL's defaults): a flipped 8x8 digit is another glyph.
ABL_DIGITS = {"gamma": 1.5, "isolation_epochs": 6, "isolation_fraction": 0.08, "unlearning_epochs": 5,
              "unlearning_lr": 0.0005, "isolation_lr": None, "isolation_shuffle": True, "finetune_augment": False}
ABL_CLEAN_DROP = {"ascent": 0.08, "descent_ascent": 0.05}

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
    assert abl["asr"] < 0.10, f"ABL ASR {abl['asr']:.3f}"
    assert abl["clean_acc"] >= undefended["clean_acc"] - ABL_CLEAN_DROP[unlearning], (abl["clean_acc"],
                                                                                       undefended["clean_acc"])
    assert abl["defense_isolation_precision"] >= 0.8


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
