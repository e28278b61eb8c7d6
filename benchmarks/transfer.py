"""The transfer-learning victims under both head recipes: the attacks' references' (plain) and the
'Just How Toxic' benchmark's (crop and flip before the frozen extractor). Writes
``<out>/transfer.json`` and ``<out>/transfer.md``.

    python3 -m benchmarks.transfer --attacks poison_frogs convex_polytope bullseye_polytope hidden_trigger \\
        --seeds 0 1 2 3 --keys 4

The setting of ``tests/test_efficacy_bp_htb.py``: Fashion-MNIST, a width-32 ConvNet pretrained 10 epochs on
2,000 images and frozen; a disjoint 1,000-image fine-tuning set; the linear head retrained 30 epochs
(poison_core.transfer.finetune). Each poison set is crafted once and evaluated under both head recipes,
beside the no-poison head and the random-noise control of the same bases (the same recipe and seed), so
the two recipes are compared on the same poisons.

* Poison Frogs, Convex and Bullseye Polytope (the tests' params): eps 32/255, 20 poisons per key (5 % of
  the first 400 fine-tuning images), one key per victim; every crafting seed draws its own keys (a
  correctly classified test image and the extractor's runner-up class). Reported per recipe: flips over
  all keys with the Wilson interval, mean adversarial-class probability of attack / noise / clean heads.
* Hidden Trigger Backdoor (the test's params: sneaker -> ankle boot, eps 16, every target-class image of
  the fine-tuning set poisoned): one craft per seed; attack success on patched source test images.

Why both: the attacks' own references train the head without augmentation (Poison Frogs on bottleneck
features, Convex / Bullseye Polytope on a ``FeatureSet`` of precomputed features, Hidden Trigger's
``finetune_and_test.py`` on resized images); the benchmark's ``benchmark_test.py`` crops and flips
(``train_augment`` on by default). The tests assert the references' recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.efficacy import (noise_like, runner_up_keys, summarize_targeted, target_probs, targeted_cells,
                                write)
from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.defenses.base import ModelClassifier
from poison_core.evaluation import evaluate
from poison_core.models import build_model
from poison_core.poisons import PoisonSet, apply
from poison_core.training import accuracy, predict_logits, train_model
from poison_core.transfer import finetune

log = logging.getLogger("benchmarks.transfer")

PRETRAIN = TrainConfig(epochs=10, batch_size=64, lr=0.05)
HEADS = {"plain": TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=0.0),
         "augmented": TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=0.0, augment="crop-flip")}
VICTIM_SEED = 7
KEYED = {"poison_frogs": {}, "convex_polytope": {"steps": 120, "lr": 0.04, "coef_iters": 50},
         "bullseye_polytope": {"steps": 80}}
TRIGGER = {"hidden_trigger": {"source_class": 7, "target_class": 9, "patch_size": 4, "steps": 200, "lr": 0.01}}


def setup() -> tuple[torch.nn.Module, ImageDataset, ImageDataset]:
    """The frozen extractor (pretrained on 2,000 images), the 1,000 fine-tuning images it never saw, the test split."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=3000, n_test=1000, seed=0))
    order = np.random.default_rng(0).permutation(len(splits.train))
    pretrain, finetune_set = splits.train.subset(order[:2000]), splits.train.subset(order[2000:])
    extractor = build_model(ModelConfig(name="convnet", width=32), pretrain.image_shape, 10, seed=100)
    train_model(extractor, pretrain, PRETRAIN, device="cpu", seed=100)
    return extractor.eval(), finetune_set, splits.test


def head(extractor: torch.nn.Module, data: ImageDataset, poison: PoisonSet | None, recipe: str) -> torch.nn.Module:
    """The transfer victim: `extractor` frozen, its head retrained on `data` (poisoned when given) with `recipe`."""
    return finetune(extractor, data if poison is None else apply(poison, data), HEADS[recipe], device="cpu",
                    seed=VICTIM_SEED)


def run_keyed(attack: str, seeds: list[int], n_keys: int, extractor, finetune_set, test) -> list[dict[str, Any]]:
    """One entry per head recipe: every key's attack, noise and clean heads (one key per victim)."""
    train = finetune_set.subset(np.arange(400))
    clean = {r: head(extractor, train, None, r) for r in HEADS}
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in HEADS}
    for seed in seeds:
        for i, key in enumerate(runner_up_keys([extractor], test, n_keys, seed=1000 + seed, distinct=False)):
            selection = TargetSelection(mode="fixed", target_ids=(key[0],), adversarial_class=key[1])
            threat = ThreatModel(epsilon=32, budget=0.05, clean_label=True, targets=selection)
            start = time.perf_counter()
            ps = make_attack(attack, KEYED[attack]).craft(CraftContext(train=train, test=test, threat=threat,
                                                                       seed=10_000 * seed + i, surrogates=[extractor]))
            craft_s = round(time.perf_counter() - start, 2)
            arms = {"attack": ps, "noise": noise_like(ps, train, 10_000 * seed + i)}
            for recipe in HEADS:
                row = {"seed": seed, "key": list(key), "craft_s": craft_s,
                       "clean_prob": float(target_probs(clean[recipe], test, [key])[0])}
                for arm, poison in arms.items():
                    model = head(extractor, train, poison, recipe)
                    pos = test.positions(np.array([key[0]]))
                    flipped = bool(predict_logits(model, test.images[pos], device="cpu").argmax(1)[0] == key[1])
                    row.update({f"{arm}_prob": float(target_probs(model, test, [key])[0]), f"{arm}_success": flipped,
                                f"{arm}_clean_acc": accuracy(model, test, device="cpu")})
                rows[recipe].append(row)
                log.info("%s %s seed %d key %s: row %s", attack, recipe, seed, key, json.dumps(row))
    return [{"setting": {"attack": attack, "params": KEYED[attack], "eps": 32, "budget": 0.05, "keys_per_seed": n_keys,
                         "seeds": seeds, "head": recipe},
             "clean_victim_acc": accuracy(clean[recipe], test, device="cpu"), "rows": rows[recipe],
             "summary": summarize_targeted(rows[recipe])} for recipe in HEADS]


def run_trigger(attack: str, seeds: list[int], extractor, finetune_set, test) -> list[dict[str, Any]]:
    """One entry per head recipe: ASR on patched source test images for each seed's attack, noise and clean heads."""
    threat = ThreatModel(epsilon=16, budget=0.1, clean_label=True)
    clean = {r: head(extractor, finetune_set, None, r) for r in HEADS}
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in HEADS}
    for seed in seeds:
        start = time.perf_counter()
        ps = make_attack(attack, TRIGGER[attack]).craft(CraftContext(train=finetune_set, threat=threat, seed=seed,
                                                                     surrogates=[extractor]))
        craft_s = round(time.perf_counter() - start, 1)
        arms = {"attack": ps, "noise": noise_like(ps, finetune_set, seed)}
        for recipe in HEADS:
            models = {"clean": clean[recipe], **{a: head(extractor, finetune_set, p, recipe) for a, p in arms.items()}}
            result = {a: evaluate(ModelClassifier(m, torch.device("cpu")), test, ps) for a, m in models.items()}
            row = {"seed": seed, "craft_s": craft_s, **{f"{a}_asr": r["asr"] for a, r in result.items()},
                   **{f"{a}_clean_acc": r["clean_acc"] for a, r in result.items()}}
            rows[recipe].append(row)
            log.info("%s %s seed %d: row %s", attack, recipe, seed, json.dumps(row))
    out = []
    for recipe in HEADS:
        summary = {f"{a}_asr": {"mean": float(np.mean([r[f"{a}_asr"] for r in rows[recipe]])),
                                "std": float(np.std([r[f"{a}_asr"] for r in rows[recipe]], ddof=1)) if len(seeds) > 1 else 0.0}
                   for a in ("attack", "noise", "clean")}
        out.append({"setting": {"attack": attack, "params": TRIGGER[attack], "eps": 16, "budget": 0.1, "seeds": seeds,
                                "head": recipe}, "rows": rows[recipe], "summary": summary})
    return out


def setting_id(entry: dict[str, Any]) -> str:
    s = entry["setting"]
    return f"{s['attack']}:{s['head']}:{json.dumps(s['params'], sort_keys=True)}"


def render(entries: list[dict[str, Any]]) -> str:
    lines = ["# Transfer-learning victims: the references' head and the benchmark's augmented head", "",
             "`python3 -m benchmarks.transfer` (see its docstring). Frozen width-32 ConvNet, linear head retrained.", "",
             "## Feature collision (eps 32, 20 poisons per key, one key per victim)", "",
             "| attack | head | seeds x keys | flips [Wilson 95 %] | noise flips | adv prob (attack / noise / clean) | "
             "per-seed adv prob | keys above noise | clean acc (attack / clean head) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if "keys_per_seed" not in e["setting"]:
            continue
        lines.append(f"| {e['setting']['attack']} | {e['setting']['head']} | {targeted_cells(e)}")
    lines += ["", "## Hidden Trigger Backdoor (eps 16, 10 %; ASR on patched source test images)", "",
              "| head | seeds | ASR attack (mean +- std) | noise | clean head | per seed (attack / noise / clean) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if "keys_per_seed" in e["setting"]:
            continue
        s, m = e["setting"], e["summary"]
        per = "; ".join(f"{r['attack_asr']:.2f} / {r['noise_asr']:.2f} / {r['clean_asr']:.2f}" for r in e["rows"])
        lines.append(f"| {s['head']} | {', '.join(map(str, s['seeds']))} | {m['attack_asr']['mean']:.3f} +- "
                     f"{m['attack_asr']['std']:.3f} | {m['noise_asr']['mean']:.3f} | {m['clean_asr']['mean']:.3f} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=sorted({**KEYED, **TRIGGER}), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--keys", type=int, default=4, help="keys per crafting seed (feature-collision attacks)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    extractor, finetune_set, test = setup()
    for attack in args.attacks:
        if attack in KEYED:
            entries = run_keyed(attack, args.seeds, args.keys, extractor, finetune_set, test)
        else:
            entries = run_trigger(attack, args.seeds, extractor, finetune_set, test)
        write(entries, args.out, "transfer", setting_id, render)


if __name__ == "__main__":
    main()
