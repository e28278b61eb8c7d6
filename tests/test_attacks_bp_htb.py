"""Bullseye Polytope and Hidden Trigger Backdoor on tiny data: registration and paper
defaults, threat-model invariants, BP's fixed 1/k coefficients and its loss on a hand-checkable case,
HTB's patch-free poisons, falling feature distance and greedy re-pairing, the seeded random-patch
trigger, source-class ASR in the evaluation, one-line errors for bad params. Determinism in bytes and the
grid cells are the shared tests of tests/test_attacks_literature.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.attacks.bullseye import BullseyeParams, bullseye_coefficients, bullseye_loss, bullseye_polytope
from poison_core.attacks.convex_polytope import polytope_loss
from poison_core.attacks.hidden_trigger import HiddenTriggerParams, greedy_pairs, hidden_trigger_batch
from poison_core.config import AttackConfig, DatasetConfig, ModelConfig, ThreatModel, TrainConfig, parse_config
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.evaluation import evaluate
from poison_core.models import build_model
from poison_core.poisons import PoisonSet
from poison_core.training import to_tensor, train_model
from poison_core.triggers import apply_trigger
from poison_core.triggers.random_patch import random_patch_pattern
from poison_core.members import attack_params

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
FAST = {"bullseye_polytope": {"steps": 4}, "hidden_trigger": {"steps": 4, "patch_size": 3, "lr": 0.05}}
THREATS = {"bullseye_polytope": ThreatModel(epsilon=8, budget=0.05, clean_label=True),
           "hidden_trigger": ThreatModel(epsilon=8, budget=0.05, clean_label=True)}


class Flatten(torch.nn.Module):
    """Features = pixels: losses and gradients by hand."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def surrogate(one_thread):
    model = build_model(ModelConfig(name="convnet", width=8), TRAIN.image_shape, TRAIN.num_classes, seed=0)
    train_model(model, TRAIN, TrainConfig(epochs=4, batch_size=32), device="cpu", seed=0)
    return model.eval()


def craft(name, surrogate, seed=0, params=None):
    ctx = CraftContext(train=TRAIN, test=TEST, threat=THREATS[name], seed=seed, surrogates=[surrogate])
    return make_attack(name, {**FAST[name], **(params or {})}).craft(ctx)


def test_registered_with_paper_summary_docstring_and_reference_defaults():
    for name in FAST:
        entry = ATTACKS.entry(name)
        assert entry.paper and entry.summary and entry.obj.__doc__ and entry.obj.label_policy == "clean"
    bp = BullseyeParams()
    assert (bp.steps, bp.lr, bp.input_std) == (800, 0.04, pytest.approx(0.2009))
    htb = HiddenTriggerParams()
    assert (htb.steps, htb.lr, htb.decay, htb.decay_every, htb.batch_size) == (5000, 0.01, 0.5, 1000, 100)


@pytest.mark.parametrize("name", sorted(FAST))
def test_invariants(name, surrogate):
    ps = craft(name, surrogate)
    pos = TRAIN.positions(ps.ids)
    diff = ps.images.astype(np.int16) - TRAIN.images[pos].astype(np.int16)
    assert 1 <= len(ps) <= 10 and np.abs(diff).max() <= 8 and np.any(diff != 0)
    assert np.array_equal(ps.poison_labels, ps.orig_labels) and np.array_equal(ps.orig_labels, TRAIN.labels[pos])
    if name == "bullseye_polytope":
        assert ps.targets["kind"] == "targeted" and set(ps.orig_labels) == set(ps.targets["adversarial_classes"])
    else:
        assert set(ps.orig_labels) == {0}
        assert ps.trigger["kind"] == "random_patch" and ps.trigger["target_class"] == 0
        assert ps.trigger["source_class"] == 1 and ps.targets == {"kind": "backdoor", "target_class": 0,
                                                                   "source_class": 1}


# --- Bullseye Polytope -----------------------------------------------------------------------------

def test_bullseye_coefficients_are_exactly_one_over_k():
    for k in (1, 3, 5, 7):
        c = bullseye_coefficients(k, torch.zeros(1, dtype=torch.float64))
        assert c.shape == (k,) and torch.all(c == 1.0 / k)


def test_bullseye_loss_equals_the_formula_on_a_hand_case():
    # poisons (1, 0) and (3, 0): mean (2, 0); target (2, 2): residual (0, 2), ||r|| = 2, ||t|| = 2 sqrt 2
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2.0, 2.0], dtype=torch.float64)
    loss = bullseye_loss([feats], [target])
    assert float(loss.detach()) == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, feats)
    # d/df_j ||mean - t|| / ||t|| = (1/k) (mean - t) / (||r|| ||t||): the same for every poison
    expected = 0.5 * torch.tensor([0.0, -2.0], dtype=torch.float64) / (2 * 2 * np.sqrt(2))
    assert torch.allclose(grad, expected.expand(2, 2), atol=1e-12)
    # two networks: the mean of their terms (the second: mean feature 0 against target 1, ratio 1)
    second = bullseye_loss([feats.detach(), torch.tensor([[0.0], [0.0]], dtype=torch.float64)],
                           [target, torch.tensor([1.0], dtype=torch.float64)])
    assert float(second) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2, abs=1e-12)


def test_bullseye_pulls_the_mean_where_convex_polytope_is_already_done():
    # b1 == t: Convex Polytope's objective is 0 at c = (1, 0), so it has nothing to do; Bullseye's c = 1/k
    # leaves the residual t - (b1 + b2) / 2 = 0.15 per pixel and moves both poisons by the same first Adam
    # step lr * std (every pixel's gradient is negative) towards centring their mean on t.
    target = torch.full((1, 1, 2, 2), 0.5)
    bases = torch.cat([target, torch.full((1, 1, 2, 2), 0.2)])
    feats, t = Flatten().features(bases), Flatten().features(target)[0]
    assert float(polytope_loss([feats], [t], [torch.tensor([1.0, 0.0])])) == 0.0
    bp, losses = bullseye_polytope([Flatten()], bases, target, epsilon=255, params=BullseyeParams(steps=1))
    assert torch.allclose(bp - bases, torch.full_like(bases, 0.04 * 0.2009), atol=1e-6)
    assert losses[0] == pytest.approx(0.3 / 1.0, abs=1e-6)  # ||r|| = 2 * 0.15, ||t|| = 2 * 0.5


def test_bullseye_loss_falls_and_stays_in_the_ball(surrogate):
    bases = to_tensor(TRAIN.images[TRAIN.labels == 3][:4], "cpu")
    target = to_tensor(TEST.images[TEST.labels == 5][:1], "cpu")
    poisons, losses = bullseye_polytope([surrogate], bases, target, epsilon=8, params=BullseyeParams(steps=30))
    assert losses[-1] < 0.9 * losses[0] and float((poisons - bases).abs().max()) <= 8 / 255 + 1e-6


# --- Hidden Trigger Backdoor -----------------------------------------------------------------------

def test_greedy_pairs_takes_the_closest_pair_first_without_replacement():
    assert greedy_pairs(torch.tensor([[1.0, 5.0], [0.0, 2.0]])).tolist() == [1, 0]
    # source 0 is closest to both poisons; once paired with poison 0 it leaves the pool
    assert greedy_pairs(torch.tensor([[0.0, 1.0], [5.0, 6.0]])).tolist() == [0, 1]


def test_hidden_trigger_feature_distance_falls_and_poisons_carry_no_patch(surrogate):
    attack = make_attack("hidden_trigger", {"steps": 40, "lr": 0.05, "patch_size": 3})
    clean = TRAIN.images[TRAIN.labels == 0][:6]
    patched = attack.patched(TRAIN.images[TRAIN.labels == 1][:6], np.random.default_rng(0))
    assert np.abs(patched.astype(int) - TRAIN.images[TRAIN.labels == 1][:6].astype(int)).max() > 8
    targets = to_tensor(clean, "cpu")
    poisons, losses = hidden_trigger_batch([surrogate], targets, to_tensor(patched, "cpu"), epsilon=8,
                                           params=attack.params)
    assert len(losses) == 40 and losses[-1] < 0.8 * losses[0]
    assert float((poisons - targets).abs().max()) <= 8 / 255 + 1e-6  # every pixel, so no patch anywhere
    ps = craft("hidden_trigger", surrogate)
    diff = np.abs(ps.images.astype(int) - TRAIN.images[TRAIN.positions(ps.ids)].astype(int))
    assert diff.max() <= 8


def test_hidden_trigger_stop_loss_ends_early(surrogate):
    targets = to_tensor(TRAIN.images[TRAIN.labels == 0][:3], "cpu")
    _, losses = hidden_trigger_batch([surrogate], targets, targets.clone(), epsilon=8,
                                     params=HiddenTriggerParams(steps=50, stop_loss=1e6))
    assert len(losses) == 1


def test_random_patch_trigger_is_deterministic_and_seeded():
    images = np.zeros((20, 8, 8, 1), np.uint8)
    spec = {"kind": "random_patch", "size": 3, "pattern": "white", "location_seed": 5, "target_class": 0}
    once, twice = apply_trigger(spec, images), apply_trigger(dict(spec), images)
    assert once.tobytes() == twice.tobytes()
    assert once.tobytes() != apply_trigger({**spec, "location_seed": 6}, images).tobytes()
    assert all(int((img == 255).sum()) == 9 for img in once)  # one whole 3x3 patch per image
    corners = {tuple(np.argwhere(img[..., 0] == 255).min(0)) for img in once}
    assert len(corners) > 1  # the location varies from image to image
    faint = apply_trigger({**spec, "epsilon": 10}, images)
    assert faint.max() == 10
    noise = random_patch_pattern(3, 1, "noise", 0)
    assert np.array_equal(noise, random_patch_pattern(3, 1, "noise", 0)) and noise.std() > 0


class ThresholdClassifier:
    """Predicts class round(median / 40), except that a bright pixel (>= 250) sends class 1 to class 0."""

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        pred = np.rint(np.median(flat, axis=1) / 40).astype(int)
        pred[(pred == 1) & (flat.max(axis=1) >= 250)] = 0
        return np.eye(4)[pred]


def test_evaluation_measures_asr_on_the_trigger_source_class_only():
    labels = np.arange(40) % 4
    images = np.repeat((labels * 40).astype(np.uint8)[:, None, None, None], 64, axis=1).reshape(40, 8, 8, 1)
    test = ImageDataset(images, labels, ("a", "b", "c", "d"), ids=np.arange(40), name="const")
    spec = {"kind": "random_patch", "size": 2, "pattern": "white", "location_seed": 1, "target_class": 0}
    threat = ThreatModel(epsilon=8, budget=0.1, clean_label=True)

    def poison_set(trigger):
        return PoisonSet(ids=np.zeros(0, np.int64), images=np.zeros((0, 8, 8, 1), np.uint8),
                         orig_labels=np.zeros(0, np.int64), poison_labels=np.zeros(0, np.int64), threat=threat,
                         n_train=40, trigger=trigger)

    assert evaluate(ThresholdClassifier(), test, poison_set({**spec, "source_class": 1}))["asr"] == 1.0
    assert evaluate(ThresholdClassifier(), test, poison_set(spec))["asr"] == pytest.approx(1 / 3)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,bad,field", [
    ("bullseye_polytope", {"steps": 0}, "steps"), ("bullseye_polytope", {"lr": 0}, "lr"),
    ("bullseye_polytope", {"input_std": 2}, "input_std"), ("hidden_trigger", {"lr": -1}, "lr"),
    ("hidden_trigger", {"decay": 1.5}, "decay"), ("hidden_trigger", {"patch_size": 0}, "patch_size"),
    ("hidden_trigger", {"batch_size": 0}, "batch_size"),
])
def test_bad_params_are_one_line_config_errors(name, bad, field):
    with pytest.raises(ConfigError, match=rf"params of '{name}': {field}: .*\(allowed: ") as info:
        attack_params(parse_config(AttackConfig, {"name": name, "params": bad}))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("params,message", [
    ({"target_class": 12}, r"^params\.target_class: class 12 is outside 0\.\.9$"),
    ({"source_class": 0}, r"^params\.source_class: 0 is the target class"),
    ({"patch_size": 9}, r"^params\.patch_size: 9 does not fit 8x8 images \(allowed: 1\.\.8\)$"),
])
def test_hidden_trigger_refuses_params_that_do_not_fit_the_dataset(params, message, surrogate):
    with pytest.raises(ConfigError, match=message):
        craft("hidden_trigger", surrogate, params=params)
