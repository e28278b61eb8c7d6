"""SIG (Barni et al., ICIP 2019) and WaNet (Nguyen & Tran, ICLR 2021) on tiny data: registration,
epsilon / budget / label invariants and the audit, the trigger formulas, replay through apply_trigger,
determinism, and one ConfigError line per bad parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.attacks.wanet import split_budget
from poison_core.config import AttackConfig, ThreatModel, parse_config
from poison_core.errors import ConfigError
from poison_core.poisons import audit, from_parquet_bytes, to_parquet_bytes
from poison_core.triggers import TRIGGERS, apply_trigger
from poison_core.triggers.sig import training_spec
from poison_core.triggers.warp import apply_noise_warp, warp_field
from poison_core.members import attack_params
from tests.helpers import tiny_dataset

TRAIN = tiny_dataset(n=200, k=5)
FLAT = tiny_dataset(n=200, k=5).replace(images=np.full((200, 8, 8, 1), 128, np.uint8))


def craft(name, params=None, seed=0, train=TRAIN, **threat):
    threat = ThreatModel(**{"epsilon": 8, "budget": 0.5, "clean_label": name == "sig", **threat})
    return make_attack(name, params).craft(CraftContext(train=train, threat=threat, seed=seed))


def clean_of(ps, train=TRAIN):
    return train.images[train.positions(ps.ids)]


def test_both_are_registered_with_paper_summary_policy_and_trigger_kind():
    for name, policy in (("sig", "clean"), ("wanet", "dirty")):
        entry = ATTACKS.entry(name)
        assert entry.paper and entry.summary and entry.obj.label_policy == policy
    assert {"sig", "warp"} <= set(TRIGGERS.names())
    assert make_attack("sig").params.model_dump() == {"target_class": 0, "signal": "sin", "delta": 20.0,
                                                      "frequency": 6.0, "test_delta": None}
    assert make_attack("wanet").params.model_dump() == {"target_class": 0, "k": 4, "s": 0.5, "grid_rescale": 1.0,
                                                        "cross_ratio": 2.0, "grid_seed": None}


def test_sig_touches_only_target_class_images_and_keeps_labels():
    threat = ThreatModel(epsilon=8, budget=0.5, clean_label=True)
    ps = craft("sig", {"target_class": 3})
    assert len(ps) == 40 and np.all(ps.orig_labels == 3) and not ps.flipped.any()  # all 40 of class 3
    assert np.abs(ps.images.astype(int) - clean_of(ps).astype(int)).max() == 8
    audit(from_parquet_bytes(to_parquet_bytes(ps)), TRAIN, threat)
    assert len(craft("sig", {"target_class": 3}, budget=0.1)) == 20
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft("sig", clean_label=False)


@pytest.mark.parametrize(("signal", "expected"), [
    ("sin", lambda j: 20 * np.sin(2 * np.pi * j * 6 / 8)), ("ramp", lambda j: j * 20 / 8)])
def test_sig_signal_on_flat_grey_is_the_paper_formula(signal, expected):
    ps = craft("sig", {"signal": signal}, train=FLAT, epsilon=255)
    want = np.rint(expected(np.arange(1, 9)))  # j = 1..m over the columns, the same on every row
    assert np.array_equal(ps.images.astype(int) - 128, np.broadcast_to(want[None, None, :, None], ps.images.shape))
    clipped = craft("sig", {"signal": signal}, train=FLAT, epsilon=4)
    assert np.array_equal(clipped.images.astype(int) - 128, np.clip(np.broadcast_to(
        want[None, None, :, None], ps.images.shape), -4, 4))


def test_sig_replay_and_separate_test_time_strength():
    ps = craft("sig", epsilon=32)
    assert np.array_equal(apply_trigger(ps.trigger, clean_of(ps)), ps.images)
    strong = craft("sig", {"test_delta": 30}, train=FLAT, epsilon=32)
    assert strong.trigger["delta"] == 30 and strong.trigger["train_delta"] == 20
    assert np.array_equal(apply_trigger(training_spec(strong.trigger), clean_of(strong, FLAT)), strong.images)
    stamped = apply_trigger(strong.trigger, FLAT.images[:1]).astype(int) - 128
    assert np.array_equal(stamped[0, 0, :, 0], np.rint(30 * np.sin(2 * np.pi * np.arange(1, 9) * 6 / 8)))


def test_wanet_budget_labels_epsilon_and_audit():
    threat = ThreatModel(epsilon=8, budget=0.3, clean_label=False)
    ps = craft("wanet", {"target_class": 2}, budget=0.3)
    bd, noise = ps.flipped, ~ps.flipped
    assert (bd.sum(), noise.sum()) == split_budget(60, 2.0) == (20, 40)
    assert ps.provenance["n_backdoor"] == 20 and ps.provenance["n_noise_mode"] == 40
    assert np.all(ps.poison_labels[bd] == 2) and np.all(ps.orig_labels[bd] != 2)
    assert np.array_equal(ps.poison_labels[noise], ps.orig_labels[noise])
    delta = np.abs(ps.images.astype(int) - clean_of(ps).astype(int))
    assert delta.max() == 8 and delta[noise].max() > 0
    audit(from_parquet_bytes(to_parquet_bytes(ps)), TRAIN, threat)
    assert split_budget(10, 2.0) == (3, 6) and split_budget(1, 2.0) == (1, 0) and split_budget(7, 0.0) == (7, 0)
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft("wanet", clean_label=True)


def test_wanet_zero_strength_is_the_identity_and_the_field_follows_the_seed():
    ps = craft("wanet", {"s": 0.0, "grid_seed": 5}, epsilon=255, budget=0.3)
    assert np.array_equal(apply_trigger(ps.trigger, TRAIN.images), TRAIN.images)
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 8, dtype=torch.float64),
                                          torch.linspace(-1, 1, 8, dtype=torch.float64), indexing="xy"), dim=-1)
    assert torch.equal(warp_field(4, 0.0, 5, 8, 8)[0], identity)
    field = warp_field(4, 0.5, 5, 8, 8)
    assert torch.equal(field, warp_field(4, 0.5, 5, 8, 8)) and not torch.equal(field, warp_field(4, 0.5, 6, 8, 8))
    ctrl = np.random.default_rng(5).uniform(-1, 1, size=(1, 2, 4, 4))
    rows, cols = [0, 0, -1, -1], [0, -1, 0, -1]  # bicubic with align_corners keeps the corner control points
    corner_shift = (ctrl / np.abs(ctrl).mean())[0][:, rows, cols].T  # psi: mean |P| = 1
    want = np.clip(identity[rows, cols].numpy() + 0.5 * corner_shift / 8, -1, 1)  # s * M / size, clipped
    assert np.allclose(field[0, rows, cols].numpy(), want)
    assert not np.array_equal(apply_noise_warp(ps.trigger, TRAIN.images[:4], np.random.default_rng(0)),
                              TRAIN.images[:4])


def test_wanet_replay_spec_and_size_check():
    ps = craft("wanet", {"grid_seed": 11}, epsilon=255, budget=0.3)
    spec = ps.trigger
    assert {k: spec[k] for k in ("kind", "k", "s", "grid_rescale", "grid_seed", "size")} == {
        "kind": "warp", "k": 4, "s": 0.5, "grid_rescale": 1.0, "grid_seed": 11, "size": [8, 8]}
    bd = ps.flipped
    replay = apply_trigger(spec, clean_of(ps))
    assert np.array_equal(replay[bd], ps.images[bd])
    assert not np.array_equal(replay[~bd], ps.images[~bd])  # noise-mode rows carry their own noise
    with pytest.raises(ConfigError, match=r"trigger.size: the warp was made for 8x8 images, got 9x9"):
        apply_trigger(spec, np.zeros((1, 9, 9, 1), np.uint8))


@pytest.mark.parametrize(("name", "params", "threat"), [
    ("sig", {"signal": "ramp", "test_delta": 40}, {"epsilon": 32}),
    ("wanet", {"grid_seed": 3, "k": 2}, {"epsilon": 255})])
def test_non_default_params_repeat_under_a_seed(name, params, threat):
    """The default configurations are in the shared determinism test of tests/test_attacks_literature.py."""
    first, again, other = (to_parquet_bytes(craft(name, params, seed=s, **threat)) for s in (0, 0, 1))
    assert first == again and first != other


@pytest.mark.parametrize(("name", "params", "message"), [
    ("sig", {"delta": 0}, r"params of 'sig': delta: .*\(allowed: 0 < delta <= 255; got 0\)"),
    ("sig", {"delta": 300}, r"params of 'sig': delta: .*\(allowed: 0 < delta <= 255; got 300\)"),
    ("sig", {"test_delta": 0}, r"params of 'sig': test_delta: .*\(allowed: 0 < test_delta <= 255; got 0\)"),
    ("sig", {"frequency": 0}, r"params of 'sig': frequency: .*\(allowed: 0 < frequency <= 1024; got 0\)"),
    ("sig", {"signal": "square"}, r"params of 'sig': signal: Input should be 'sin' or 'ramp'"),
    ("sig", {"target_class": -1}, r"params of 'sig': target_class: .*\(allowed: 0 <= target_class; got -1\)"),
    ("wanet", {"k": 1}, r"params of 'wanet': k: .*\(allowed: 2 <= k <= 64; got 1\)"),
    ("wanet", {"s": -0.5}, r"params of 'wanet': s: .*\(allowed: 0 <= s <= 64; got -0.5\)"),
    ("wanet", {"grid_rescale": 1.5}, r"params of 'wanet': grid_rescale: .*\(allowed: 0 < grid_rescale <= 1; got 1.5\)"),
    ("wanet", {"cross_ratio": -1}, r"params of 'wanet': cross_ratio: .*\(allowed: 0 <= cross_ratio <= 16; got -1\)"),
    ("wanet", {"grid_seed": -1}, r"params of 'wanet': grid_seed: .*\(allowed: 0 <= grid_seed <= 4294967295; got -1\)"),
    ("wanet", {"unknown": 1}, r"params of 'wanet': unknown: Extra inputs are not permitted"),
])
def test_bad_parameter_is_one_config_error_line(name, params, message):
    with pytest.raises(ConfigError, match=message) as info:
        attack_params(parse_config(AttackConfig, {"name": name, "params": params}))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "params", "threat", "message"), [
    ("sig", {"target_class": 5}, {}, r"params.target_class: 5 is outside 0..4"),
    ("wanet", {"target_class": 9}, {}, r"params.target_class: 9 is outside 0..4"),
    ("wanet", {"k": 9}, {}, r"params.k: 9 control points exceed the 8x8 image \(allowed: 2..8\)"),
    ("sig", {}, {"epsilon": 0}, r"threat.epsilon: 0 leaves sig nothing to change"),  # refused by check_threat, in preflight
    ("wanet", {}, {"epsilon": 0}, r"threat.epsilon: the warp needs epsilon >= 1"),
])
def test_parameter_that_does_not_fit_the_data_or_threat(name, params, threat, message):
    with pytest.raises(ConfigError, match=message):
        craft(name, params, **threat)
