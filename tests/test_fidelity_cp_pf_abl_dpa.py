"""Fidelity to the reference implementations: Convex Polytope's step size in the reference's
normalised units, Poison Frogs' step rejection and watermark, ABL's pure-ascent unlearning, DPA's
pixel-only partition hash. Each test fails on the code before the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poison_core.attacks.convex_polytope import ConvexPolytopeParams, convex_polytope, simplex_least_squares
from poison_core.attacks.poison_frogs import PoisonFrogsParams, feature_collision
from poison_core.config import ModelConfig, TrainConfig, VictimConfig
from poison_core.defenses import DefenseContext, make_defense
from poison_core.defenses.abl import _LossRecorder
from poison_core.defenses.dpa import partition_of
from poison_core.models import build_model
from poison_core.training import batch_slices, to_tensor, train_model
from tests.helpers import tiny_dataset


class Flatten(nn.Module):
    """A 'feature extractor' whose features are the pixels themselves: gradients by hand."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# --- Convex Polytope ------------------------------------------------------------------------------

def test_convex_polytope_first_adam_step_is_lr_times_the_reference_std_on_the_pixel_scale():
    # One poison (k = 1, c = [1]), features = pixels: the loss 1/2 ||t - x||^2 / ||t||^2 has gradient
    # -(t - x) / ||t||^2 < 0 everywhere, and Adam's first step is lr * g / (|g| + eps) = -lr per pixel.
    # The reference takes it on (x - mean) / std with lr 0.04, i.e. 0.04 * 0.2009 on [0, 1] pixels.
    base, target = torch.full((1, 1, 4, 4), 0.5), torch.full((1, 1, 4, 4), 0.8)
    poison = convex_polytope([Flatten()], base, target, epsilon=16, params=ConvexPolytopeParams(steps=1))
    assert torch.allclose(poison, torch.full_like(base, 0.5 + 0.04 * 0.2009), atol=1e-6)  # the old code: 0.54
    assert ConvexPolytopeParams().lr == 0.04 and ConvexPolytopeParams().input_std == pytest.approx(0.2009)


def test_convex_polytope_adam_matches_adam_on_the_normalised_tensor():
    # Several steps against a reference loop written the reference's way: Adam(lr) on z = (x - m) / s.
    gen = torch.Generator().manual_seed(0)
    bases, target = torch.rand(3, 1, 4, 4, generator=gen) * 0.6 + 0.2, torch.rand(1, 1, 4, 4, generator=gen)
    net, std, mean = Flatten(), 0.2009, 0.4
    params = ConvexPolytopeParams(steps=5)
    ours = convex_polytope([net], bases, target, epsilon=255, params=params)
    z = ((bases - mean) / std).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.04, betas=(0.9, 0.999))
    c = torch.full((3,), 1 / 3)
    t = net.features(target)[0]
    for _ in range(5):
        feats = net.features(z * std + mean)
        c = simplex_least_squares(feats.detach(), t, c, iters=10_000, tol=1e-6)
        loss = 0.5 * (t - c @ feats).pow(2).sum() / t.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(((z * std + mean).clamp(0, 1) - mean) / std)
    assert torch.allclose(ours, (z * std + mean).detach(), atol=1e-5)


def test_simplex_solver_halves_its_step_and_reaches_the_constrained_minimum():
    gen = torch.Generator().manual_seed(1)
    features = torch.rand(5, 30, generator=gen, dtype=torch.float64)
    truth = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0], dtype=torch.float64)
    found = simplex_least_squares(features, truth @ features, torch.full((5,), 0.2, dtype=torch.float64),
                                  iters=10_000, tol=1e-12)
    assert torch.allclose(found, truth, atol=1e-5)


# --- Poison Frogs ---------------------------------------------------------------------------------

def test_poison_frogs_rejects_a_step_that_raises_the_objective_and_decays_lambda_by_0_2():
    # Features = pixels, beta = 0: the feature loss ||x - t||^2 has gradient 2 (x - t). With lambda 1.5
    # the step overshoots, x_hat - t = -2 (x - t): the objective rises, so the step is rejected and
    # lambda becomes 0.3; the second step x + 0.6 (t - x) is accepted.
    base, target = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.6)
    one = feature_collision([Flatten()], base, target, epsilon=255,
                            params=PoisonFrogsParams(steps=1, lr=1.5, beta=0, watermark=0))
    assert torch.equal(one, base)  # the old code kept the step: 0.8
    two = feature_collision([Flatten()], base, target, epsilon=255,
                            params=PoisonFrogsParams(steps=2, lr=1.5, beta=0, watermark=0))
    assert torch.allclose(two, torch.full_like(base, 0.5 + 2 * 1.5 * 0.2 * 0.1))


def test_poison_frogs_defaults_follow_the_reference():
    params = PoisonFrogsParams()
    assert params.watermark == 0.3 and params.decay == 0.2 and params.tol == 1e-5
    # the optimisation starts from the watermarked base: with a converged poison (target == base
    # everywhere but in one pixel) nothing moves but that pixel
    base, target = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)
    target[0, 0, 0, 0] = 0.9
    out = feature_collision([Flatten()], base, target, epsilon=255, params=PoisonFrogsParams(steps=1, lr=1e-9, beta=0))
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.5 + 0.3 * 0.4, abs=1e-6)


# --- ABL ------------------------------------------------------------------------------------------

CONV = VictimConfig(model=ModelConfig(name="convnet", width=4), train=TrainConfig(epochs=1, batch_size=8))


def _unlearning_setup():
    data = tiny_dataset(n=40, k=4, seed=2)
    model = build_model(CONV.model, data.image_shape, data.num_classes, seed=0)
    train_model(model, data, CONV.train, device="cpu", seed=0)
    isolated = np.array([1, 5, 7, 12, 20])
    rest = np.setdiff1d(np.arange(len(data)), isolated)
    calls: list[tuple[bool, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda m, args: calls.append((m.training, args[0].detach().clone())))
    ctx = DefenseContext(train=data, victim=CONV, seed=0)
    return data, model, isolated, rest, calls, ctx


def _rows(data, idx):
    return {to_tensor(data.images[i:i + 1], "cpu").flatten().numpy().tobytes() for i in idx}


def test_abl_default_unlearning_is_pure_ascent_on_the_isolated_set_in_train_mode():
    data, model, isolated, rest, calls, ctx = _unlearning_setup()
    abl = make_defense("abl", {"unlearning_epochs": 1, "unlearning_lr": 0.01})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    running = model.body[0][1].running_mean.clone()
    # the expected update: one SGD step (momentum 0.9, Nesterov, weight decay 1e-4) on -CE of D_b, train mode
    probe = build_model(CONV.model, data.image_shape, data.num_classes, seed=0)
    probe.load_state_dict(model.state_dict())
    probe.train()
    x, y = to_tensor(data.images[isolated], "cpu"), torch.from_numpy(data.labels[isolated])
    grads = torch.autograd.grad(-F.cross_entropy(probe(x), y), list(probe.parameters()))
    abl._unlearn(model, data, rest, isolated, ctx, _LossRecorder(None))
    assert len(calls) == 1 and calls[0][0] is True  # one batch of 5 < batch size 8, train mode
    assert {row.numpy().tobytes() for row in calls[0][1].flatten(1)} == _rows(data, isolated)
    for (name, p), g in zip(model.named_parameters(), grads):
        d = g + 1e-4 * before[name]
        assert torch.allclose(p.detach(), before[name] - 0.01 * 1.9 * d, atol=1e-6), name
    assert not torch.equal(model.body[0][1].running_mean, running)  # BatchNorm statistics updated
    defaults = make_defense("abl").params
    assert defaults.unlearning == "ascent" and defaults.unlearning_epochs == 5 and defaults.unlearning_lr == 5e-4


def test_abl_default_runs_the_reference_epochs_over_the_isolated_set_only():
    data, model, isolated, rest, calls, ctx = _unlearning_setup()
    make_defense("abl", {"unlearning_epochs": 3})._unlearn(model, data, rest, isolated, ctx, _LossRecorder(None))
    assert len(calls) == 3 * len(batch_slices(len(isolated), CONV.train.batch_size))
    seen = {row.numpy().tobytes() for _, x in calls for row in x.flatten(1)}
    assert seen == _rows(data, isolated) and all(training for training, _ in calls)


def test_abl_descent_ascent_variant_is_selectable_by_name():
    data, model, isolated, rest, calls, ctx = _unlearning_setup()
    make_defense("abl", {"unlearning_epochs": 2, "unlearning": "descent_ascent"})._unlearn(
        model, data, rest, isolated, ctx, _LossRecorder(None))
    assert len(calls) == 2 * len(batch_slices(len(rest), CONV.train.batch_size))
    assert not any(training for training, _ in calls)  # BatchNorm in eval mode
    assert _rows(data, rest) <= {row.numpy().tobytes() for _, x in calls for row in x.flatten(1)}


# --- DPA ------------------------------------------------------------------------------------------

MLP = VictimConfig(model=ModelConfig(name="mlp", width=8), train=TrainConfig(epochs=1, batch_size=16))


def test_dpa_relabelling_leaves_every_partition_unchanged():
    data = tiny_dataset(n=120, k=4, seed=6)
    relabelled = data.replace(labels=(data.labels + 1) % 4)
    fit = make_defense("dpa", {"k": 5})
    sizes = [h["size"] for h in fit.fit(DefenseContext(train=data, victim=MLP, seed=0)).history]
    assert [h["size"] for h in fit.fit(DefenseContext(train=relabelled, victim=MLP, seed=0)).history] == sizes


def test_dpa_one_label_flip_changes_one_base_model_only():
    data = tiny_dataset(n=60, k=4, seed=7)
    labels = data.labels.copy()
    labels[3] = (labels[3] + 1) % 4
    fit = make_defense("dpa", {"k": 4})
    base = fit.fit(DefenseContext(train=data, victim=MLP, seed=0)).classifier.models
    flipped = fit.fit(DefenseContext(train=data.replace(labels=labels), victim=MLP, seed=0)).classifier.models
    changed = [i for i, (a, b) in enumerate(zip(base, flipped))
               if any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))]
    assert len(changed) == 1  # the old code moved the sample: its old and its new partition changed
    assert changed == [int(partition_of(data.images[3:4], 4)[0])]
