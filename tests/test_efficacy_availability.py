"""Efficacy of the availability attacks on a Fashion-MNIST subset, against the clean victim and the
random-noise control.

Setting (the cheapest found where the clean victim clears 0.85): 8,000 training / 2,000 test images
(DatasetConfig seed 0), a width-16 ConvNet trained from scratch for 8 epochs (SGD + Nesterov, batch
64, lr 0.05 cosine, weight decay 5e-4), epsilon 8/255, 100 % coverage (budget 1.0). One clean victim
(seed 1) is shared by every assertion and doubles as the error-maximising attack's surrogate; every
poisoned victim trains from another seed (2). Each attack is crafted once (seed 0), lazily.

Bars: clean >= 0.85; class-wise error-minimising noise >= 35 points below clean and sample-wise >= 15
points below (five times the random-noise band); synthetic noise and error-maximising poisons >= 30
points below clean; random noise of the same epsilon within 3 points of clean; class-wise and
synthetic noise linearly separable (> 0.9) while random noise is far less so (< 0.6: the clip to
[0, 255] leaks the silhouette, see below); adversarial training and UEraser each recover >= 30 points
of the class-wise victim, and so does ISS's 2-bit depth reduction.

Class-wise noise is crafted with the reference README's class-wise recipe (scripts/cifar10-classwise:
1 noise step of eps/10, stop at 90 %, the noise searched on a seeded 20 % subset and added to every
sample of its class, from zero, model steps on the whole set), from crafting seed 2 (CRAFT_SEEDS): with
the reference's rules seed 0 never meets the 90 % stop and runs all 30 rounds (~240 s), seeds 1-3 stop
after 21-26 rounds (victim 0.361 / 0.363 / 0.318 / 0.395 for seeds 0-3, benchmarks/results/recipes.md).
Seed 2 stops at round 26 (crafting-model accuracy 0.909; victim 0.3175, re-measured), 4 rounds fewer
than seed 0, and the test now checks that the reference's stopping rule ended the search; its class-wise
random-noise control (one uniform pattern per class) is asserted beside the per-sample one.
Measured with the earlier rules (uniform start, model steps on the subset; one thread, a loaded 2-core
machine): victim 0.301 / 0.323 / 0.298 / 0.358 for crafting seeds 0-3 (clean 0.865; `python3 -m benchmarks.efficacy
availability --attacks error_min_class_subset --seeds 0 1 2 3`, benchmarks/results/efficacy.md);
on seed 0's noise adversarial training recovers 0.812, UEraser (K = 5 for the first 2 of 8 epochs)
0.807, ISS-JPEG-10 only 0.389 (not asserted: a 9-point gain, the paper's strong JPEG recovery is not
seen on these 1-channel images). The earlier setting, every sample searched with 5 steps for 30
rounds under the reference-fidelity rules (batch 512, grad clip 5, eval-mode stop check, never met), took
~5 minutes and reached 0.38 (seed 0); with 5 of 16 batches per round 0.54.
Synthetic noise: 0.52 / 0.39 / 0.47 / 0.36 for seeds 0-3 (0.53 on two threads); error-maximising
poisons: 0.46 / 0.44 / 0.44 / 0.47; both bars hold for every seed.

Sample-wise strength depends on the crafting seed and even on the floating-point path (thread count):
with the setting below, crafting seeds 0 / 1 / 2 / 3 give 0.31 / 0.44 / 0.65 / 0.52 on one thread, and
seeds 0 / 1 give 0.54 / 0.61 on two threads. Which classes escape changes from run to run (a class the
crafting model learns from its real features gets noise that does not hide it). The bar above holds
over all of these. Other sample-wise settings, each a single run (crafting seed 0 unless noted), none
below that spread: 5 noise steps 0.34; the paper's 20 noise steps 0.61 (seed 1: 0.62); 0.25-eps
steps 0.35; one 0.5-eps step (seed 1) 0.69; stop at 99.9 % 0.34; 5 model steps per round 0.38, 20
steps 0.64 (seed 1: 0.64); crafting width 2 / 4 / 16: 0.46 / 0.56 / 0.60; zero start (the paper's
scripts) 0.52, with batch 512 0.49; 10 noise steps on 16 batches per round 0.59 (seed 1: 0.53);
noise steps with train-mode BatchNorm 0.52 (seed 1: 0.59); 16,000 training images 0.55 (seed 1: 0.62).
These were measured before the reference-fidelity rules; with them (seed 0, one thread) sample-wise is 0.67
(stopped at round 19).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.models import build_model
from poison_core.poisons import apply
from poison_core.separability import perturbation_separability
from poison_core.training import accuracy, train_model

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")]
log = logging.getLogger(__name__)

EPSILON = 8
VICTIM = ModelConfig(name="convnet", width=16)
RECIPE = TrainConfig(epochs=8, batch_size=64, lr=0.05)
ATTACKS = {
    "error_min_sample": ("error_min", {"mode": "sample", "width": 8, "steps": 2, "max_rounds": 40}),
    "error_min_class": ("error_min", {"mode": "class", "width": 8, "steps": 1, "stop_accuracy": 0.9, "subset": 0.2,
                                      "max_rounds": 30}),
    "synthetic_noise": ("synthetic_noise", {}),
    "error_max": ("error_max", {"targeted": True, "steps": 10, "step_fraction": 0.25}),
    "random_noise": ("random_noise", {}),
    "random_noise_class": ("random_noise", {"mode": "class"}),
}
CRAFT_SEEDS = {"error_min_class": 2}  # every other attack: crafting seed 0


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DatasetConfig(name="fashion-mnist", n_train=8000, n_test=2000, seed=0))


def fit_victim(train, seed: int):
    model = build_model(VICTIM, train.image_shape, train.num_classes, seed=seed)
    train_model(model, train, RECIPE, device="cpu", seed=seed)
    return model


@pytest.fixture(scope="module")
def clean(splits, one_thread):
    model = fit_victim(splits.train, seed=1)
    return model, accuracy(model, splits.test, device="cpu")


@pytest.fixture(scope="module")
def outcome(splits, clean):
    """Craft each attack once, on first use, and train its victim: key -> (test accuracy, int deltas,
    poisoned training set)."""
    cache: dict[str, tuple[float, np.ndarray, ImageDataset]] = {}
    records: dict[str, dict] = {}

    def run(key: str) -> tuple[float, np.ndarray, ImageDataset]:
        if key not in cache:
            name, params = ATTACKS[key]
            start = time.perf_counter()
            ctx = CraftContext(train=splits.train, threat=ThreatModel(epsilon=EPSILON, budget=1.0, clean_label=True),
                               seed=CRAFT_SEEDS.get(key, 0), surrogates=[clean[0]])
            poison_set = make_attack(name, params).craft(ctx)
            records[key] = dict(poison_set.targets or {})
            crafted = time.perf_counter()
            poisoned = apply(poison_set, splits.train)
            acc = accuracy(fit_victim(poisoned, seed=2), splits.test, device="cpu")
            clean_images = splits.train.images[splits.train.positions(poison_set.ids)]
            cache[key] = (acc, poison_set.images.astype(np.int16) - clean_images.astype(np.int16), poisoned)
            log.info("%s: victim accuracy %.4f (clean %.4f); craft %.0fs, victim %.0fs", key, acc, clean[1],
                     crafted - start, time.perf_counter() - crafted)
        return cache[key]

    run.records = records  # type: ignore[attr-defined]  # each craft's record (rounds, stop criterion met)
    return run


def test_clean_victim_learns(clean):
    assert clean[1] >= 0.85


def test_class_wise_error_minimizing_noise_makes_data_unlearnable(outcome, clean):
    acc = outcome("error_min_class")[0]
    record = outcome.records["error_min_class"]
    assert record["stop_criterion_met"] and record["rounds"] < ATTACKS["error_min_class"][1]["max_rounds"], record
    assert acc <= clean[1] - 0.35, f"class-wise error_min: victim accuracy {acc:.3f} (clean {clean[1]:.3f})"


def test_sample_wise_error_minimizing_noise_falls_far_below_clean(outcome, clean):
    acc = outcome("error_min_sample")[0]
    assert acc <= clean[1] - 0.15, f"sample-wise error_min: victim accuracy {acc:.3f} (clean {clean[1]:.3f})"


@pytest.mark.parametrize("key", ["synthetic_noise", "error_max"])
def test_shortcut_and_adversarial_poisons_fall_far_below_clean(key, outcome, clean):
    acc = outcome(key)[0]
    assert acc <= clean[1] - 0.30, f"{key}: victim accuracy {acc:.3f} (clean {clean[1]:.3f})"


@pytest.mark.parametrize("key", ["random_noise", "random_noise_class"])
def test_random_noise_control_stays_near_clean(key, outcome, clean):
    """Per-sample and class-wise (one fixed pattern per class, the class-wise rows' control) uniform noise
    of the same epsilon: measured 0.855 and 0.852 against clean 0.865 (benchmarks/results/recipes.md)."""
    acc = outcome(key)[0]
    assert abs(acc - clean[1]) <= 0.03, f"{key}: victim accuracy {acc:.3f} (clean {clean[1]:.3f})"


def test_class_wise_and_synthetic_noise_are_linearly_separable_random_noise_is_not(outcome, splits):
    """The stored deltas are measured after the [0, 255] clip, which on Fashion-MNIST's black
    background keeps only positive draws: even random noise then traces the object's silhouette and
    is ~0.48 separable here (it is at chance on unclipped data, see test_attacks_availability)."""
    subset = np.random.default_rng(0).choice(len(splits.train), size=2000, replace=False)
    labels = splits.train.labels[subset]
    for key in ("error_min_class", "synthetic_noise"):
        sep = perturbation_separability(outcome(key)[1][subset], labels)
        assert sep["linear"] > 0.9 and sep["mlp"] > 0.9, f"{key}: {sep}"
    sep = perturbation_separability(outcome("random_noise")[1][subset], labels)
    assert sep["linear"] < 0.6 and sep["mlp"] < 0.6, f"random noise: {sep}"


@pytest.mark.parametrize(("name", "params"), [("adversarial_training", {"epsilon": EPSILON, "steps": 2}),
                                             ("ueraser", {"repeats": 5, "adversarial_fraction": 0.25}),
                                             ("iss_bitdepth", None)])
def test_defense_recovers_the_victim_from_class_wise_error_minimizing_noise(name, params, outcome, clean, splits):
    """Madry-style adversarial training at the noise's own epsilon (2 PGD steps), UEraser (Qin et al.
    2023; K = 5 augmented copies for the first 2 of 8 epochs, the README's 60 of 200) and ISS's 2-bit
    depth reduction (Liu et al. 2023) learn through class-wise error-minimising noise: measured 0.301 ->
    0.812 and 0.807 (clean 0.86); 2-bit depth 0.376 -> 0.844 in the unlearnable-defenses grid."""
    undefended, _, poisoned = outcome("error_min_class")
    victim = VictimConfig(model=VICTIM, train=RECIPE)
    result = make_defense(name, params).fit(DefenseContext(train=poisoned, victim=victim, seed=2))
    predicted = result.classifier.predict_logits(splits.test.images).argmax(axis=1)
    defended = float(np.mean(predicted == splits.test.labels))
    log.info("%s on class-wise error_min: %.4f (undefended %.4f, clean %.4f)", name, defended, undefended, clean[1])
    assert defended >= undefended + 0.30, f"{name} {defended:.3f}, undefended {undefended:.3f}"
