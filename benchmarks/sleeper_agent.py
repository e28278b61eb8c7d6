"""Sleeper Agent (Souri et al., NeurIPS 2022) against a victim trained from scratch on Fashion-MNIST, with
the clean victim and the random-noise control (uniform +-eps on the same target-class images), all scored
on the attack's own trigger: the attack success rate (ASR) is the share of patched source-class test images
classified as the target class. One JSON line per run on stdout, the setting as the argument:

    python3 -m benchmarks.sleeper_agent '{"n": 4000, "eps": 16, "budget": 0.05, "src": 7, "tgt": 9}'

Victims and surrogate: the width-16 ConvNet, 10 epochs SGD lr 0.05 cosine, batch 64 (surrogate seed 1,
victim seed 7); Sleeper Agent at the reference's defaults (250 steps, retraining every 50 with the victim's
recipe, max-gradient selection, Bernoulli patch of side 7 at random locations). One thread.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch

from benchmarks.efficacy import noise_like
from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.evaluation import evaluate
from poison_core.poisons import apply

log = logging.getLogger("benchmarks.sleeper_agent")


def run(cfg: dict) -> dict:
    """Clean, noise-control and Sleeper Agent victims of one setting; their clean accuracy and ASR."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=cfg.get("n", 4000), n_test=2000, seed=0))
    recipe = TrainConfig(epochs=cfg.get("epochs", 10), batch_size=64, lr=0.05)
    victim = VictimConfig(model=ModelConfig(name="convnet", width=16), train=recipe)
    start = time.perf_counter()
    surrogate = make_defense("none").fit(DefenseContext(train=splits.train, victim=victim, seed=1)).classifier.model
    params = {"source_class": cfg.get("src", 7), "target_class": cfg.get("tgt", 9), "retrain": recipe.model_dump(),
              **cfg.get("params", {})}
    threat = ThreatModel(epsilon=cfg.get("eps", 16), budget=cfg.get("budget", 0.05), clean_label=True)
    ps = make_attack("sleeper_agent", params).craft(CraftContext(train=splits.train, threat=threat, seed=0,
                                                                 surrogates=[surrogate]))
    out: dict = {"craft_s": round(time.perf_counter() - start, 1), "poisons": len(ps)}
    for arm, pset in (("clean", None), ("noise", noise_like(ps, splits.train, 3)), ("sleeper", ps)):
        data = splits.train if pset is None else apply(pset, splits.train)
        result = make_defense("none").fit(DefenseContext(train=data, victim=victim, seed=7))
        out[arm] = evaluate(result.classifier, splits.test, ps)
        log.info("%s %s", arm, out[arm])
    return {"cfg": cfg, "out": out}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    sys.stdout.write(json.dumps(run(json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))) + "\n")
