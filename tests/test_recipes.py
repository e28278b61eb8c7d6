"""The field's training recipes and the references' defaults: crop-and-flip augmentation in TrainConfig,
forest's step schedule, class-wise error-min from zero on the whole set, the class-wise random-noise
control, ABL's isolation, Sleeper Agent's retraining recipe, Hidden Trigger's crafts and step units,
Poison Frogs' benchmark rule, Unlearnable Clusters' generator, TUE's absolute step. Tiny data only."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from torch import nn

from helpers import tiny_dataset
from poison_core.attacks import CraftContext, make_attack
from poison_core.attacks import hidden_trigger as htb
from poison_core.attacks import sleeper_agent as sleeper
from poison_core.attacks.clusters import ClustersParams, PerturbationGenerator, ResidualBlock
from poison_core.attacks.error_min import ErrorMinParams, MinMinNoise
from poison_core.attacks.poison_frogs import PoisonFrogsParams, feature_collision, resolve_rule
from poison_core.attacks.tue import TUEParams, noise_step
from poison_core.augmentation import default_padding
from poison_core.config import ThreatModel, TrainConfig, load_benchmark
from poison_core.data.dataset import ImageDataset
from poison_core.defenses import make_defense
from poison_core.defenses.abl import finetune_recipe, isolation_recipe
from poison_core.models import build_model
from poison_core.config import ModelConfig
from poison_core.training import (LossContext, TrainHooks, forest_milestones, learning_rate, to_tensor,
                                  train_model)

CPU = torch.device("cpu")


def _seen_pixels(cfg: TrainConfig, seed: int, data: ImageDataset) -> list[torch.Tensor]:
    """The batches (after the recipe's augmentation) the trainer feeds, one per epoch (one batch each)."""
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.detach().clone())
        return x, y

    model = build_model(ModelConfig(name="convnet", width=2), data.image_shape, data.num_classes, seed=0)
    train_model(model, data, cfg, device=CPU, seed=seed, hooks=TrainHooks(augment=record), shuffle=False)
    return seen


# --- 1. the recipe's augmentation -------------------------------------------------------------------

def test_augmentation_changes_pixels_between_epochs_and_a_seed_fixes_them():
    data = tiny_dataset(n=16, shape=(8, 8, 1), k=4)
    cfg = TrainConfig(epochs=2, batch_size=16, augment="crop-flip")
    first, second = _seen_pixels(cfg, 3, data)
    assert not torch.equal(first, second), "two epochs of the same batch must see different pixels"
    again = _seen_pixels(cfg, 3, data)
    assert torch.equal(again[0], first) and torch.equal(again[1], second), "the same seed gives the same pixels"
    assert not torch.equal(_seen_pixels(cfg, 4, data)[0], first)
    raw = to_tensor(data.images, CPU)
    plain = _seen_pixels(TrainConfig(epochs=2, batch_size=16), 3, data)
    assert torch.equal(plain[0], raw) and torch.equal(plain[1], raw), "augment 'none' feeds raw images"
    # every augmented image is a shifted (zero-filled) and possibly mirrored copy: same pixel multiset or fewer
    assert float(first.sum()) <= float(raw.sum()) + 1e-4


def test_augmentation_padding_follows_the_references_and_is_left_out_of_the_dump_when_off():
    assert default_padding(32) == 4 and default_padding(28) == 2 and default_padding(8) == 1
    assert set(TrainConfig().model_dump()) == {"epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                                               "weight_decay", "schedule", "compile"}
    on = TrainConfig(augment="crop-flip").model_dump()
    assert on["augment"] == "crop-flip" and on["crop_padding"] is None and on["flip"] is True


def test_shipped_configs_turn_augmentation_on_where_the_references_use_it():
    for path in glob.glob("configs/fashion-mnist*.yaml") + glob.glob("configs/cifar10*.yaml"):
        assert load_benchmark(path).victim.train.augment == "crop-flip", path
    cifar = load_benchmark("configs/cifar10-resnet18.yaml").victim.train
    assert (cifar.epochs, cifar.lr, cifar.batch_size, cifar.schedule, cifar.crop_padding) == (40, 0.1, 128, "forest", 4)
    # forest's CONSERVATIVE optimiser (victims/training.py get_optimizers: SGD, momentum 0.9, Nesterov)
    assert (cifar.optimizer, cifar.momentum, cifar.nesterov, cifar.weight_decay, cifar.flip) == ("sgd", 0.9, True,
                                                                                                 5e-4, True)


def test_forest_schedule_divides_the_lr_at_epochs_14_24_35_of_40():
    assert forest_milestones(40) == (14, 24, 35)
    cfg = TrainConfig(epochs=40, lr=0.1, schedule="forest")
    lrs = [learning_rate(cfg, epoch * 10, 10) for epoch in (0, 13, 14, 23, 24, 34, 35, 39)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_unshuffled_training_walks_the_stored_order():
    seen: list[np.ndarray] = []

    def loss(per_sample: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        seen.append(ctx.indices.numpy().copy())
        return per_sample.mean()

    data = tiny_dataset(n=12, k=3)
    model = build_model(ModelConfig(name="convnet", width=2), data.image_shape, data.num_classes, seed=0)
    train_model(model, data, TrainConfig(epochs=2, batch_size=4), device=CPU, seed=0, shuffle=False,
                hooks=TrainHooks(loss=loss))
    assert [list(s) for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] * 2


# --- 2. class-wise error-minimising noise and its control ------------------------------------------

def test_class_wise_error_min_starts_from_zero_sample_wise_stays_uniform():
    gen = torch.Generator().manual_seed(0)
    assert ErrorMinParams().random_start is None
    cls = MinMinNoise("class", 10, 4, (1, 8, 8), 8 / 255, gen, CPU, random_start=None)
    assert torch.count_nonzero(cls.values) == 0
    smp = MinMinNoise("sample", 10, 4, (1, 8, 8), 8 / 255, gen, CPU, random_start=None)
    assert torch.count_nonzero(smp.values) > 0


def test_class_wise_error_min_takes_model_steps_on_the_whole_training_set():
    data = tiny_dataset(n=60, k=3)
    batches: list[int] = []
    attack = make_attack("error_min", {"mode": "class", "width": 2, "subset": 0.2, "max_rounds": 1, "train_steps": 1,
                                       "steps": 1, "batch_size": 512})
    original = nn.Module.__call__

    def spy(module: nn.Module, *args, **kwargs):
        if getattr(module, "_spy", False) and module.training:
            batches.append(len(args[0]))
        return original(module, *args, **kwargs)

    import poison_core.attacks.error_min as em
    build = em.build_model

    def build_spied(*a, **k):
        model = build(*a, **k)
        model._spy = True
        return model

    em.build_model = build_spied
    nn.Module.__call__ = spy
    try:
        attack.craft(CraftContext(train=data, threat=ThreatModel(epsilon=8, budget=1.0, clean_label=True), seed=0))
    finally:
        nn.Module.__call__ = original
        em.build_model = build
    assert batches == [60], f"model steps must see the whole training set (60), saw {batches}"


def test_class_wise_random_noise_gives_one_delta_per_class():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, size=(30, 6, 6, 1), dtype=np.uint8)  # no clipping at eps 8
    data = ImageDataset(images, np.arange(30) % 3, ("a", "b", "c"), ids=np.arange(30), name="mid")
    ctx = CraftContext(train=data, threat=ThreatModel(epsilon=8, budget=1.0, clean_label=True), seed=0)
    ps = make_attack("random_noise", {"mode": "class"}).craft(ctx)
    order = np.argsort(ps.ids)
    delta = ps.images[order].astype(np.int16) - images.astype(np.int16)
    for c in range(3):
        members = delta[data.labels == c]
        assert (members == members[0]).all(), f"class {c} must share one pattern"
        assert np.abs(members[0]).max() <= 8 and np.abs(members[0]).max() > 0
    assert not (delta[0] == delta[1]).all()
    sample = make_attack("random_noise").craft(ctx)
    d2 = sample.images[np.argsort(sample.ids)].astype(np.int16) - images.astype(np.int16)
    assert not (d2[data.labels == 0] == d2[0]).all()


def test_every_class_wise_availability_row_has_its_class_wise_control():
    for path in glob.glob("configs/*.yaml"):
        cfg = load_benchmark(path)
        class_rows = [a for a in cfg.attacks if a.name == "error_min" and a.params.get("mode") == "class"]
        controls = {cfg.threat_for(a).budget for a in cfg.attacks
                    if a.name == "random_noise" and a.params.get("mode") == "class"}
        for row in class_rows:
            assert cfg.threat_for(row).budget in controls, (path, row.key)


# --- 3. ABL -------------------------------------------------------------------------------------------

def test_abl_isolates_for_the_reference_epochs_at_its_lr_unshuffled_and_finetunes_augmented():
    p = make_defense("abl").params
    assert (p.isolation_epochs, p.isolation_lr, p.isolation_shuffle, p.finetune_augment) == (10, 0.1, False, True)
    recipe = TrainConfig(epochs=8, lr=0.05, augment="crop-flip")
    iso = isolation_recipe(recipe, p)
    assert (iso.epochs, iso.lr, iso.schedule, iso.augment) == (10, 0.1, "none", "none")
    fine = finetune_recipe(TrainConfig(epochs=8, lr=0.05), p, 8)
    assert (fine.epochs, fine.lr, fine.augment) == (8, 0.05, "crop-flip")


# --- 4. Sleeper Agent -----------------------------------------------------------------------------

def test_sleeper_agent_retrains_with_the_surrogates_full_recipe_by_default(monkeypatch):
    assert sleeper.SleeperAgentParams().retrain is None
    assert "trigger_10.png" in sleeper.__doc__
    used: list[TrainConfig] = []
    real = sleeper.train_model

    def recording(model, data, cfg, **kwargs):
        used.append(cfg)
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(sleeper, "train_model", recording)
    data = tiny_dataset(n=40, k=2)
    surrogate = build_model(ModelConfig(name="convnet", width=2), data.image_shape, 2, seed=0)
    recipe = TrainConfig(epochs=1, batch_size=16, lr=0.01, augment="crop-flip")
    params = sleeper.SleeperAgentParams(steps=3, retrain_every=1, target_class=0, source_class=1, patch_size=2)
    positions = np.flatnonzero(data.labels == 0)[:2]
    sources = data.images[data.labels == 1][:4]
    sleeper.run_sleeper([surrogate], data, positions, sources, params, 16, seed=0, surrogate_recipe=recipe)
    assert used == [recipe], used


# --- 5. Hidden Trigger Backdoor --------------------------------------------------------------------

class Scaled(nn.Module):
    """Features = scale * pixels."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)


def test_hidden_trigger_step_is_relative_to_the_feature_scale():
    gen = torch.Generator().manual_seed(0)
    targets, sources = torch.rand(3, 1, 4, 4, generator=gen), torch.rand(3, 1, 4, 4, generator=gen)
    params = htb.HiddenTriggerParams(steps=5, lr=0.05)
    one, _ = htb.hidden_trigger_batch([Scaled(1.0)], targets, sources, epsilon=255, params=params)
    ten, _ = htb.hidden_trigger_batch([Scaled(10.0)], targets, sources, epsilon=255, params=params)
    assert torch.allclose(one, ten, atol=1e-5), "relative units: rescaled features give the same poisons"
    absolute = params.model_copy(update={"lr_units": "absolute"})
    a1, _ = htb.hidden_trigger_batch([Scaled(1.0)], targets, sources, epsilon=255, params=absolute)
    a10, _ = htb.hidden_trigger_batch([Scaled(10.0)], targets, sources, epsilon=255, params=absolute)
    assert not torch.allclose(a1, a10, atol=1e-3)


def test_hidden_trigger_crafts_two_poisons_per_target_against_fresh_sources(monkeypatch):
    calls: list[torch.Tensor] = []
    real = htb.hidden_trigger_batch

    def recording(models, targets, patched_sources, **kwargs):
        calls.append(patched_sources.clone())
        return real(models, targets, patched_sources, **kwargs)

    monkeypatch.setattr(htb, "hidden_trigger_batch", recording)
    data = tiny_dataset(n=40, k=2)
    surrogate = build_model(ModelConfig(name="convnet", width=2), data.image_shape, 2, seed=0).eval()
    attack = make_attack("hidden_trigger", {"steps": 2, "patch_size": 2, "target_class": 0, "source_class": 1})
    assert attack.params.poisons_per_target == 2
    ps = attack.craft(CraftContext(train=data, threat=ThreatModel(epsilon=16, budget=0.1, clean_label=True), seed=0,
                                   surrogates=[surrogate]))
    assert len(calls) == 2 and not torch.equal(calls[0], calls[1])
    assert len(ps.ids) == 4


# --- 6. Poison Frogs ------------------------------------------------------------------------------

class Pixels(nn.Module):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_poison_frogs_runs_the_benchmarks_rule_under_linf_and_the_papers_without_a_bound():
    assert resolve_rule(PoisonFrogsParams(), 16) == ("benchmark", 120, 0.001)
    assert resolve_rule(PoisonFrogsParams(), 255) == ("paper", 1000, 0.1)
    # benchmark: x <- proj(x - lr * grad ||x - t||^2), no beta pull towards the base
    base, target = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.52)
    params = PoisonFrogsParams(steps=1, lr=0.1, watermark=0, beta=1e3)
    out = feature_collision([Pixels()], base, target, epsilon=16, params=params)
    assert torch.allclose(out, base + 0.1 * 2 * (target - base)), "the beta term must not enter the benchmark rule"
    paper = feature_collision([Pixels()], base, target, epsilon=16, params=params.model_copy(update={"rule": "paper"}))
    assert not torch.allclose(paper, out)


# --- 7. Unlearnable Clusters ----------------------------------------------------------------------

def test_unlearnable_clusters_generator_is_a_six_block_resnet_clamped_to_eps():
    p = ClustersParams()
    assert (p.generator, p.output, p.resnet_blocks, p.lr) == ("resnet", "clamp", 6, None)
    radius = 8 / 255
    torch.manual_seed(0)
    gen = PerturbationGenerator(1, 8, radius)
    assert sum(isinstance(m, ResidualBlock) for m in gen.modules()) == 6
    z = torch.rand(1, 1, 28, 28)
    out = gen(z)
    assert out.shape == z.shape and float(out.abs().max()) <= radius + 1e-7
    saturated = float((out.abs() >= radius - 1e-7).float().mean())
    assert saturated > 0.5, f"clamped Tanh saturates near +-eps ({saturated:.2f} at the bound)"
    torch.manual_seed(0)
    scaled = PerturbationGenerator(1, 8, radius, output="scale")(z)
    assert float((scaled.abs() >= radius - 1e-7).float().mean()) == 0.0


# --- 8. TUE ---------------------------------------------------------------------------------------

def test_tue_noise_step_is_the_references_absolute_0_8_over_255():
    assert noise_step(TUEParams(), 16 / 255) == pytest.approx(0.8 / 255)
    assert noise_step(TUEParams(), 4 / 255) == pytest.approx(0.8 / 255)
    assert noise_step(TUEParams(step_fraction=0.1), 16 / 255) == pytest.approx(1.6 / 255)


# --- defenses with their own loop use the recipe too -----------------------------------------------

def test_dp_sgd_trains_with_the_recipes_augmentation():
    from poison_core.config import VictimConfig
    from poison_core.defenses import DefenseContext

    data = tiny_dataset(n=24, k=3)

    def weights(augment: str, seed: int) -> torch.Tensor:
        victim = VictimConfig(model=ModelConfig(name="convnet", width=2),
                              train=TrainConfig(epochs=1, batch_size=12, augment=augment))
        result = make_defense("dp_sgd").fit(DefenseContext(train=data, victim=victim, seed=seed))
        return torch.cat([q.detach().flatten() for q in result.classifier.model.parameters()])

    assert torch.equal(weights("crop-flip", 0), weights("crop-flip", 0))
    assert not torch.equal(weights("crop-flip", 0), weights("none", 0))


def test_unlearnable_clusters_can_use_the_transfer_protocols_pretrained_encoder(monkeypatch):
    import poison_core.attacks.clusters as uc

    with pytest.raises(ValueError, match="encoder_source .pretrained. needs pretrain"):
        make_attack("unlearnable_clusters", {"encoder_source": "pretrained"})
    monkeypatch.setattr(uc, "fit_simclr_encoder", lambda *a, **k: pytest.fail("the SimCLR encoder was trained"))
    seen: list[nn.Module] = []
    real = uc.encoder_features
    monkeypatch.setattr(uc, "encoder_features", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    params = {"encoder_source": "pretrained", "encoder_model": {"name": "convnet", "width": 2},
              "pretrain": {"dataset": {"name": "digits", "n_train": 200, "n_test": 50}, "train": {"epochs": 1}},
              "epochs": 1, "generator": "conv", "n_clusters": 2}
    data = tiny_dataset(n=24, k=2)
    make_attack("unlearnable_clusters", params).craft(
        CraftContext(train=data, threat=ThreatModel(epsilon=8, budget=1.0, clean_label=True), seed=0))
    from poison_core.config import PretrainConfig, VictimConfig
    from poison_core.protocols import source_state
    victim = VictimConfig(model=ModelConfig(name="convnet", width=2), protocol="transfer",
                          pretrain=PretrainConfig.model_validate(params["pretrain"]))
    body = source_state(victim, data.image_shape)
    assert len(seen) == 1 and all(torch.equal(seen[0].state_dict()[k], v) for k, v in body.items())
