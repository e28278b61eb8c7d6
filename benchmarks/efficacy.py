"""Efficacy over crafting seeds (after the reference-fidelity fixes): every attack against the no-poison victim and random noise
of the same epsilon, with the spread over seeds. Writes ``<out>/efficacy.json`` (merged across runs,
one entry per setting) and ``<out>/efficacy.md``.

    python3 -m benchmarks.efficacy targeted --attack witches_brew --seeds 0 1 2 3 --keys 5 --eps 16 --budget 0.01
    python3 -m benchmarks.efficacy availability --attacks error_min_sample error_min_class tue --seeds 0 1 2 3
    python3 -m benchmarks.efficacy availability --recipe augmented --attacks error_min_class_subset random_noise_class

``targeted`` is the from-scratch setting of ``tests/test_efficacy_targeted.py`` (Fashion-MNIST, 2,000
training images, width-16 ConvNet trained 10 epochs, two surrogates trained with seeds the victim does
not use), one key per victim: every crafting seed draws its own keys (a correctly classified test image
and the surrogates' runner-up class, Witches' Brew's and MetaPoison's clean-label setting), crafts them
with its own seed and trains, per key, a victim on the poisoned set and one on the random-noise control
of the same bases. Reported: success (the target classified as the adversarial class) over all keys
with its Wilson interval, and the adversarial-class probability of the attack, control and clean
victims, per seed and pooled. The feature-collision attacks (Poison Frogs, Convex and Bullseye Polytope,
with configs/fashion-mnist-targeted.yaml's settings) run in the same from-scratch setting, as in
Schwarzschild et al., "Just How Toxic is Data Poisoning?", ICML 2021 (training from scratch).

``availability`` is the setting of ``tests/test_efficacy_availability.py`` (8,000 / 2,000 images, eps
8/255, 100 % coverage, width-16 ConvNet trained 8 epochs; clean victim seed 1, poisoned victims seed 2):
the poisoned victim's test accuracy for each crafting seed.

Everything runs on one thread (the tests' setting; sample-wise error-minimising noise moves with the
floating-point path). Nothing here is asserted: the tests' bars are set from these numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.metrics import wilson_interval
from poison_core.models import build_model
from poison_core.poisons import PoisonSet, apply
from poison_core.training import accuracy, predict_logits, train_model

log = logging.getLogger("benchmarks.efficacy")

SCRATCH = TrainConfig(epochs=10, batch_size=64, lr=0.05)
AVAILABILITY = TrainConfig(epochs=8, batch_size=64, lr=0.05)
VICTIM = ModelConfig(name="convnet", width=16)
VICTIM_SEED = 7
TARGETED = {
    "witches_brew": {"steps": 100, "restarts": 1, "augment": False},
    "metapoison": {"steps": 16, "n_models": 2, "stagger_epochs": 2, "epoch_batches": 4, "drop_period": 6,
                   "lr": 0.05, "batch_size": 64, "warm_start": True},
    "poison_frogs": {"steps": 200, "lr": 0.1},  # configs/fashion-mnist-targeted.yaml's settings
    "convex_polytope": {"steps": 200, "lr": 0.04, "coef_iters": 50},
    "bullseye_polytope": {"steps": 200, "lr": 0.04},
}
AVAILABILITY_ATTACKS = {
    "error_min_sample": ("error_min", {"mode": "sample", "width": 8, "steps": 2, "max_rounds": 40}),
    "error_min_class": ("error_min", {"mode": "class", "width": 8, "steps": 5, "max_rounds": 30}),
    "error_min_class_subset": ("error_min", {"mode": "class", "width": 8, "steps": 1, "stop_accuracy": 0.9,
                                             "subset": 0.2, "max_rounds": 30}),
    "unlearnable_clusters": ("unlearnable_clusters", {}),
    "tue": ("tue", {}),
    "synthetic_noise": ("synthetic_noise", {}),
    "random_noise": ("random_noise", {}),
    "random_noise_class": ("random_noise", {"mode": "class"}),
}
RECIPES = {"plain": {}, "augmented": {"augment": "crop-flip"}}
AUGMENTED_CRAFT = {"witches_brew": {"augment": True}}
"""Crafting params that follow the victims' recipe under `--recipe augmented`: Witches' Brew crafts through
differentiable crop/flip when the victims augment (forest's default; configs/fashion-mnist-targeted.yaml)."""
"""`--recipe`: the victims' recipe; 'augmented' is the shipped configs' (random crop of the 2-px zero-padded
image and horizontal flip, forest's MNIST setting; poison_core.augmentation)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def runner_up_keys(models: list, test: ImageDataset, n: int, seed: int, distinct: bool) -> list[tuple[int, int]]:
    """n (target id, adversarial class): test images the models classify correctly, with their
    runner-up class (a plausible class, the attacker's choice), in a seeded random order."""
    probs = sum(softmax(predict_logits(m, test.images, device="cpu")) for m in models)
    keys: list[tuple[int, int]] = []
    for pos in np.random.default_rng(seed).permutation(len(test)):
        order = np.argsort(probs[pos])
        if order[-1] != test.labels[pos] or (distinct and int(order[-2]) in {a for _, a in keys}):
            continue
        keys.append((int(test.ids[pos]), int(order[-2])))
        if len(keys) == n:
            return keys
    raise ValueError(f"only {len(keys)} eligible targets")


def noise_like(ps: PoisonSet, train: ImageDataset, seed: int) -> PoisonSet:
    """The random-noise control: uniform integer noise in [-eps, eps] on the same base images."""
    eps = ps.threat.epsilon
    clean = train.images[train.positions(ps.ids)].astype(np.int16)
    noise = np.random.default_rng(seed).integers(-eps, eps + 1, size=clean.shape)
    return PoisonSet(ids=ps.ids, images=np.clip(clean + noise, 0, 255).astype(np.uint8), orig_labels=ps.orig_labels,
                     poison_labels=ps.poison_labels, threat=ps.threat, n_train=ps.n_train, targets=ps.targets)


def target_probs(model: torch.nn.Module, test: ImageDataset, keys: list[tuple[int, int]]) -> np.ndarray:
    """The adversarial-class probability of each key's target under `model`."""
    pos = test.positions(np.array([k[0] for k in keys]))
    probs = softmax(predict_logits(model, test.images[pos], device="cpu"))
    return probs[np.arange(len(keys)), [k[1] for k in keys]]


def fit(train: ImageDataset, recipe: TrainConfig, seed: int) -> torch.nn.Module:
    model = build_model(VICTIM, train.image_shape, train.num_classes, seed=seed)
    train_model(model, train, recipe, device="cpu", seed=seed)
    return model.eval()


def run_targeted(attack: str, seeds: list[int], n_keys: int, eps: int, budget: float,
                 params: dict[str, Any], recipe: str = "plain") -> dict[str, Any]:
    """One key per victim, `n_keys` keys per crafting seed (see the module docstring). `recipe` is the
    surrogates' and victims' (configs/fashion-mnist-targeted.yaml trains both with crop-flip)."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=2000, n_test=1000, seed=0))
    train, test = splits.train, splits.test
    scratch = SCRATCH.model_copy(update=RECIPES[recipe])
    surrogates = [fit(train, scratch, seed) for seed in (100, 101)]
    clean = fit(train, scratch, VICTIM_SEED)
    clean_acc = accuracy(clean, test, device="cpu")
    rows = []
    for seed in seeds:
        for i, key in enumerate(runner_up_keys(surrogates, test, n_keys, seed=1000 + seed, distinct=False)):
            threat = ThreatModel(epsilon=eps, budget=budget, clean_label=True,
                                 targets=TargetSelection(mode="fixed", target_ids=(key[0],), adversarial_class=key[1]))
            start = time.perf_counter()
            ps = make_attack(attack, params).craft(CraftContext(train=train, test=test, threat=threat,
                                                                seed=10_000 * seed + i, surrogates=surrogates))
            row = {"seed": seed, "key": list(key), "craft_s": round(time.perf_counter() - start, 2),
                   "clean_prob": float(target_probs(clean, test, [key])[0])}
            for arm, poison in (("attack", ps), ("noise", noise_like(ps, train, 10_000 * seed + i))):
                model = fit(apply(poison, train), scratch, VICTIM_SEED)
                prob = float(target_probs(model, test, [key])[0])
                pos = test.positions(np.array([key[0]]))
                flipped = bool(predict_logits(model, test.images[pos], device="cpu").argmax(1)[0] == key[1])
                row.update({f"{arm}_prob": prob, f"{arm}_success": flipped,
                            f"{arm}_clean_acc": accuracy(model, test, device="cpu")})
            rows.append(row)
            log.info("%s seed %d key %s: adv prob %.3f (noise %.3f, clean %.3f), success %s; row %s", attack, seed,
                     key, row["attack_prob"], row["noise_prob"], row["clean_prob"], row["attack_success"],
                     json.dumps(row))  # the whole row: a run stopped early is recoverable from its log
    return {"setting": {"attack": attack, "params": params, "eps": eps, "budget": budget, "keys_per_seed": n_keys,
                        "seeds": seeds, "train": 2000, "victim": "convnet width 16, 10 epochs from scratch",
                        **({"recipe": recipe} if recipe != "plain" else {})},
            "clean_victim_acc": clean_acc, "rows": rows, "summary": summarize_targeted(rows)}


def summarize_targeted(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def arm(name: str, subset: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"adv_prob": float(np.mean([r[f"{name}_prob"] for r in subset]))}
        if name != "clean":
            k, n = sum(r[f"{name}_success"] for r in subset), len(subset)
            out.update(success=k, n=n, wilson=list(wilson_interval(k, n)),
                       clean_acc=float(np.mean([r[f"{name}_clean_acc"] for r in subset])))
        return out

    per_seed = {}
    for seed in sorted({r["seed"] for r in rows}):
        subset = [r for r in rows if r["seed"] == seed]
        per_seed[str(seed)] = {a: arm(a, subset) for a in ("attack", "noise", "clean")}
    above = sum(r["attack_prob"] > r["noise_prob"] for r in rows)
    probs = [v["attack"]["adv_prob"] for v in per_seed.values()]
    return {"pooled": {a: arm(a, rows) for a in ("attack", "noise", "clean")}, "per_seed": per_seed,
            "keys_above_noise": int(above), "seed_adv_prob_range": [float(min(probs)), float(max(probs))]}


def run_availability(names: list[str], seeds: list[int], recipe: str = "plain") -> list[dict[str, Any]]:
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=8000, n_test=2000, seed=0))
    train_cfg = AVAILABILITY.model_copy(update=RECIPES[recipe])
    clean = fit(splits.train, train_cfg, 1)
    clean_acc = accuracy(clean, splits.test, device="cpu")
    results = []
    for key in names:
        attack, params = AVAILABILITY_ATTACKS[key]
        values, crafts, provenance = [], [], []
        for seed in seeds:
            start = time.perf_counter()
            ctx = CraftContext(train=splits.train, threat=ThreatModel(epsilon=8, budget=1.0, clean_label=True),
                               seed=seed, surrogates=[clean])
            ps = make_attack(attack, params).craft(ctx)
            crafts.append(round(time.perf_counter() - start, 1))
            values.append(accuracy(fit(apply(ps, splits.train), train_cfg, 2), splits.test, device="cpu"))
            provenance.append({k: v for k, v in ps.provenance.items() if k in ("stop_criterion_met", "rounds")})
            log.info("%s seed %d: victim accuracy %.4f (clean %.4f), craft %.0fs", key, seed, values[-1], clean_acc,
                     crafts[-1])
        results.append({"setting": {"attack": key, "name": attack, "params": params, "eps": 8, "budget": 1.0,
                                    "seeds": seeds, "train": 8000, "victim": "convnet width 16, 8 epochs",
                                    **({"recipe": recipe} if recipe != "plain" else {})},
                        "clean_victim_acc": clean_acc, "victim_acc": values, "craft_s": crafts,
                        "provenance": provenance,
                        "summary": {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                                    if len(values) > 1 else 0.0, "min": float(min(values)), "max": float(max(values))}})
    return results


def setting_id(entry: dict[str, Any]) -> str:
    s = entry["setting"]
    kind = "targeted" if "keys_per_seed" in s else "availability"
    recipe = f":{s['recipe']}" if "recipe" in s else ""
    return f"{kind}:{s['attack']}:eps{s['eps']}:budget{s['budget']}:{json.dumps(s['params'], sort_keys=True)}{recipe}"


def write(entries: list[dict[str, Any]], out: Path, name: str = "efficacy",
          key: Callable[[dict[str, Any]], str] = setting_id,
          render_md: Callable[[list[dict[str, Any]]], str] | None = None) -> None:
    """Merge `entries` into <out>/<name>.json (same `key`: replaced) and render <name>.md with `render_md`
    (this module's table by default)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    stored = json.loads(path.read_text()) if path.exists() else []
    merged = {key(e): e for e in stored}
    merged.update({key(e): e for e in entries})
    path.write_text(json.dumps(list(merged.values()), indent=1) + "\n")
    (out / f"{name}.md").write_text((render_md or render)(list(merged.values())))


def targeted_cells(e: dict[str, Any]) -> str:
    """A targeted entry's table cells from 'seeds x keys' on: success with its Wilson interval, noise
    success, adv prob of attack / noise / clean, per-seed adv prob, keys above noise, clean accuracy."""
    s, p = e["setting"], e["summary"]["pooled"]
    a, nz, cl = p["attack"], p["noise"], p["clean"]
    seeds = ", ".join(f"{v['attack']['adv_prob']:.2f}" for v in e["summary"]["per_seed"].values())
    return (f"{len(s['seeds'])} x {s['keys_per_seed']} | "
            f"{a['success']}/{a['n']} [{a['wilson'][0]:.2f}, {a['wilson'][1]:.2f}] | {nz['success']}/{nz['n']} | "
            f"{a['adv_prob']:.3f} / {nz['adv_prob']:.3f} / {cl['adv_prob']:.3f} | {seeds} | "
            f"{e['summary']['keys_above_noise']}/{a['n']} | {a['clean_acc']:.3f} / {e['clean_victim_acc']:.3f} |")


def render(entries: list[dict[str, Any]]) -> str:
    lines = ["# Efficacy over crafting seeds", "", "`python3 -m benchmarks.efficacy` (see its docstring).", "",
             "## Targeted, from scratch (one key per victim)", "",
             "| attack | eps | budget/key | seeds x keys | success [Wilson 95 %] | noise | adv prob (attack / noise / "
             "clean) | per-seed adv prob | keys above noise | clean acc (attack / clean victim) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if "keys_per_seed" not in e["setting"]:
            continue
        s = e["setting"]
        label = f"{s['attack']} ({s['recipe']})" if "recipe" in s else s["attack"]
        lines.append(f"| {label} | {s['eps']} | {s['budget']:.0%} | {targeted_cells(e)}")
    lines += ["", "## Availability (victim test accuracy; lower is a stronger attack)", "",
              "| attack | seeds | per seed | mean +- std | clean victim | craft s |", "| --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        if "keys_per_seed" in e["setting"]:
            continue
        s, m = e["setting"], e["summary"]
        lines.append(f"| {s['attack']}{' (' + s['recipe'] + ')' if 'recipe' in s else ''} | "
                     f"{', '.join(map(str, s['seeds']))} | "
                     f"{', '.join(f'{v:.3f}' for v in e['victim_acc'])} | {m['mean']:.3f} +- {m['std']:.3f} | "
                     f"{e['clean_victim_acc']:.3f} | {', '.join(f'{v:.0f}' for v in e['craft_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    targeted = sub.add_parser("targeted")
    targeted.add_argument("--attack", choices=sorted(TARGETED), required=True)
    targeted.add_argument("--keys", type=int, default=5, help="keys per crafting seed")
    targeted.add_argument("--eps", type=int, default=16)
    targeted.add_argument("--budget", type=float, default=0.01)
    targeted.add_argument("--params", default="{}", help="JSON merged over the attack's default params")
    targeted.add_argument("--recipe", choices=sorted(RECIPES), default="plain",
                          help="the surrogates' and victims' recipe: plain, or augmented (random crop + flip); "
                               "augmented also turns Witches' Brew's differentiable crop/flip on, as forest does")
    availability = sub.add_parser("availability")
    availability.add_argument("--attacks", nargs="+", choices=sorted(AVAILABILITY_ATTACKS), required=True)
    availability.add_argument("--recipe", choices=sorted(RECIPES), default="plain",
                              help="the victims' recipe: plain, or augmented (random crop + flip)")
    for p in (targeted, availability):
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
        p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    if args.kind == "targeted":
        craft = AUGMENTED_CRAFT.get(args.attack, {}) if args.recipe == "augmented" else {}
        params = {**TARGETED[args.attack], **craft, **json.loads(args.params)}
        entries = [run_targeted(args.attack, args.seeds, args.keys, args.eps, args.budget, params, args.recipe)]
    else:
        entries = run_availability(args.attacks, args.seeds, args.recipe)
    write(entries, args.out)


if __name__ == "__main__":
    main()
