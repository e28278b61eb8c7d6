"""MetaPoison does what its reference does (github:wronnyhuang/metapoison, main.py ``craft``,
meta.py ``Meta.build_metalearner_graph``, utils.py ``cr_schedule`` / ``carlini``):

* each craft step every model sweeps its epoch and sums the meta-gradient of every batch that holds
  poisons, so every poison gets a gradient from every ensemble member;
* the adversarial loss is the Carlini-Wagner margin averaged over unroll stages 1..K, the target scored
  inside each train-mode unrolled batch (its BatchNorm statistics);
* the ensemble advances on clean data;
* the perturbation starts uniform in [-eps, eps] (``restart_poison`` at craft step 0) and the craft rate
  warms up as ((step + 1) / 5)^2.

Tiny data (200 digits, 8x8), a width-8 ConvNet (with BatchNorm), float64 for the loss checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poison_core.attacks import CraftContext, LocalActorGroup, make_attack
from poison_core.attacks._unroll import OuterLoss, unrolled_target_loss
from poison_core.attacks.metapoison import MetaPoisonWorker, craft_rate_at
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel
from poison_core.data import load_dataset
from poison_core.models import build_model

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
FAST = {"steps": 1, "n_models": 2, "stagger_epochs": 2, "batch_size": 16, "epoch_batches": 3}
GRAD_METHODS = ("craft_step", "adversarial_grad")


def threat(eps: int = 16, budget: float = 0.1) -> ThreatModel:
    return ThreatModel(epsilon=eps, budget=budget, clean_label=True, targets=TargetSelection(n_targets=1))


@pytest.fixture(scope="module")
def architecture(one_thread):
    return build_model(ModelConfig(name="convnet", width=8), TRAIN.image_shape, TRAIN.num_classes, seed=0)


def craft_recorded(architecture, params: dict, th: ThreatModel | None = None, seed: int = 0):
    """Craft one key; returns (PoisonSet, [(method, per-worker args, per-worker results)], the workers)."""
    calls: list[tuple[str, list, list]] = []
    groups: list[LocalActorGroup] = []

    class Recording(LocalActorGroup):
        def call(self, method, args_per_worker):
            args = [copy.deepcopy(a) for a in args_per_worker]
            results = super().call(method, args_per_worker)
            calls.append((method, args, results))
            return results

    def factory(cls, init_args):
        groups.append(Recording(cls, init_args))
        return groups[-1]

    ctx = CraftContext(train=TRAIN, test=TEST, threat=th or threat(), seed=seed, surrogates=[architecture],
                       actors=factory)
    ps = make_attack("metapoison", {**FAST, **params}).craft(ctx)
    return ps, [c for c in calls if c[0] in GRAD_METHODS], groups[-1].workers


@pytest.mark.parametrize("epoch_batches", [None, 3])
def test_one_craft_step_gives_every_poison_a_gradient_from_every_model(architecture, epoch_batches):
    """20 poisons among 200 samples, batch 16: the random 'mixed' share (2 per unrolled batch) reached at
    most 4 poisons per model; the sweep reaches all 20 from both models, also on a 3-batch mini-epoch."""
    ps, calls, _ = craft_recorded(architecture, {"epoch_batches": epoch_batches})
    assert len(ps) == 20
    grads = [g for _, g in calls[0][2]]
    assert len(grads) == 2
    for grad in grads:
        reached = np.abs(grad).reshape(len(grad), -1).sum(axis=1) > 0
        assert reached.all(), f"{int(reached.sum())} of {len(grad)} poisons got a gradient"


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def reference_loss(model: nn.Module, poisons, labels, batches, tail, target, adv: int, lr: float) -> float:
    """Meta.build_metalearner_graph written out: stage i forwards [batch_i, target] in train mode with
    weights theta_i; cwT_i = max_{j != adv} z_j - z_adv on the target row; loss = mean(cwT_1..cwT_K)."""
    model = copy.deepcopy(model).train()
    weights = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    stages = list(batches) + [tail]
    margins = []
    for i, (clean_x, clean_y, idx) in enumerate(stages):
        x, y = torch.cat([poisons[idx], clean_x]), torch.cat([labels[idx], clean_y])
        logits = functional_call(model, (weights, buffers), (torch.cat([x, target]),))
        if i > 0:
            z = logits[-1].detach()
            margins.append(float(max(z[j] for j in range(len(z)) if j != adv) - z[adv]))
        if i < len(batches):
            grads = torch.autograd.grad(F.cross_entropy(logits[:len(x)], y), list(weights.values()))
            weights = {n: w - lr * g for (n, w), g in zip(weights.items(), grads)}
    return float(np.mean(margins))


@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBN])
def test_outer_loss_is_the_cw_margin_averaged_over_stages_with_the_target_in_the_batch(model_cls):
    """TinyMLP checks the loss (CW margin over stages 1..K, not CE at K); TinyBN also checks that the
    target is scored in train mode inside the unrolled batch, not with the running statistics."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = model_cls().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    poisons = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 2, 2])

    def batch(rows):
        return (torch.rand(5, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen),
                torch.tensor(rows, dtype=torch.long))

    batches, tail = [batch([0, 2]), batch([1])], batch([])
    target = torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    def ours(outer: OuterLoss = OuterLoss()) -> float:
        loss = unrolled_target_loss(model, params, buffers, poisons, labels, batches, target, 1, 0.5, outer, tail)
        return float(loss.detach())

    expected = reference_loss(model, poisons, labels, batches, tail, target, 1, 0.5)
    assert ours() == pytest.approx(expected, abs=1e-10)
    earlier = OuterLoss(objective="xent", stages="last", target_in_batch=False)  # this module's old loss
    assert abs(ours(earlier) - expected) > 1e-3
    if model_cls is TinyBN:  # the train-mode batch, not the running statistics, normalises the target
        assert abs(ours(OuterLoss(target_in_batch=False)) - expected) > 1e-3


def worker_weights(worker: MetaPoisonWorker) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in worker.state()[0].items()}


def test_ensemble_advances_on_clean_data(architecture):
    """Two crafts whose perturbations differ (eps 4 vs 16) leave the ensemble in the same place: the
    models train on the clean data (reference -trajectory clean); with trajectory 'poisoned' they do not."""
    finals = {}
    for trajectory in ("clean", "poisoned"):
        for eps in (4, 16):
            params = {"steps": 2} if trajectory == "clean" else {"steps": 2, "trajectory": "poisoned"}
            _, _, workers = craft_recorded(architecture, params, threat(eps=eps))
            finals[trajectory, eps] = [worker_weights(w) for w in workers]
    for trajectory, same in (("clean", True), ("poisoned", False)):
        equal = all(np.array_equal(a[k], b[k]) for a, b in zip(finals[trajectory, 4], finals[trajectory, 16])
                    for k in a)
        assert equal is same, trajectory


def test_perturbation_starts_uniform_in_the_eps_ball(architecture):
    """The first craft step sees a seeded uniform perturbation in [-eps, eps] inside the pixel box
    (reference restart_poison at craft step 0), not zero; init 'zero' keeps the earlier start."""
    eps = 16 / 255
    firsts = [craft_recorded(architecture, {}, seed=s)[1][0][1][0][0] for s in (0, 0, 1)]
    start, again, other = firsts
    assert np.array_equal(start, again) and not np.array_equal(start, other)
    assert np.abs(start).max() <= eps + 1e-7 and np.abs(start).max() > 0.9 * eps
    assert np.mean(np.abs(start)) > 0.3 * eps  # spread over the ball (box clipping removes some)
    _, _, workers = craft_recorded(architecture, {"steps": 1})
    bases = TRAIN.images[workers[0].positions].transpose(0, 3, 1, 2) / 255.0
    assert np.all(bases + start >= -1e-7) and np.all(bases + start <= 1 + 1e-7)
    zero = craft_recorded(architecture, {"init": "zero"})[1][0][1][0][0]
    assert not zero.any()


def test_craft_rate_schedule_is_the_reference_cr_schedule():
    params = make_attack("metapoison", {}).params
    base = 200 / 255
    expected = {0: base / 25, 1: base * 4 / 25, 3: base * 16 / 25, 4: base, 19: base, 20: base * 0.1,
                39: base * 0.1, 40: base * 0.01, 60: base * 0.01, 200: base * 0.01}
    for step, rate in expected.items():
        assert craft_rate_at(params, step) == pytest.approx(rate, rel=1e-12), step
    flat = make_attack("metapoison", {"craft_warmup": 0}).params
    assert craft_rate_at(flat, 0) == pytest.approx(base)


def test_first_adam_step_moves_the_perturbation_by_the_warmed_up_rate(architecture):
    """Adam's first step moves each coordinate by about its rate: (1/5)^2 * 200/255 = 8/255 (reference
    warm-up), where the earlier constant 200/255 jumped straight to the eps = 16/255 boundary."""
    _, calls, _ = craft_recorded(architecture, {"steps": 2})
    before, after = calls[0][1][0][0], calls[1][1][0][0]
    moved = np.abs(after - before).max()
    assert moved == pytest.approx(8 / 255, rel=0.02)


def test_model_learning_rate_warms_up_over_its_first_epochs(architecture):
    """Reference utils.py lr_schedule: lrnrate * min(1, (epoch + 1) / 5) in the unroll and the training."""
    params = make_attack("metapoison", {**FAST, "stagger_epochs": 8, "lr": 0.1}).params
    pos = np.flatnonzero(TRAIN.labels == 0)[:4]
    rates = []
    for start in (0, 1, 4, 6):
        worker = MetaPoisonWorker(architecture, TRAIN.images, TRAIN.labels, pos, TEST.images[:1], 1, params, start, 0)
        rates.append(worker._lr())
    assert rates == pytest.approx([0.02, 0.04, 0.1, 0.1])
    flat = params.model_copy(update={"lr_warmup_epochs": 0})
    worker = MetaPoisonWorker(architecture, TRAIN.images, TRAIN.labels, pos, TEST.images[:1], 1, flat, 0, 0)
    assert worker._lr() == pytest.approx(0.1)
