"""One cell builder: the in-process benchmark (poison_core.experiment) and the stages (tasks.stages) build
the same CraftContext and DefenseContext, so they craft the same poisons and train the same victims.

Both call poison_core.experiment.craft_context / defense_context (the attack's threat model, the seeds
derived from the cell, the PoisonSet applied and relabelled); this checks the outcome end to end on a
real local store, so a stage that derived a seed or a threat model of its own would fail here.
"""

from __future__ import annotations

import numpy as np
import torch

from infra.storage import Store
from poison_core.config import load_benchmark
from poison_core.experiment import craft, craft_context, defense_context, train_defended
from poison_core.seeding import derive_seed
from tasks import stages
from tests.pipeline_helpers import TINY_BENCHMARK

CPU = torch.device("cpu")


def test_both_paths_craft_the_same_poisons_and_train_the_same_victims(tmp_path):
    cfg = load_benchmark(TINY_BENCHMARK.replace("seeds: [0, 1]", "seeds: [3]"))
    store = Store(str(tmp_path / "store"))
    prefix = stages.ingest(store, cfg.dataset).key
    splits = stages.load_splits(store, prefix)
    seed, defense = 3, cfg.defenses[0]
    for attack in cfg.attacks:
        key = stages.craft(store, cfg, prefix, attack, seed).key
        stored = stages.read_poisons(store, cfg, prefix, key, splits.train)
        here = craft(cfg, attack, splits, seed, CPU)
        assert np.array_equal(stored.ids, here.ids) and np.array_equal(stored.images, here.images)
        assert np.array_equal(stored.poison_labels, here.poison_labels)

        model_key = stages.retrain(store, cfg, prefix, defense, seed, key).key
        classifier, _ = stages._load_classifier(store, cfg, model_key, splits, "cpu")
        trained = train_defended(cfg, defense, splits, seed, CPU, here).classifier
        assert np.array_equal(classifier.predict_logits(splits.test.images), trained.predict_logits(splits.test.images))


def test_the_builders_derive_the_seeds_from_the_cell_and_apply_the_poisons(tmp_path):
    cfg = load_benchmark(TINY_BENCHMARK)
    store = Store(str(tmp_path / "store"))
    prefix = stages.ingest(store, cfg.dataset).key
    splits = stages.load_splits(store, prefix)
    attack, defense = cfg.attacks[1], cfg.defenses[0]
    ctx = craft_context(cfg, attack, splits, 1, CPU)
    assert ctx.seed == derive_seed(1, "craft", attack.key) and ctx.threat == cfg.threat_for(attack)
    poison_set = craft(cfg, attack, splits, 1, CPU)
    clean, poisoned = defense_context(cfg, defense, splits, 1, CPU), defense_context(cfg, defense, splits, 1, CPU,
                                                                                     poison_set)
    assert clean.seed == poisoned.seed == derive_seed(1, "victim", defense.key) != ctx.seed
    assert clean.is_poison is None and int(poisoned.is_poison.sum()) == len(poison_set) > 0
    assert not np.array_equal(clean.train.labels, poisoned.train.labels)
