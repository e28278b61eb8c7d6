"""Invariants of the targeted clean-label attacks on tiny data with tiny models.

For each of Poison Frogs, Convex Polytope, Witches' Brew and MetaPoison: L-inf <= epsilon on the
uint8 grid, count <= budget, labels untouched, poisons from the base (= adversarial) class, the
targets dict in the evaluation's format, determinism in bytes; Witches' Brew runs its restarts
through ctx.map and keeps the lowest-loss one; MetaPoison builds n_models workers with ctx.actors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poison_core.attacks import CraftContext, LocalActorGroup, local_map, make_attack
from poison_core.attacks import targets as targeting
from poison_core.attacks._augment import random_shift_flip
from poison_core.perturbation import project, quantize
from poison_core.attacks.convex_polytope import project_simplex, simplex_least_squares
from poison_core.attacks.metapoison import MetaPoisonWorker
from poison_core.attacks.poison_frogs import PoisonFrogsParams, feature_collision, feature_loss
from poison_core.attacks.witches_brew import ensemble_alignment, parameter_gradient, run_restart
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import load_dataset
from poison_core.defenses.base import ModelClassifier
from poison_core.errors import ConfigError
from poison_core.evaluation import evaluate
from poison_core.models import build_model
from poison_core.poisons import to_parquet_bytes
from poison_core.training import to_tensor, train_model
from poison_core.transfer import extract_features, finetune

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
T0, T1 = (int(i) for i in TEST.ids[:2])
OTHER = int(next(c for c in range(10) if c not in TEST.labels[:2]))
FAST = {
    "poison_frogs": {"steps": 4, "lr": 0.05},
    "convex_polytope": {"steps": 3, "coef_iters": 20},
    "witches_brew": {"steps": 3, "restarts": 2},
    "metapoison": {"steps": 2, "n_models": 2, "stagger_epochs": 2, "batch_size": 16, "epoch_batches": 2},
}
NAMES = sorted(FAST)


@pytest.fixture(scope="module")
def surrogates(one_thread):
    models = []
    for seed in range(2):
        model = build_model(ModelConfig(name="convnet", width=8), TRAIN.image_shape, TRAIN.num_classes, seed=seed)
        train_model(model, TRAIN, TrainConfig(epochs=6, batch_size=32), device="cpu", seed=seed)
        models.append(model)
    return models


def threat(eps=8, budget=0.05, **targets) -> ThreatModel:
    return ThreatModel(epsilon=eps, budget=budget, clean_label=True, targets=TargetSelection(**targets))


def craft(name, surrogates, seed=0, params=None, th=None, **ctx_extra):
    ctx = CraftContext(train=TRAIN, test=TEST, threat=th or threat(), seed=seed, surrogates=surrogates, **ctx_extra)
    return make_attack(name, {**FAST[name], **(params or {})}).craft(ctx)


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name, surrogates):
    ps = craft(name, surrogates)
    pos = TRAIN.positions(ps.ids)
    diff = ps.images.astype(np.int16) - TRAIN.images[pos].astype(np.int16)
    assert 1 <= len(ps) <= 10  # floor(0.05 * 200)
    assert np.abs(diff).max() <= 8 and np.any(diff != 0)
    assert np.array_equal(ps.poison_labels, ps.orig_labels) and np.array_equal(ps.orig_labels, TRAIN.labels[pos])
    goal = ps.targets
    assert goal["kind"] == "targeted" and len(goal["target_ids"]) == len(goal["adversarial_classes"]) == 1
    assert set(ps.orig_labels) == {goal["adversarial_classes"][0]} == {goal["base_classes"][0]}
    target_pos = TEST.positions(np.asarray(goal["target_ids"]))
    assert TEST.labels[target_pos][0] != goal["adversarial_classes"][0]
    metrics = evaluate(ModelClassifier(surrogates[0], torch.device("cpu")), TEST, ps)
    assert {"target_success", "adv_prob"} <= set(metrics)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_other_bytes(name, surrogates):
    first, again, other = (to_parquet_bytes(craft(name, surrogates, seed=s)) for s in (3, 3, 4))
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", NAMES)
def test_refuses_dirty_label_threat_and_missing_surrogates(name, surrogates):
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft(name, surrogates, th=ThreatModel(epsilon=8, budget=0.05, clean_label=False))
    with pytest.raises(ConfigError, match="needs at least one surrogate"):
        craft(name, [])


@pytest.mark.parametrize("name,bad", [
    ("poison_frogs", {"steps": 0}), ("poison_frogs", {"watermark": 1.5}), ("poison_frogs", {"lr": 0}),
    ("convex_polytope", {"lr": -1}), ("convex_polytope", {"coef_iters": 0}),
    ("witches_brew", {"restarts": 0}), ("witches_brew", {"tau": 0}), ("witches_brew", {"nope": 1}),
    ("metapoison", {"n_models": 0}), ("metapoison", {"unroll_batch": "all"}), ("metapoison", {"unroll_steps": 0}),
    ("metapoison", {"stagger_epochs": 0}),
])
def test_bad_params_are_refused(name, bad):
    with pytest.raises(ValueError):
        make_attack(name, bad)


def test_fixed_targets_and_budget_split(surrogates):
    ps = craft("poison_frogs", surrogates, th=threat(budget=0.1, mode="fixed", target_ids=(T0, T1), n_targets=2,
                                                      adversarial_class=OTHER))
    assert ps.targets["target_ids"] == [T0, T1] and ps.targets["adversarial_classes"] == [OTHER, OTHER]
    assert len(ps) == 20 and len(np.unique(ps.ids)) == 20 and set(ps.orig_labels) == {OTHER}


def test_random_targets_are_correctly_classified_by_the_surrogates(surrogates):
    ctx = CraftContext(train=TRAIN, test=TEST, threat=threat(n_targets=3), seed=0, surrogates=surrogates)
    keys = targeting.choose_keys(ctx, np.random.default_rng(0))
    x = to_tensor(TEST.images[[k.target_position for k in keys]], "cpu")
    with torch.no_grad():
        pred = sum(torch.softmax(m(x), 1) for m in surrogates).argmax(1).numpy()
    assert np.array_equal(pred, [k.true_class for k in keys])
    assert all(k.adversarial_class != k.true_class and k.base_class == k.adversarial_class for k in keys)


@pytest.mark.parametrize("targets,message", [
    ({"mode": "fixed", "target_ids": (T0,), "adversarial_class": int(TEST.labels[0])},
     f"is the true class of target {T0}"),
    ({"adversarial_class": 1, "base_class": 2}, "threat.targets.base_class"),
    ({"adversarial_class": 12}, r"threat.targets.adversarial_class: 12 is outside 0..9"),
    ({"n_targets": 11}, "threat.targets.n_targets"),
])
def test_bad_target_selection(targets, message, surrogates):
    with pytest.raises(ConfigError, match=message):
        craft("poison_frogs", surrogates, th=threat(**targets))


def test_witches_brew_runs_every_restart_through_map_and_keeps_the_lowest_loss(surrogates):
    calls: list[tuple] = []
    results: list[tuple[float, np.ndarray]] = []

    def recording_map(fn, jobs):
        assert fn is run_restart
        calls.extend(jobs)
        results.extend(local_map(fn, jobs))
        return list(results)

    ps = craft("witches_brew", surrogates, params={"restarts": 3}, map=recording_map)
    assert len(calls) == 3 and len({job[7] for job in calls}) == 3  # three distinct restart seeds
    best = results[int(np.argmin([loss for loss, _ in results]))][1]
    assert np.array_equal(ps.images, best)
    def reversed_map(fn, jobs):
        return local_map(fn, jobs[::-1])[::-1]

    again = craft("witches_brew", surrogates, params={"restarts": 3}, map=reversed_map)
    assert to_parquet_bytes(again) == to_parquet_bytes(ps)


def test_witches_brew_lowers_the_alignment_loss(surrogates):
    x0 = TRAIN.images[TRAIN.labels == 0][:8]
    y = np.zeros(8, dtype=np.int64)
    target = TEST.images[TEST.labels == 1][:1]
    params = make_attack("witches_brew", {"steps": 20, "augment": False}).params
    loss, poisoned = run_restart(surrogates, x0, y, target, 0, params, 16, seed=0)
    t_grads = [[g.detach() for g in parameter_gradient(m, to_tensor(target, "cpu"), torch.tensor([0]),
                                                       create_graph=False)] for m in surrogates]
    x = to_tensor(x0, "cpu").requires_grad_(True)
    clean_loss = float(ensemble_alignment(surrogates, t_grads, x, torch.from_numpy(y)).detach())
    assert loss < 0.95 * clean_loss
    assert np.abs(poisoned.astype(int) - x0.astype(int)).max() <= 16


def test_metapoison_builds_n_models_staggered_workers_through_actors(surrogates):
    made: list[tuple] = []
    method_calls: list[str] = []

    class RecordingGroup(LocalActorGroup):
        def call(self, method, args_per_worker):
            method_calls.append(method)
            return super().call(method, args_per_worker)

    def factory(cls, init_args):
        assert cls is MetaPoisonWorker
        made.extend(init_args)
        return RecordingGroup(cls, init_args)

    craft("metapoison", surrogates, params={"n_models": 3, "stagger_epochs": 3, "steps": 2}, actors=factory)
    assert len(made) == 3 and [args[7] for args in made] == [0, 1, 2]  # start epochs 0..T-1
    assert method_calls == ["craft_step"] * 2


def test_metapoison_worker_restarts_after_stagger_epochs(surrogates):
    pos = np.flatnonzero(TRAIN.labels == 0)[:4]
    params = make_attack("metapoison", {**FAST["metapoison"], "stagger_epochs": 2}).params
    worker = MetaPoisonWorker(surrogates[0], TRAIN.images, TRAIN.labels, pos, TEST.images[:1], 0, params, 1, seed=0)
    assert worker.epoch == 1
    assert worker.advance(np.zeros((4, 1, 8, 8), dtype=np.float32)) == 0 and worker.generation == 1


@pytest.mark.parametrize("unroll_batch", ["epoch", "mixed", "poisons"])
def test_metapoison_unroll_batch_decides_which_poisons_get_gradient(surrogates, unroll_batch):
    """'epoch' (default): the sweep sums the meta-gradient of every batch holding poisons, so every poison
    gets one; 'mixed': each unrolled batch holds the poisons' share of it (here 1 of 8), so one step reaches
    only those; 'poisons': every step unrolls on the whole poison set, so every poison gets a gradient."""
    pos = np.flatnonzero(TRAIN.labels == 0)[:8]
    params = make_attack("metapoison", {**FAST["metapoison"], "unroll_batch": unroll_batch, "unroll_steps": 1,
                                        "batch_size": 8}).params
    worker = MetaPoisonWorker(surrogates[0], TRAIN.images, TRAIN.labels, pos, TEST.images[:1], 1, params, 0, seed=0)
    _, grad = worker.adversarial_grad(np.zeros((8, 1, 8, 8), dtype=np.float32), step=0)
    reached = int((np.abs(grad).reshape(8, -1).sum(axis=1) > 0).sum())
    assert reached == (1 if unroll_batch == "mixed" else 8)


def test_poison_frogs_reduces_feature_distance(surrogates):
    bases = to_tensor(TRAIN.images[TRAIN.labels == 0][:6], "cpu")
    target = to_tensor(TEST.images[TEST.labels == 1][:1], "cpu")
    poisons = feature_collision(surrogates, bases, target, epsilon=16, params=PoisonFrogsParams(steps=30, lr=0.05))
    with torch.no_grad():
        t_feats = [m.features(target) for m in surrogates]
        after, before = feature_loss(surrogates, poisons, t_feats), feature_loss(surrogates, bases, t_feats)
    assert float(after.mean()) < 0.9 * float(before.mean())
    assert float((poisons - bases).abs().max()) <= 16 / 255 + 1e-6


def test_simplex_projection_and_least_squares():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = project_simplex(torch.randn(7, generator=gen, dtype=torch.float64) * 3)
        assert float(c.min()) >= 0 and abs(float(c.sum()) - 1) < 1e-12
    point = torch.tensor([0.3, 0.7, 0.0], dtype=torch.float64)
    assert torch.allclose(project_simplex(point), point)
    features = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    truth = torch.tensor([0.5, 0.2, 0.3, 0.0], dtype=torch.float64)
    found = simplex_least_squares(features, truth @ features, torch.full((4,), 0.25, dtype=torch.float64),
                                  iters=5000, tol=1e-12)
    assert torch.allclose(found, truth, atol=1e-5)


def test_quantize_never_exceeds_epsilon_and_projection_stays_in_the_box():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 5, 5, 1), dtype=np.uint8)
    for eps in (0, 1, 8, 16, 255):
        x0 = to_tensor(images, "cpu")
        delta = project(torch.from_numpy(rng.normal(0, 0.5, size=x0.shape)).float(), x0, eps / 255)
        assert float((x0 + delta).min()) >= 0 and float((x0 + delta).max()) <= 1
        out = quantize(images, delta + 0.499 / 255 * torch.sign(delta), eps)
        assert np.abs(out.astype(int) - images.astype(int)).max() <= eps


def test_augmentation_is_differentiable_and_identity_without_shift_or_flip():
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift_flip(x, gen, max_shift=0, flip=False), x)
    out = random_shift_flip(x, gen, max_shift=2)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert out.shape == x.shape and float(grad.abs().sum()) > 0 and float(grad.max()) <= 1


def test_finetune_freezes_the_body_and_retrains_only_the_head(surrogates):
    original = {k: v.clone() for k, v in surrogates[0].state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    tuned = finetune(surrogates[0], TRAIN, cfg, device="cpu", seed=1)
    again = finetune(surrogates[0], TRAIN, cfg, device="cpu", seed=1)
    assert all(torch.equal(v, surrogates[0].state_dict()[k]) for k, v in original.items())
    assert torch.equal(extract_features(tuned, TRAIN.images, device="cpu"),
                       extract_features(surrogates[0], TRAIN.images, device="cpu"))
    assert not torch.equal(tuned.head.weight, surrogates[0].head.weight)
    assert torch.equal(tuned.head.weight, again.head.weight)


def test_finetune_with_the_recipes_augmentation_trains_the_head_on_augmented_images(surrogates):
    """cfg.augment is honoured, not ignored: the head trains through the frozen body on freshly cropped and
    flipped images (the 'Just How Toxic' benchmark's head), deterministically, and the body stays frozen."""
    original = {k: v.clone() for k, v in surrogates[0].state_dict().items()}
    plain = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    augmented = plain.model_copy(update={"augment": "crop-flip"})
    tuned = finetune(surrogates[0], TRAIN, augmented, device="cpu", seed=1)
    again = finetune(surrogates[0], TRAIN, augmented, device="cpu", seed=1)
    assert torch.equal(tuned.head.weight, again.head.weight)
    assert not torch.equal(tuned.head.weight, finetune(surrogates[0], TRAIN, plain, device="cpu", seed=1).head.weight)
    assert all(torch.equal(v, surrogates[0].state_dict()[k]) for k, v in original.items())
    assert all(torch.equal(v, original[k]) for k, v in tuned.state_dict().items() if not k.startswith("head."))
    assert not any(p.requires_grad for p in tuned.parameters()) and not tuned.training
