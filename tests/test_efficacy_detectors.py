"""Efficacy of the backdoor detectors on real data: digits (always there) with a BadNets backdoor,
10 % of the training set stamped with a white 2x2 patch and relabelled to class 0, ConvNet victim
(15 epochs), each defense fitted in-process on the poisoned training set.

Measured (victim seed 5, one thread, ~30 s per test; undefended: ASR 1.000, clean accuracy 0.980):
* STRIP (defaults: N = 100 additive blends, boundary at FRR 1 % of a robust normal fit): recall
  1.000 of the poisons while removing 10.5 % of the training set (a random filter removing as much
  finds 10.5 %), precision 0.950; ASR 1.000 -> 0.002, clean accuracy 0.987. With a 3x3 white patch:
  recall 1.0 as well; with the 3x3 checkerboard the additive blend overwrites the patch's black half
  (recall 0.58 at FRR 1 %, ASR 0.98; 0.91 when dropping the lowest 15 %, ASR 0.70), and ART's linear
  blend (alpha 0.5) halves any patch and found no poisons here (recall 0.00).
* Neural Cleanse (NC_DIGITS): reversed mask L1 of class 0 is 3.46 against a median of 11.9 over
  classes, anomaly index 2.60, class 0 flagged alone; unlearning with the flagged class left out of
  the fine-tuning sample: ASR 1.000 -> 0.000, clean accuracy 0.973. On the clean model the smallest
  norm's (class 8) index is 0.83, nothing flagged. The margin is thin on 8x8 digits, where about ten
  pixels change any class: over three reversal-sample seeds the 2x2 patch gave index 2.24-2.99
  (always flagged), the 3x3 white patch 1.66-5.13 (flagged in 2 of 3 runs, once with a spurious
  class 9), and clean models 0.15-0.91. The paper's unlearning (10 % sample, 1 epoch, victim lr 0.05,
  poisons included) was erratic (3x3 patch: ASR 1.0 / 0.0 / 0.0 over three unlearning seeds at clean
  accuracy 0.78-0.84), see poison_core/defenses/neural_cleanse.py.
"""

from __future__ import annotations

import logging

import pytest

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.evaluation import evaluate
from poison_core.poisons import apply, poison_mask

log = logging.getLogger(__name__)

VICTIM = VictimConfig(model=ModelConfig(name="convnet"), train=TrainConfig(epochs=15, batch_size=64, lr=0.05))
SEED = 5
# 256 samples and 40 epochs keep the reversal of all 10 classes near 15 s on one thread (the authors
# use 1000 samples); unlearning: all non-flagged training data, 20 % stamped, 2 epochs at lr 0.01.
NC_DIGITS = {"n_samples": 256, "epochs": 40, "unlearn_fraction": 1.0, "unlearn_epochs": 2, "unlearn_lr": 0.01,
             "exclude_flagged": True}


@pytest.fixture(scope="module")
def backdoored():
    splits = load_dataset(DatasetConfig(name="digits", seed=0))
    attack = make_attack("badnets", {"target_class": 0, "patch_size": 2, "pattern": "white"})
    poison_set = attack.craft(CraftContext(train=splits.train, test=splits.test, seed=1,
                                           threat=ThreatModel(epsilon=255, budget=0.1, clean_label=False)))
    train = apply(poison_set, splits.train)
    ctx = DefenseContext(train=train, victim=VICTIM, seed=SEED, is_poison=poison_mask(poison_set, splits.train))
    undefended = evaluate(make_defense("none").fit(ctx).classifier, splits.test, poison_set)
    assert undefended["asr"] >= 0.9, "the attack must work on the undefended victim"
    return splits, poison_set, ctx, undefended


@pytest.mark.slow
def test_strip_finds_the_poisons_far_above_chance_and_lowers_asr(backdoored):
    splits, poison_set, ctx, undefended = backdoored
    result = make_defense("strip").fit(ctx)
    got, info = evaluate(result.classifier, splits.test, poison_set), result.info
    removed = 1.0 - info["kept_fraction"]
    log.info("strip: recall %.3f precision %.3f removed %.3f; ASR %.3f clean %.3f (undefended %.3f / %.3f)",
             info["filter_recall"], info["filter_precision"], removed, got["asr"], got["clean_acc"],
             undefended["asr"], undefended["clean_acc"])
    assert info["filter_recall"] >= 0.9 and info["filter_recall"] >= 5 * removed  # random filter: recall = removed
    assert got["asr"] <= undefended["asr"] - 0.5
    assert got["clean_acc"] >= undefended["clean_acc"] - 0.03


@pytest.mark.slow
def test_neural_cleanse_flags_the_target_class_and_unlearning_removes_the_backdoor(backdoored):
    splits, poison_set, ctx, undefended = backdoored
    result = make_defense("neural_cleanse", NC_DIGITS).fit(ctx)
    got, info = evaluate(result.classifier, splits.test, poison_set), result.info
    log.info("neural cleanse: %s; ASR %.3f clean %.3f (undefended %.3f / %.3f)", info, got["asr"], got["clean_acc"],
             undefended["asr"], undefended["clean_acc"])
    assert info["nc_flagged"] == 1.0 and info["nc_flagged_class"] == 0.0 and info["nc_anomaly_index"] > 2
    assert info["nc_flagged_poison_class"] == 1.0
    assert got["asr"] <= 0.1 < undefended["asr"]
    assert got["clean_acc"] >= undefended["clean_acc"] - 0.03


@pytest.mark.slow
def test_neural_cleanse_flags_nothing_on_a_clean_model(backdoored):
    splits, _, ctx, _ = backdoored
    clean = DefenseContext(train=splits.train, victim=VICTIM, seed=SEED)
    info = make_defense("neural_cleanse", {**NC_DIGITS, "mitigation": "none"}).fit(clean).info
    log.info("neural cleanse on the clean model: %s", info)
    assert info["nc_flagged"] == 0.0 and info["nc_flagged_class"] == -1.0 and info["nc_anomaly_index"] < 2


@pytest.mark.slow
def test_neural_cleanse_false_alarm_on_fashion_mnist_costs_little_clean_accuracy(one_thread):
    """The false alarm of poison_core/defenses/neural_cleanse.py, reproduced on a clean model: class 8
    (bag) has a naturally small reversed trigger and is flagged. Its unlearning used to cost the grid's
    victims up to 42 points; with the BatchNorm re-estimation it costs a few. Measured (2,000 images,
    width-16 ConvNet, 10 epochs, seed 3): index 3.12 on class 8 (the next class below the median: 0.98), clean
    accuracy 0.812 -> 0.796 after unlearning, 0.713 without the re-estimation. The flag threshold is 1.5
    instead of 2 so that another machine's floating-point path still flags class 8 (the grid's models
    flagged it at indices 2.1-7.0, depending on the run)."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=2000, n_test=1000, seed=0))
    victim = VictimConfig(model=ModelConfig(name="convnet", width=16),
                          train=TrainConfig(epochs=10, batch_size=64, lr=0.05, schedule="cosine"))
    ctx = DefenseContext(train=splits.train, victim=victim, seed=3)
    before = evaluate(make_defense("none").fit(ctx).classifier, splits.test)["clean_acc"]
    result = make_defense("neural_cleanse", {"epochs": 40, "n_samples": 200, "anomaly_threshold": 1.5}).fit(ctx)
    after = evaluate(result.classifier, splits.test)["clean_acc"]
    log.info("neural cleanse on a clean Fashion-MNIST model: %s; clean accuracy %.3f -> %.3f", result.info, before,
             after)
    assert result.info["nc_flagged"] == 1.0, "no false alarm here any more: this test needs a model that has one"
    assert len(result.history) == 1 and after >= before - 0.04
