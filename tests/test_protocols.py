"""Victim protocols (poison_core.protocols): config rules, what each protocol trains and freezes, the
relabelled label space, storage round trips and the stage functions of a grid cell under a protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infra.storage import Store
from poison_core.config import BenchmarkConfig, VictimConfig, load_benchmark, parse_config
from poison_core.defenses import DefenseContext, make_defense
from poison_core.defenses.persist import load_classifier, save_classifier
from poison_core.errors import ConfigError
from poison_core.protocols import (LinearProbe, build_victim, check_goal, relabel_map, relabelled, resize_images,
                                   source_state)
from poison_core.training import predict_logits, train_model
from tasks import stages
from tests.helpers import tiny_dataset
from tests.pipeline_helpers import TINY_BENCHMARK

CPU = torch.device("cpu")
DATA = tiny_dataset(n=96, k=4, seed=1)
BASE = {"model": {"name": "convnet", "width": 4}, "train": {"epochs": 2, "batch_size": 32}}
PRETRAIN = {"dataset": {"name": "digits", "n_train": 200, "n_test": 50}, "train": {"epochs": 1, "batch_size": 64}}


def victim(protocol: str = "supervised", **extra) -> VictimConfig:
    return parse_config(VictimConfig, {**BASE, "protocol": protocol, **extra})


def body_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    net = model.net if isinstance(model, LinearProbe) else model
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_victims_dump_and_hash_as_before_and_others_dump_what_they_use():
    assert set(victim().model_dump(mode="json")) == {"model", "train"}
    assert set(victim("relabel").model_dump(mode="json")) == {"model", "train", "protocol", "relabel_classes",
                                                              "relabel_seed"}
    assert set(victim("simclr-linear").model_dump(mode="json")) == {"model", "train", "protocol", "ssl"}
    assert set(victim("transfer", pretrain=PRETRAIN).model_dump(mode="json")) == {"model", "train", "protocol",
                                                                                  "pretrain"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"protocol": "transfer"}, r"protocol 'transfer' needs pretrain"),
    ({"protocol": "finetune"}, r"protocol 'finetune' needs pretrain"),
    ({"protocol": "moco"}, r"protocol: Input should be 'supervised', 'simclr-linear', 'transfer', 'finetune' or"),
    ({"protocol": "relabel", "relabel_classes": 1}, r"relabel_classes: .*\(allowed: 2 <= relabel_classes"),
    ({"protocol": "simclr-linear", "ssl": {"epochs": 0}}, r"ssl.epochs: .*\(allowed: 1 <= epochs"),
])
def test_bad_protocol_settings_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(BenchmarkConfig, {"name": "x", "attacks": [{"name": "label_flip"}], "victim": {**BASE, **raw}})
    assert "\n" not in str(err.value)


def test_the_surrogate_trains_supervised_whatever_the_victim_protocol():
    raw = {"name": "x", "attacks": [{"name": "label_flip"}], "victim": {**BASE, "protocol": "relabel"}}
    cfg = parse_config(BenchmarkConfig, raw)
    assert cfg.surrogate_or_victim() == victim() and cfg.victim.protocol == "relabel"
    with pytest.raises(ConfigError, match="surrogate.protocol: the attacker's surrogates train supervised"):
        parse_config(BenchmarkConfig, {**raw, "surrogate": {"protocol": "relabel"}})


def test_relabel_map_is_seeded_balanced_and_refuses_as_many_groups_as_classes():
    a, b = relabel_map(10, 3, seed=5), relabel_map(10, 3, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, relabel_map(10, 3, seed=6))
    assert sorted(np.bincount(a, minlength=3).tolist()) == [3, 3, 4]
    with pytest.raises(ConfigError, match=r"victim.relabel_classes: 4 must be below the dataset's 4 classes"):
        relabel_map(4, 4, seed=0)
    data = relabelled(DATA, victim("relabel", relabel_classes=2, relabel_seed=3))
    mapping = relabel_map(4, 2, seed=3)
    assert data.num_classes == 2 and np.array_equal(data.labels, mapping[DATA.labels])
    assert sorted("+".join(data.class_names).split("+")) == sorted(DATA.class_names)
    assert relabelled(DATA, victim()) is DATA


def test_relabel_refuses_goals_stated_in_the_attackers_class_ids():
    relabel = victim("relabel")
    with pytest.raises(ConfigError, match=r"victim.protocol: 'relabel' .* attack 'badnets' has a backdoor goal"):
        check_goal(relabel, "badnets", {"kind": "backdoor"}, {"kind": "patch"})
    with pytest.raises(ConfigError, match="targeted goal"):
        check_goal(relabel, "witches_brew", {"kind": "targeted"}, None)
    check_goal(relabel, "error_min", {"rounds": 3}, None)
    check_goal(victim(), "badnets", {"kind": "backdoor"}, {"kind": "patch"})


def test_a_linear_probe_trains_only_its_head_and_keeps_the_body_in_eval_mode():
    model = build_victim(victim("transfer", pretrain=PRETRAIN), DATA, seed=0, device=CPU)
    assert isinstance(model, LinearProbe)
    before, head = body_state(model), model.head.weight.clone()
    model.train()
    assert model.training and model.head.training and not model.net.body.training
    train_model(model, DATA, victim().train, device=CPU, seed=0)
    assert same(before, body_state(model))  # BatchNorm running statistics included
    assert not torch.equal(head, model.head.weight)


def test_transfer_and_finetune_start_from_the_source_body_and_only_finetune_moves_it():
    transfer, finetune = victim("transfer", pretrain=PRETRAIN), victim("finetune", pretrain=PRETRAIN)
    source = source_state(transfer, DATA.image_shape)
    assert source is source_state(finetune, DATA.image_shape)  # one pretraining per process and content
    tuned = build_victim(finetune, DATA, seed=0, device=CPU)
    assert same(body_state(tuned), source)
    train_model(tuned, DATA, finetune.train, device=CPU, seed=0)
    assert not same(body_state(tuned), source)
    fresh = build_victim(victim(), DATA, seed=0, device=CPU)
    assert not same(body_state(fresh), source)


def test_simclr_linear_body_never_sees_the_labels():
    ssl = victim("simclr-linear", ssl={"epochs": 1, "batch_size": 32})
    shuffled = DATA.replace(labels=np.roll(DATA.labels, 1))
    a = make_defense("none").fit(DefenseContext(train=DATA, victim=ssl, seed=4)).classifier.model
    b = make_defense("none").fit(DefenseContext(train=shuffled, victim=ssl, seed=4)).classifier.model
    assert same(body_state(a), body_state(b))
    assert not torch.equal(a.head.weight, b.head.weight)
    assert not same(body_state(a), body_state(build_victim(victim(), DATA, seed=4, device=CPU)))


def test_resize_changes_size_and_channels():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    up = resize_images(images, (16, 16, 3))
    assert up.shape == (3, 16, 16, 3) and up.dtype == np.uint8 and np.array_equal(up[..., 0], up[..., 2])
    assert np.array_equal(resize_images(images, (8, 8, 1)), images)


@pytest.mark.parametrize("protocol", ["simclr-linear", "relabel"])
@pytest.mark.parametrize("defense", ["none", "dpa"])
def test_a_stored_victim_loads_back_with_the_same_predictions(tmp_path, protocol, defense):
    v = victim(protocol, ssl={"epochs": 1, "batch_size": 32})
    data = relabelled(DATA, v)
    result = make_defense(defense, {"k": 2} if defense == "dpa" else None).fit(
        DefenseContext(train=data, victim=v, seed=1))
    uri = str(tmp_path / "m.safetensors")
    save_classifier(result.classifier, uri, {})
    loaded, _ = load_classifier(uri, v, DATA.image_shape, DATA.num_classes, CPU)
    assert np.array_equal(result.classifier.predict_logits(DATA.images), loaded.predict_logits(DATA.images))
    assert loaded.predict_logits(DATA.images[:2]).shape == (2, data.num_classes)


def test_grid_cell_stages_under_the_relabel_protocol(tmp_path):
    text = TINY_BENCHMARK.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "  train: {epochs: 2, batch_size: 64}", "  train: {epochs: 10, batch_size: 32}\n  protocol: relabel")
    text = text.replace("  - {name: badnets, params: {target_class: 0, patch_size: 2}}\n", "").replace(
        "  - {name: label_flip, params: {mode: pair, source_class: 1, target_class: 7}}",
        "  - {name: random_labels}")
    cfg = load_benchmark(text)
    store = Store(str(tmp_path / "store"))
    prefix = stages.ingest(store, cfg.dataset).key
    attack, defense = cfg.attacks[0], cfg.defenses[0]
    poisons = stages.craft(store, cfg, prefix, attack, 0).key
    model = stages.retrain(store, cfg, prefix, defense, 0, poisons).key
    clean = stages.retrain(store, cfg, prefix, defense, 0, None).key
    row = stages.read_cell(store, stages.evaluate_cell(store, cfg, prefix, attack.key, defense.key, 0, poisons,
                                                       model, clean).key)
    assert 0.5 < row["baseline_clean_acc"] <= 1.0  # two merged classes: chance is 0.5
    splits = stages.load_splits(store, prefix)
    classifier, _ = stages._load_classifier(store, cfg, clean, splits, "cpu")
    assert predict_logits(classifier.model, splits.test.images[:3], device=CPU).shape == (3, 2)
    supervised = load_benchmark(text.replace("\n  protocol: relabel", ""))
    assert supervised.victim.model_dump() == load_benchmark(TINY_BENCHMARK).victim.model_copy(
        update={"train": supervised.victim.train}).model_dump()
    assert stages.model_key(supervised, prefix, defense, 0, None) != stages.model_key(cfg, prefix, defense, 0, None)
    bad = load_benchmark(TINY_BENCHMARK.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "  train: {epochs: 2, batch_size: 64}", "  train: {epochs: 2, batch_size: 64}\n  protocol: relabel"))
    backdoor = stages.craft(store, bad, prefix, bad.attacks[0], 0).key
    with pytest.raises(ConfigError, match="'relabel' changes the class ids"):
        stages.retrain(store, bad, prefix, bad.defenses[0], 0, backdoor)
