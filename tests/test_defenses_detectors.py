"""STRIP and Neural Cleanse on tiny data: the papers they cite, the info they report, their choices and
defaults, and the building blocks of each paper (STRIP's normalised entropy of superimposed
inputs, a trojaned classifier's low entropy; Neural Cleanse's MAD anomaly index, the reversed trigger's
bounds, the stamp of Eq. 2, the unlearning sample of Sec. VI-C). Registration, fitting, bounded parameters,
seeded repeats and blindness to the ground truth are the shared tests of tests/test_defenses.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from poison_core.config import DefenseConfig, ModelConfig, TrainConfig, VictimConfig, parse_config
from poison_core.defenses import DEFENSES, DefenseContext, make_defense, neural_cleanse
from poison_core.defenses.neural_cleanse import (NeuralCleanseParams, flagged_classes, mad_anomaly_index,
                                                 reverse_triggers, stamp, unlearning_set)
from poison_core.defenses.strip import (normalized_entropy, overlay_indices, robust_normal_threshold,
                                        strip_entropies, strip_keep)
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.training import train_model
from poison_core.members import defense_params
from tests.helpers import tiny_dataset

CPU = torch.device("cpu")
MLP = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=32))
CONV = VictimConfig(model=ModelConfig(name="convnet", width=4), train=TrainConfig(epochs=1, batch_size=32))
TINY = {"strip": {"n_overlays": 4}, "neural_cleanse": {"epochs": 2, "n_samples": 32}}


def _ctx(victim=MLP, n=96):
    return DefenseContext(train=tiny_dataset(n=n, k=4, seed=1), victim=victim, seed=0, is_poison=np.arange(n) % 10 == 0)


def test_both_detectors_cite_their_papers():
    for name, words in (("strip", "Gao"), ("neural_cleanse", "Wang")):
        assert words in DEFENSES.entry(name).paper


@pytest.mark.parametrize("victim", [MLP, CONV], ids=["mlp", "convnet"])
@pytest.mark.parametrize("name", ["strip", "neural_cleanse"])
def test_detectors_report_their_detection_info(name, victim):
    result = make_defense(name, TINY[name]).fit(_ctx(victim))
    expected = {"strip": {"kept_fraction", "filter_precision", "filter_recall", "strip_threshold"},
                "neural_cleanse": {"nc_anomaly_index", "nc_flagged", "nc_flagged_class", "nc_flagged_poison_class"}}
    assert expected[name] <= set(result.info)


def test_unknown_choices_are_refused():
    with pytest.raises(ConfigError, match="blend: Input should be 'add' or 'linear'"):
        defense_params(parse_config(DefenseConfig, {"name": "strip", "params": {"blend": "max"}}))
    with pytest.raises(ConfigError, match="mitigation: Input should be 'unlearning' or 'none'"):
        defense_params(parse_config(DefenseConfig, {"name": "neural_cleanse", "params": {"mitigation": "pruning"}}))


def test_paper_defaults():
    s = make_defense("strip").params
    assert (s.n_overlays, s.blend, s.rule, s.frr) == (100, "add", "frr", 0.01)
    nc = make_defense("neural_cleanse").params
    assert (nc.init_cost, nc.lr, nc.cost_multiplier, nc.patience, nc.attack_success) == (1e-3, 0.1, 2.0, 5, 0.99)
    assert (nc.anomaly_threshold, nc.unlearn_fraction, nc.stamp_fraction, nc.unlearn_epochs) == (2.0, 0.1, 0.2, 1)
    assert nc.mitigation == "unlearning" and not nc.exclude_flagged


# ---------------------------------------------------------------- STRIP building blocks


def _linear_model(weight: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(weight))
    return model.eval()


@pytest.mark.parametrize("blend", ["add", "linear"])
def test_strip_entropy_of_a_superimposed_batch_matches_a_hand_computation(blend):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 2, 2, 1), dtype=np.uint8)
    weight = rng.normal(scale=3.0, size=(3, 4)).astype(np.float32)
    overlays = overlay_indices(5, 3, seed=0)
    got = strip_entropies(_linear_model(weight), images, overlays, CPU, blend=blend, alpha=0.5)
    x = images.reshape(5, 4).astype(np.float64) / 255
    expected = []
    for i in range(5):
        h = []
        for j in overlays[i]:
            mixed = np.clip(x[i] + x[j], 0, 1) if blend == "add" else 0.5 * x[i] + 0.5 * x[j]
            z = weight.astype(np.float64) @ mixed
            y = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            h.append(-(y * np.log2(y)).sum())
        expected.append(np.mean(h))
    assert got == pytest.approx(expected, rel=1e-5)
    uniform = normalized_entropy(torch.zeros(2, 7, 3))
    assert uniform.tolist() == pytest.approx([math.log2(3)] * 2)


def test_overlays_are_other_samples_drawn_reproducibly():
    idx = overlay_indices(6, 50, seed=1)
    assert idx.shape == (6, 50) and idx.min() >= 0 and idx.max() <= 5
    assert not np.any(idx == np.arange(6)[:, None])
    assert np.array_equal(idx, overlay_indices(6, 50, seed=1))
    assert set(idx[0]) == {1, 2, 3, 4, 5}


class _Trojaned(nn.Module):
    """Random linear classifier, except that a bright top-left pixel (the trigger) forces class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = _linear_model(np.random.default_rng(1).normal(scale=1.0, size=(4, 16)).astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        trojan = torch.tensor([30.0, 0.0, 0.0, 0.0])
        return torch.where((x[:, 0, 0, 0] >= 0.99)[:, None], trojan, logits)


def test_a_trojaned_classifier_gives_triggered_inputs_low_entropy_and_strip_drops_them():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 100, size=(40, 4, 4, 1), dtype=np.uint8)
    poison = np.arange(40) % 8 == 0
    images[poison, 0, 0, 0] = 255
    entropy = strip_entropies(_Trojaned(), images, overlay_indices(40, 20, seed=0), CPU, blend="add")
    assert entropy[poison].max() < 1e-6 and entropy[~poison].min() > 0.5
    keep, boundary = strip_keep(entropy, "fraction", 0.01, poison.mean())
    assert np.array_equal(~keep, poison) and boundary == entropy[~poison].min()
    keep, _ = strip_keep(entropy, "frr", 0.01, 0.15)
    assert not keep[poison].any() and keep[~poison].mean() > 0.8


def test_robust_normal_threshold_is_the_frr_quantile_of_median_and_scaled_mad():
    h = np.array([1.0, 1.2, 0.8, 1.1, 0.9, 0.0])
    mad = np.median(np.abs(h - np.median(h)))
    expected = np.median(h) + 1.4826 * mad * -2.3263478740408408  # Phi^-1(0.01)
    assert robust_normal_threshold(h, 0.01) == pytest.approx(expected)


# ---------------------------------------------------------------- Neural Cleanse building blocks


def test_mad_anomaly_index_equals_the_formula_and_flags_only_the_small_outlier():
    norms = np.array([10.0, 11.0, 9.0, 10.5, 9.5, 10.2, 3.0, 12.0, 9.8, 30.0])
    median = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - median))
    assert mad_anomaly_index(norms) == pytest.approx(np.abs(norms - median) / mad)
    assert mad_anomaly_index(norms)[9] > 2  # the large norm is anomalous too, but at the harmless end
    assert flagged_classes(norms).tolist() == [6]
    assert flagged_classes(norms[norms != 3.0]).tolist() == []
    assert mad_anomaly_index(np.ones(4)).tolist() == [0.0] * 4


def test_reversed_triggers_stay_in_bounds_and_repeat_under_a_seed():
    data = tiny_dataset(n=64, k=4, seed=2)
    model = build_model(MLP.model, data.image_shape, 4, seed=0)
    train_model(model, data, TrainConfig(epochs=2, batch_size=32), device="cpu", seed=0)
    model.zero_grad(set_to_none=True)
    params = NeuralCleanseParams(epochs=3, batch_size=16)
    masks, patterns, norms = reverse_triggers(model, data.images[:32], 4, params, seed=5, device=CPU)
    assert masks.shape == (4, 8, 8) and patterns.shape == (4, 8, 8, 1)
    assert masks.min() >= 0 and masks.max() <= 1 and patterns.min() >= 0 and patterns.max() <= 1
    assert norms == pytest.approx(masks.sum(axis=(1, 2)))
    assert all(q.requires_grad for q in model.parameters()) and all(q.grad is None for q in model.parameters())
    again = reverse_triggers(model, data.images[:32], 4, params, seed=5, device=CPU)
    assert np.array_equal(masks, again[0]) and np.array_equal(patterns, again[1])


def test_stamp_is_eq_2_on_uint8_images():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
    pattern = np.full((4, 4, 1), 0.5)
    assert np.array_equal(stamp(images, np.zeros((4, 4)), pattern), images)
    assert np.all(stamp(images, np.ones((4, 4)), pattern) == 128)
    mask = np.zeros((4, 4))
    mask[0, 0] = 0.5
    out = stamp(images, mask, pattern)
    assert out[:, 0, 0, 0].tolist() == np.rint(images[:, 0, 0, 0] / 2 + 63.75).astype(int).tolist()


def test_unlearning_set_stamps_a_fraction_and_keeps_labels():
    data = tiny_dataset(n=100, k=4, seed=3)
    masks = np.zeros((4, 8, 8))
    masks[1, :2, :2] = 1.0
    patterns = np.ones((4, 8, 8, 1))
    params = NeuralCleanseParams(unlearn_fraction=0.5, stamp_fraction=0.2)
    out = unlearning_set(data, masks, patterns, np.array([1]), params, seed=0)
    assert len(out) == 50
    assert np.array_equal(out.labels, data.labels[data.positions(out.ids)])
    stamped = np.all(out.images[:, :2, :2, 0] == 255, axis=(1, 2))
    assert stamped.sum() >= 10
    excluded = unlearning_set(data, masks, patterns, np.array([1]), params.model_copy(update={"exclude_flagged": True}),
                              seed=0)
    assert 1 not in set(excluded.labels.tolist()) and len(excluded) == 37  # floor(0.5 * 75)


def test_a_flagged_class_triggers_unlearning_and_is_reported(monkeypatch):
    def planted(model, images, num_classes, p, seed, device):
        masks = np.full((num_classes, 8, 8), 0.5)
        masks[2] = 0.0
        masks[2, :2, :2] = 1.0
        return masks, np.ones((num_classes, 8, 8, 1)), masks.sum(axis=(1, 2)) + np.arange(num_classes) * 0.1

    monkeypatch.setattr(neural_cleanse, "reverse_triggers", planted)
    ctx = _ctx(CONV)
    result = make_defense("neural_cleanse", TINY["neural_cleanse"]).fit(ctx)
    assert result.info["nc_flagged"] == 1.0 and result.info["nc_flagged_class"] == 2.0
    assert result.info["nc_anomaly_index"] > 2 and len(result.history) == 1
    undefended = make_defense("none").fit(ctx).classifier.predict_logits(ctx.train.images)
    assert not np.array_equal(result.classifier.predict_logits(ctx.train.images), undefended)
    detect_only = make_defense("neural_cleanse", {**TINY["neural_cleanse"], "mitigation": "none"}).fit(ctx)
    assert np.array_equal(detect_only.classifier.predict_logits(ctx.train.images), undefended)
    stale = make_defense("neural_cleanse", {**TINY["neural_cleanse"], "reestimate_bn": False}).fit(ctx)
    assert len(stale.history) == 1  # same unlearning, the BatchNorm statistics left as the fine-tune made them
    assert not np.array_equal(stale.classifier.predict_logits(ctx.train.images),
                              result.classifier.predict_logits(ctx.train.images))
