"""Fidelity of Witches' Brew and error-minimising noise to their reference implementations.

Witches' Brew (github.com/JonasGeiping/data-poisoning, forest/witchcoven/witch_base.py): signAdam with
lr = tau * (pbatch / 512) / ensemble in units normalised by the data std, a Gaussian start clipped to
the eps-ball (kettle_base.initialize_poison, --init randn) and milestones steps // 2.667, // 1.6, // 1.142.
Error-minimising noise (github.com/HanxunH/Unlearnable-Examples, perturbation.py, toolbox.py): the
class-wise update is the per-class mean of per-sample steps, the stop check runs in eval mode, model
steps clip the gradient norm at 5.0, batches of 512, and a search that the round cap ends before the
stop accuracy says so. The expected values are computed by hand here, independently of the library.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poison_core.attacks import CraftContext, make_attack
from poison_core.attacks.error_min import ErrorMinParams, MinMinNoise, min_min_search
from poison_core.attacks.witches_brew import WitchesBrewParams, ensemble_alignment, parameter_gradient, run_restart
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel
from poison_core.data import load_dataset
from poison_core.models import build_model
from poison_core.training import to_tensor

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=600, n_test=20, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
EPS = 16


def tiny_models(n: int) -> list[torch.nn.Module]:
    return [build_model(ModelConfig(name="convnet", width=4), TRAIN.image_shape, 10, seed=s).eval() for s in range(n)]


def brew_inputs(n: int):
    bases = TRAIN.images[TRAIN.labels == 0][:n]
    return bases, np.zeros(len(bases), dtype=np.int64), TEST.images[TEST.labels != 0][:1]


@pytest.mark.parametrize(("batch_size", "n_models"), [(512, 2), (256, 1)])
def test_witches_brew_first_adam_step_equals_forests_rule(batch_size, n_models):
    """First step by hand: Delta_0 = clip(randn * eps, +-eps); Adam's first step on u = Delta / ds with a
    signed gradient moves u by exactly lr = tau * (pbatch / 512) / K, i.e. Delta by lr * ds; then the
    eps-ball and pixel-box projection. (The earlier rule: tau * eps/255 = 3.2/255 here, uniform start.)"""
    models, std, tau, seed = tiny_models(n_models), 0.3, 0.2, 7
    bases, labels, target = brew_inputs(6)
    params = WitchesBrewParams(steps=1, augment=False, tau=tau, batch_size=batch_size)
    _, poisoned = run_restart(models, bases, labels, target, 3, params, EPS, seed, None, (std,))

    eps = EPS / 255
    x0 = to_tensor(bases, "cpu")
    gen = torch.Generator().manual_seed(seed)
    delta0 = (torch.randn(x0.shape, generator=gen) * eps).clamp(-eps, eps)
    t_grads = [[g.detach() for g in parameter_gradient(m, to_tensor(target, "cpu"), torch.tensor([3]),
                                                       create_graph=False)] for m in models]
    delta = delta0.clone().requires_grad_(True)
    grad = torch.autograd.grad(ensemble_alignment(models, t_grads, x0 + delta, torch.from_numpy(labels)), delta)[0]
    lr_pixels = tau * (batch_size / 512) / n_models * std
    delta1 = (delta0 - lr_pixels * grad.sign()).clamp(-eps, eps)
    delta1 = (x0 + delta1).clamp(0, 1) - x0
    step = np.clip(np.rint(delta1.permute(0, 2, 3, 1).double().numpy() * 255), -EPS, EPS)
    expected = np.clip(bases.astype(np.int16) + step, 0, 255)
    diff = np.abs(poisoned.astype(np.int16) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_witches_brew_starts_gaussian_clipped_to_the_ball():
    """With a negligible step the output is the start: clip(N(0, 1) * eps, +-eps) per pixel (no box
    clip on mid-grey bases), so about a third of the pixels sit on the ball's surface (P(|z| >= 31/32)
    = 0.33), where a uniform start puts 1/32 there."""
    models, seed = tiny_models(1), 3
    bases = np.full((60, *TRAIN.image_shape), 128, dtype=np.uint8)
    params = WitchesBrewParams(steps=1, augment=False, tau=1e-7, data_std=(0.3,))
    _, poisoned = run_restart(models, bases, np.zeros(60, dtype=np.int64), TEST.images[:1], 1, params, EPS, seed)
    gen = torch.Generator().manual_seed(seed)
    start = (torch.randn((60, 1, *TRAIN.image_shape[:2]), generator=gen) * EPS).clamp(-EPS, EPS)
    expected = np.rint(start.permute(0, 2, 3, 1).double().numpy())
    delta = poisoned.astype(np.int16) - bases.astype(np.int16)
    assert (delta == expected).mean() >= 0.99
    assert 0.29 <= (np.abs(delta) == EPS).mean() <= 0.37


def test_witches_brew_lr_decays_at_forests_milestones():
    """forest _run_trial: MultiStepLR at attackiter // 2.667, // 1.6, // 1.142 (floats: 8 // 1.6 == 4.0)."""
    from poison_core.attacks.witches_brew import lr_milestones
    assert lr_milestones(250) == [93, 156, 218] and lr_milestones(8) == [2, 4, 7]


def hand_min_min(model, x, eta, y, steps, step_size, radius):
    """toolbox.py PerturbationTool.min_min_attack, written out: per-sample sign steps on clip(x + eta)."""
    image = (x + eta).clamp(0, 1)
    for _ in range(steps):
        image = image.detach().requires_grad_(True)
        loss = F.cross_entropy(model(image), y)
        (g,) = torch.autograd.grad(loss, image)
        eta = (image.detach() - step_size * g.sign() - x).clamp(-radius, radius)
        image = (x + eta).clamp(0, 1)
    return eta


def test_class_wise_update_is_the_per_class_mean_of_per_sample_steps():
    """perturbation.py universal_perturbation: each sample steps its own copy of its class noise; each
    class present in the batch becomes clip(mean of its samples' eta, +-eps); absent classes keep theirs."""
    model = tiny_models(1)[0]
    radius, step_size, steps = 8 / 255, 0.8 / 255, 3
    noise = MinMinNoise("class", 6, 3, (1, 8, 8), radius, torch.Generator().manual_seed(0), torch.device("cpu"))
    before = noise.values.clone()
    x = to_tensor(TRAIN.images[:6], "cpu")
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    eta = hand_min_min(model, x, before[y], y, steps, step_size, radius)
    noise.minimise(model, x, torch.arange(6), y, steps=steps, step_size=step_size)
    for k in (0, 1):
        torch.testing.assert_close(noise.values[k], eta[y == k].mean(0).clamp(-radius, radius), atol=1e-6, rtol=0)
    assert torch.equal(noise.values[2], before[2])


def craft_error_min(params, caplog):
    ctx = CraftContext(train=TRAIN, threat=ThreatModel(epsilon=8, budget=0.2, clean_label=True), seed=0)
    with caplog.at_level(logging.WARNING, logger="poison_core.attacks.error_min"):
        return make_attack("error_min", {"width": 4, "train_steps": 1, "steps": 1, **params}).craft(ctx)


def test_provenance_records_whether_the_stop_accuracy_was_reached(caplog):
    missed = craft_error_min({"max_rounds": 1, "stop_accuracy": 1.0}, caplog)
    assert missed.targets["stop_criterion_met"] is False and missed.targets["rounds"] == 1
    assert missed.provenance["stop_criterion_met"] is False and missed.provenance["rounds"] == 1
    assert any("stop criterion not met" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    met = craft_error_min({"max_rounds": 3, "stop_accuracy": 0.01}, caplog)
    assert met.targets["stop_criterion_met"] is True and not caplog.records


def test_search_uses_batch_512_grad_clip_5_and_an_eval_mode_stop_check(monkeypatch):
    """Defaults of the reference (--train_batch_size 512, grad_clip 5.0), and the stop statistic is
    computed with running BatchNorm statistics (eval mode), as the reference's *_perturbation_eval."""
    params = ErrorMinParams(width=4, train_steps=2, steps=1, max_rounds=1, stop_accuracy=1.0)
    assert params.batch_size == 512 and params.grad_clip == 5.0
    model = tiny_models(1)[0]
    seen: list[tuple[bool, bool, int]] = []
    model.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), m.training, len(a[0]))))
    clips: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda ps, max_norm, *a, **k: clips.append(max_norm) or real_clip(ps, max_norm, *a, **k))
    min_min_search(TRAIN.images, TRAIN.labels, model, params, epsilon=8, num_classes=10,
                   rng=np.random.default_rng(0), device=torch.device("cpu"))
    train_batches = [size for grad, training, size in seen if grad and training]
    stop_check = [training for grad, training, _ in seen if not grad]
    assert train_batches == [512, 88] and clips == [5.0, 5.0]
    assert stop_check and not any(stop_check)
