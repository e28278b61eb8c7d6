"""Efficacy of Image Shortcut Squeezing, UEraser and DP-SGD against their no-defense controls.

ISS-JPEG and UEraser against class-wise error-minimising noise (Huang et al., ICLR 2021) on the
Fashion-MNIST setting of test_efficacy_availability (8,000 / 2,000 images, width-16 ConvNet, 8 epochs,
eps 8/255, 100 % coverage), the noise crafted on 5 batches per round (that file's ~1 min variant);
every victim trains from seed 2. Measured (crafting seed 0, one torch thread, a loaded 2-core machine):

* 15 crafting rounds (the setting below): undefended 0.526 (clean 0.858); UEraser (K = 5 for the first
  2 of 8 epochs) 0.813; ISS-JPEG-10 0.291, *below* the undefended victim.
* 30 crafting rounds: undefended 0.544 (clean 0.858); UEraser 0.802 (on clean data 0.815, a 4-point
  cost); ISS-JPEG-10 0.665 (on clean data 0.843, a 1.5-point cost).

So UEraser recovers ~27 points reliably, ISS-JPEG does not: class-wise noise crafted on a barely
trained model is spatially low-frequency (the paper's Sec. 3 finding), which JPEG keeps and grayscale
would remove, but these images have one channel. The JPEG cell runs as a non-strict xfail that logs its
number.
Synthetic (patch-wise, low-frequency) noise at eps 16 on 3,000 images is *not* removed by JPEG-10:
0.584 undefended, 0.599 with ISS-JPEG (clean 0.829 / 0.789), as the paper's frequency analysis predicts
(JPEG squeezes high-frequency poisons, grayscale the colour-based ones; on 1-channel data grayscale is
the identity), so ISS is asserted on error-minimising noise only.

DP-SGD against BadNets (3 % poisons, target class 0, 3x3 patch) on digits with the MLP (no BatchNorm,
so the step is exactly Abadi et al.'s Alg. 1), 15 epochs, batch 64, lr 0.05: undefended ASR 0.963 /
clean 0.955; dp_sgd defaults (C 1, sigma 0.1) ASR 0.114 / clean 0.871; C 4, sigma 0.1: ASR 0.839 /
clean 0.940 (clipping at 4 leaves most per-sample gradients, 87 %, unclipped). With 10 % poisons and the
BatchNorm ConvNet the defaults leave the backdoor in (ASR 0.847, undefended 1.000) at a large clean cost
(0.759 vs 0.987), and sigma 1 keeps ASR 0.988 at clean 0.501: DP-SGD's gradient shaping is a partial,
costly defense, decisive here only at a small poison budget, as Hong et al. report for backdoors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig, load_benchmark
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.experiment import run_benchmark
from poison_core.poisons import apply

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

VICTIM = VictimConfig(model=ModelConfig(name="convnet", width=16), train=TrainConfig(epochs=8, batch_size=64, lr=0.05))
ERROR_MIN_CLASS = {"mode": "class", "width": 8, "steps": 5, "max_rounds": 15, "noise_batches": 5}
UERASER = {"repeats": 5, "adversarial_fraction": 0.25}  # K = 5 for the first 2 of 8 epochs (the README's 60/200)

BADNETS = """
name: efficacy-dp-sgd
dataset: {name: digits, seed: 0}
victim:
  model: {name: mlp}
  train: {epochs: 15, batch_size: 64, lr: 0.05}
threat: {epsilon: 255, budget: 0.03, clean_label: false}
attacks:
  - name: badnets
    params: {target_class: 0, patch_size: 3}
defenses:
  - name: none
  - name: dp_sgd
seeds: [0]
"""


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DatasetConfig(name="fashion-mnist", n_train=8000, n_test=2000, seed=0))


@pytest.fixture(scope="module")
def poisoned(splits, one_thread):
    ctx = CraftContext(train=splits.train, threat=ThreatModel(epsilon=8, budget=1.0, clean_label=True), seed=0)
    return apply(make_attack("error_min", ERROR_MIN_CLASS).craft(ctx), splits.train)


def defended_accuracy(name, params, train, test) -> float:
    result = make_defense(name, params).fit(DefenseContext(train=train, victim=VICTIM, seed=2))
    return float(np.mean(result.classifier.predict_logits(test.images).argmax(axis=1) == test.labels))


@pytest.fixture(scope="module")
def undefended(splits, poisoned):
    """(accuracy of the undefended victim on the poisons, on clean data)."""
    return (defended_accuracy("none", None, poisoned, splits.test),
            defended_accuracy("none", None, splits.train, splits.test))


@needs_fashion
@pytest.mark.parametrize(("name", "params", "gain"), [
    pytest.param("iss_jpeg", None, 0.06, marks=pytest.mark.xfail(
        strict=False, reason="JPEG-10 keeps low-frequency class-wise noise on 1-channel data (0.291 vs 0.526)")),
    ("ueraser", UERASER, 0.2)], ids=["iss_jpeg", "ueraser"])
def test_squeezing_and_ueraser_recover_from_class_wise_error_minimizing_noise(name, params, gain, splits, poisoned,
                                                                              undefended):
    defended = defended_accuracy(name, params, poisoned, splits.test)
    log.info("%s on class-wise error_min: %.4f (undefended %.4f, clean %.4f)", name, defended, *undefended)
    assert undefended[0] <= undefended[1] - 0.2, f"the poison must work: {undefended}"
    assert defended >= undefended[0] + gain, f"{name} {defended:.3f}, undefended {undefended[0]:.3f}"


def test_dp_sgd_suppresses_a_small_badnets_backdoor_on_digits(one_thread):
    rows = {row["defense"]: row for row in run_benchmark(load_benchmark(BADNETS)).rows}
    undefended, dp = rows["none"], rows["dp_sgd"]
    log.info("dp_sgd: ASR %.3f clean %.3f (undefended ASR %.3f clean %.3f)", dp["asr"], dp["clean_acc"],
             undefended["asr"], undefended["clean_acc"])
    assert undefended["asr"] >= 0.9, "the backdoor must work on the undefended victim"
    assert dp["asr"] <= 0.3, f"dp_sgd ASR {dp['asr']:.3f}"
    assert dp["clean_acc"] >= undefended["clean_acc"] - 0.12, (dp["clean_acc"], undefended["clean_acc"])
