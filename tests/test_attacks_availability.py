"""Invariants of the availability / unlearnable-example attacks and the backdoor variants on tiny data:
epsilon on the uint8 grid, budget (= coverage) count, labels, determinism, one error per bad parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.attacks.clean_label_backdoor import trigger_region
from poison_core.attacks.tue import csd, interpolate_to_classes
from poison_core.config import AttackConfig, ModelConfig, ThreatModel, TrainConfig
from poison_core.coverage import DEFAULT_COVERAGES, coverage, coverage_curves, coverage_threats
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.poisons import to_parquet_bytes
from poison_core.separability import perturbation_separability
from poison_core.training import train_model
from poison_core.triggers import TRIGGERS, apply_trigger
from tests.helpers import tiny_dataset

TRAIN = tiny_dataset(n=200, k=5)
EPS = 8

TINY = {
    "error_min": {"width": 4, "max_rounds": 2, "steps": 2, "train_steps": 2, "batch_size": 64},
    "error_max": {"steps": 3},
    "synthetic_noise": {"patch": 2},
    "unlearnable_clusters": {"epochs": 1, "generator_width": 4, "encoder": {"width": 4, "epochs": 1, "batch_size": 64}},
    "tue": {"width": 4, "epochs": 1, "train_steps": 2, "steps": 2, "batch_size": 64, "ssl_weight": 1.0},
    "random_noise": {},
    "random_labels": {},
    "blend": {"target_class": 2},
    "clean_label_backdoor": {"target_class": 1, "steps": 3},
}
CLEAN_LABEL = ["error_min", "error_max", "synthetic_noise", "unlearnable_clusters", "tue", "random_noise",
               "clean_label_backdoor"]
PERTURBING = [name for name in TINY if name != "random_labels"]


@pytest.fixture(scope="module")
def surrogate(one_thread) -> torch.nn.Module:
    model = build_model(ModelConfig(name="convnet", width=4), TRAIN.image_shape, TRAIN.num_classes, seed=0)
    train_model(model, TRAIN, TrainConfig(epochs=2, batch_size=64), device="cpu", seed=0)
    return model


def craft(name, surrogate, params=None, seed=0, train=TRAIN, **threat):
    clean = name in CLEAN_LABEL
    threat = ThreatModel(**{"epsilon": EPS, "budget": 0.5, "clean_label": clean, **threat})
    ctx = CraftContext(train=train, threat=threat, seed=seed, surrogates=[surrogate])
    return make_attack(name, {**TINY[name], **(params or {})}).craft(ctx)


def clean_of(ps, train=TRAIN):
    return train.images[train.positions(ps.ids)]


def test_every_member_is_registered_with_paper_and_summary():
    assert set(TINY) <= set(ATTACKS.names())
    for name in TINY:
        entry = ATTACKS.entry(name)
        assert entry.paper and entry.summary and entry.obj.__doc__
    assert "blend" in TRIGGERS


@pytest.mark.parametrize("name", PERTURBING)
def test_epsilon_budget_and_labels(name, surrogate):
    ps = craft(name, surrogate)
    delta = ps.images.astype(np.int16) - clean_of(ps).astype(np.int16)
    assert 0 < np.abs(delta).max() <= EPS
    if name == "clean_label_backdoor":
        assert set(ps.orig_labels) == {1} and len(ps) == 40  # only the 40 target-class samples
    else:
        assert len(ps) == 100 == int(0.5 * len(TRAIN))
    if name in CLEAN_LABEL:
        assert np.array_equal(ps.poison_labels, ps.orig_labels)
    else:
        assert set(ps.poison_labels) == {2} and 2 not in set(ps.orig_labels)


@pytest.mark.parametrize("name", ["error_min", "synthetic_noise", "random_noise", "tue"])
def test_full_coverage_protects_every_sample(name, surrogate):
    ps = craft(name, surrogate, budget=1.0)
    assert len(ps) == len(TRAIN) and coverage(ps) == 1.0
    assert np.array_equal(np.sort(ps.ids), np.sort(TRAIN.ids))


@pytest.mark.parametrize("name", list(TINY))
def test_same_seed_same_bytes_other_seed_other_poisons(name, surrogate):
    a, b, c = craft(name, surrogate, seed=3), craft(name, surrogate, seed=3), craft(name, surrogate, seed=4)
    assert to_parquet_bytes(a) == to_parquet_bytes(b)
    assert not (np.array_equal(a.images, c.images) and np.array_equal(a.poison_labels, c.poison_labels))


@pytest.mark.parametrize("subset", [1.0, 0.3])
def test_error_min_class_mode_shares_one_noise_per_class(surrogate, subset):
    """Also when the noise is searched on a subset (the reference's --use_subset): every protected
    sample, searched or not, carries its class's noise."""
    ps = craft("error_min", surrogate, {"mode": "class", "subset": subset}, budget=1.0)
    assert len(ps) == len(TRAIN) and ps.targets.get("searched", len(TRAIN)) == round(subset * len(TRAIN))
    delta = ps.images.astype(np.int16) - clean_of(ps).astype(np.int16)
    clean = clean_of(ps)
    inside = (clean >= EPS) & (clean <= 255 - EPS)  # pixels the [0, 255] clip cannot touch
    for k in range(TRAIN.num_classes):
        rows = ps.orig_labels == k
        kept = np.where(inside[rows], delta[rows], np.nan)
        assert np.nanmax(kept, axis=0).tolist() == np.nanmin(kept, axis=0).tolist()


def test_error_min_stops_at_stop_accuracy(surrogate):
    ps = craft("error_min", surrogate, {"stop_accuracy": 0.01, "max_rounds": 5})
    assert ps.targets["rounds"] == 1 and ps.targets["crafting_train_acc"] >= 0.01


@pytest.mark.parametrize("random_start", [True, False])
def test_error_min_starts_uniform_or_at_zero(surrogate, random_start):
    """One round of one 0.1-eps step: from zero the noise can move at most 0.8/255 (one grey level after
    rounding); from the uniform start it keeps the start's spread over the whole eps-ball."""
    params = {"random_start": random_start, "max_rounds": 1, "steps": 1, "step_fraction": 0.1}
    ps = craft("error_min", surrogate, params, budget=1.0)
    spread = np.abs(ps.images.astype(np.int16) - clean_of(ps).astype(np.int16)).max()
    assert spread == EPS if random_start else spread <= 1


def test_random_labels_redraw_over_all_classes(surrogate):
    ps = craft("random_labels", surrogate, budget=1.0, epsilon=0)
    assert np.array_equal(ps.images, clean_of(ps))
    assert set(ps.poison_labels) == set(range(TRAIN.num_classes))
    assert 0 < np.mean(ps.poison_labels == ps.orig_labels) < 0.5  # some kept (1/K expected), most changed


def test_random_noise_is_uniform_on_the_grid(surrogate):
    train = tiny_dataset(n=200, k=5).replace(images=np.full((200, 8, 8, 1), 128, np.uint8))
    ps = craft("random_noise", surrogate, train=train, budget=1.0)
    delta = ps.images.astype(np.int16) - 128
    assert set(np.unique(delta)) == set(range(-EPS, EPS + 1))


def test_blend_trigger_formula_and_replay(surrogate):
    ps = craft("blend", surrogate, {"alpha": 0.2, "pattern_seed": 7}, epsilon=255)
    spec = ps.trigger
    assert spec["kind"] == "blend" and spec["pattern_seed"] == 7 and spec["target_class"] == 2
    clean = clean_of(ps)
    key = np.random.default_rng(7).integers(0, 256, size=clean.shape[1:], dtype=np.uint8)
    expected = np.rint(0.8 * clean.astype(float) + 0.2 * key[None].astype(float)).astype(np.uint8)
    assert np.array_equal(ps.images, expected)
    assert np.array_equal(apply_trigger(spec, clean), ps.images)


def test_clean_label_backdoor_splits_epsilon_between_pgd_and_patch(surrogate):
    ps = craft("clean_label_backdoor", surrogate, {"patch_size": 3}, epsilon=16)
    clean = clean_of(ps)
    region = trigger_region(ps.trigger, TRAIN.image_shape)
    assert region.sum() == 9
    assert np.array_equal(ps.images[:, region], apply_trigger(ps.trigger, clean)[:, region])
    outside = np.abs(ps.images.astype(int) - clean.astype(int))[:, ~region]
    assert 0 < outside.max() <= 16
    with pytest.raises(ConfigError, match=r"params.adv_epsilon: 20 exceeds threat.epsilon 16"):
        craft("clean_label_backdoor", surrogate, {"adv_epsilon": 20}, epsilon=16)


def test_separability_of_class_wise_and_synthetic_vs_random_noise(surrogate):
    train = tiny_dataset(n=600, k=5)
    for name, params in (("synthetic_noise", {}), ("error_min", {"mode": "class"})):
        ps = craft(name, surrogate, params, train=train, budget=1.0)
        sep = perturbation_separability(ps.images.astype(np.int16) - train.images, ps.orig_labels)
        assert sep["linear"] > 0.9 and sep["mlp"] > 0.9, (name, sep)
    rand = craft("random_noise", surrogate, train=train, budget=1.0)
    sep_rand = perturbation_separability(rand.images.astype(np.int16) - train.images, rand.orig_labels)
    assert sep_rand["linear"] < 0.35 and sep_rand["mlp"] < 0.35 and sep_rand["chance"] == 0.2


def test_csd_and_interpolation_to_more_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    separable = rng.normal(size=(3, 4, 4, 1))[labels] * 5 + rng.normal(size=(60, 4, 4, 1)) * 0.1
    mixed = rng.normal(size=(60, 4, 4, 1))
    as_t = torch.as_tensor
    assert float(csd(as_t(separable), as_t(labels))) < 0.1 < float(csd(as_t(mixed), as_t(labels)))
    target = np.repeat(np.arange(5), 10)
    out = interpolate_to_classes(separable.astype(np.float32), labels, target, rng)
    assert out.shape == (50, 4, 4, 1) and out.dtype == np.float32
    assert float(csd(as_t(out), as_t(target))) < 0.5


def test_coverage_threats_make_the_curve():
    threats = coverage_threats(ThreatModel(epsilon=8, budget=0.1, clean_label=True))
    assert [t.budget for t in threats] == list(DEFAULT_COVERAGES) and all(t.epsilon == 8 for t in threats)
    with pytest.raises(ConfigError, match=r"coverage: 1.5 is outside \(0, 1\]"):
        coverage_threats(ThreatModel(), [1.5])


def test_coverage_curves_group_configs_that_differ_only_in_budget():
    default = ThreatModel(epsilon=8, budget=1.0, clean_label=True)
    attacks = [AttackConfig(name="error_min", id="em40", threat=default.model_copy(update={"budget": 0.4})),
               AttackConfig(name="error_min"),
               AttackConfig(name="error_min", id="em_class", params={"mode": "class"}),
               AttackConfig(name="random_noise")]
    summary = [{"attack": a, "defense": d, "clean_acc": acc, "baseline_clean_acc": 0.9}
               for a, d, acc in [("em40", "none", 0.6), ("error_min", "none", 0.2), ("em40", "mixup", 0.7),
                                 ("error_min", "mixup", 0.3), ("em_class", "none", 0.1), ("random_noise", "none", 0.9)]]
    curves = coverage_curves(attacks, default, summary)
    assert curves == {"error_min": ([0.0, 0.4, 1.0], {"mixup": [0.9, 0.7, 0.3], "none": [0.9, 0.6, 0.2]})}


@pytest.mark.parametrize("name", ["error_min", "error_max", "synthetic_noise", "unlearnable_clusters", "tue",
                                  "random_noise"])
def test_clean_label_attacks_refuse_dirty_threat(name, surrogate):
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft(name, surrogate, clean_label=False)


@pytest.mark.parametrize("name", ["error_max", "clean_label_backdoor"])
def test_surrogate_attacks_need_a_surrogate(name):
    ctx = CraftContext(train=TRAIN, threat=ThreatModel(epsilon=8, budget=0.5, clean_label=True), seed=0)
    with pytest.raises(ConfigError, match="needs at least one surrogate"):
        make_attack(name, TINY[name]).craft(ctx)


BAD_PARAMS = [
    ("error_min", {"mode": "pixel"}), ("error_min", {"model": "nope"}), ("error_min", {"width": 0}),
    ("error_min", {"stop_accuracy": 0}), ("error_min", {"stop_accuracy": 1.5}), ("error_min", {"train_steps": 0}),
    ("error_min", {"steps": 0}), ("error_min", {"step_fraction": 0}), ("error_min", {"step_fraction": 2}),
    ("error_min", {"max_rounds": 0}), ("error_min", {"batch_size": 1}), ("error_min", {"lr": 0}),
    ("error_min", {"noise_batches": 0}), ("error_min", {"unknown": 1}), ("error_min", {"subset": 1.5}),
    ("error_min", {"subset": 0.5}),
    ("error_max", {"steps": 0}), ("error_max", {"step_fraction": 0}), ("error_max", {"batch_size": 0}),
    ("error_max", {"targeted": "maybe"}),
    ("synthetic_noise", {"patch": 0}), ("synthetic_noise", {"class_sep": 0}), ("synthetic_noise", {"jitter": -1}),
    ("unlearnable_clusters", {"n_clusters": 1}), ("unlearnable_clusters", {"target_offset": 0}),
    ("unlearnable_clusters", {"epochs": 0}), ("unlearnable_clusters", {"lr": 0}),
    ("unlearnable_clusters", {"generator_width": 0}),
    ("tue", {"model": "nope"}), ("tue", {"temperature": 0}), ("tue", {"csd_weight": -1}), ("tue", {"epochs": 0}),
    ("tue", {"steps": 0}), ("tue", {"batch_size": 2}), ("tue", {"projection_dim": 1}),
    ("random_noise", {"epsilon": 8}), ("random_labels", {"k": 3}),
    ("blend", {"alpha": 0}), ("blend", {"alpha": 1.5}), ("blend", {"target_class": -1}),
    ("blend", {"pattern_seed": -1}),
    ("clean_label_backdoor", {"adv_epsilon": 256}), ("clean_label_backdoor", {"patch_epsilon": 0}),
    ("clean_label_backdoor", {"steps": 0}), ("clean_label_backdoor", {"patch_size": 0}),
    ("clean_label_backdoor", {"position": "middle"}),
]


@pytest.mark.parametrize(("name", "params"), BAD_PARAMS, ids=[f"{n}-{next(iter(p))}" for n, p in BAD_PARAMS])
def test_bad_parameter_is_refused(name, params):
    with pytest.raises(ValidationError, match=next(iter(params))):
        make_attack(name, params)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("synthetic_noise", {"patch": 8}, r"params.patch: 5 classes need more than 1 noise dimensions"),
    ("unlearnable_clusters", {"n_clusters": 150}, r"params.n_clusters: 150 clusters need at least 150"),
    ("blend", {"target_class": 9}, r"params.target_class: 9 is outside 0..4"),
    ("clean_label_backdoor", {"target_class": 5}, r"params.target_class: 5 is outside 0..4"),
])
def test_parameter_that_does_not_fit_the_data(name, params, message, surrogate):
    with pytest.raises(ConfigError, match=message):
        craft(name, surrogate, params)


def test_attacks_leave_global_rng_and_surrogate_alone(surrogate):
    state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    weights = {k: v.clone() for k, v in surrogate.state_dict().items()}
    flags = [p.requires_grad for p in surrogate.parameters()]
    for name in ("error_min", "error_max", "unlearnable_clusters", "clean_label_backdoor"):
        craft(name, surrogate, seed=1)
    assert np.array_equal(np.random.get_state()[1], state) and torch.equal(torch.get_rng_state(), torch_state)
    assert all(torch.equal(weights[k], v) for k, v in surrogate.state_dict().items())
    assert [p.requires_grad for p in surrogate.parameters()] == flags
