"""Efficacy of the targeted clean-label attacks on Fashion-MNIST subsets, against two controls.

Every attack is compared, key by key, with the no-poison victim (same recipe and seed) and with
the random-noise control (i.i.d. uniform integer noise in [-eps, eps] on the *same* base images), as
docs/design.md's "Evaluating targeted attacks honestly" asks: the success rate over N poison keys with
its Wilson interval, and the mean adversarial-class probability on the target (continuous effect
size). Keys: test images the attacker's model(s) classify correctly, each with the runner-up class
of those models as its adversarial class (a plausible class, the attacker's choice, set through the
`fixed` target mode), poisons drawn from that class with their labels kept. Run with
``-o log_cli=true --log-cli-level=INFO`` to see the numbers.

* Transfer learning (Poison Frogs, Convex Polytope; their papers' threat model): a ConvNet (width 32,
  128 features) pretrained on 2,000 images is frozen and only its linear head is retrained on a
  disjoint 400-image fine-tuning set (poison_core.transfer.finetune); eps 32/255, 5 % of the
  fine-tuning set (20 poisons) per key, 12 keys, one victim per key and arm. Measured: Poison Frogs
  with its default (the benchmark's) rule 3/12 flips (Wilson 95 % [0.09, 0.53]), adv prob 0.224 (see
  its test); with the paper's rule 3/12, adv prob 0.42 (reference step rejection and watermark 0.3;
  5/12 before); Convex Polytope 3/12 ([0.09, 0.53]), 0.245 (reference lr; 0.32 with a 5x larger step);
  clean victim 0/12, adv prob 0.08; noise 0/12, 0.08. Also measured (10 other keys): Poison Frogs at
  eps 16 flipped 3/10 (adv prob 0.30 vs 0.05 noise); with a random adversarial class instead of the
  runner-up, 2/10 at eps 32.
* Training from scratch (Witches' Brew, MetaPoison): a ConvNet (width 16) trained 10 epochs on 2,000
  images with a seed the attacker does not use; two surrogates trained the same way (seeds 100, 101).
  Witches' Brew (100 steps, 1 restart, no augmentation) is run one key per victim: 8 keys, eps 32/255,
  5 % of the training set (100 poisons) per key, and each key's noise control trains its own victim.
  Measured with forest's step rule and Gaussian start (reference fidelity): adv prob raised over the noise
  control on 8/8 keys, mean 0.272 vs 0.096 noise and 0.144 clean; flips 2/8 (Wilson [0.07, 0.59]) vs
  0/8 and 0/8; clean accuracy 0.805 vs 0.801 noise, 0.807 clean. An earlier measurement, with lr
  tau * eps and a uniform start: 8/8 keys, 0.395 vs 0.137 and 0.210; flips 3/8 vs 0/8 and 1/8. Also
  measured (8 keys each): 2 % per key 2/8, adv prob 0.306 vs 0.182 noise; 2 % with 250 steps and 2
  restarts no better on the first 5 keys; 5 % with differentiable augmentation 2/8, 0.244 (the victim
  does not augment); 4 surrogates 1/8, 0.248 vs 0.066 noise (other keys). Five keys poisoned at once
  in one victim (2 % each) gave 2/5 vs 1/5. MetaPoison, scaled to CPU (2-4 models, 16-40 craft
  steps, unrolled batches mixed or poisons-only, 2-5 % per key), optimises its unrolled objective but
  moved no victim beyond the noise control in any setting tried (per key at 5 %: adv prob 0.14 vs
  0.15 noise), so only that, and clean accuracy, are asserted for it, on three keys poisoned at once.
  With the reference's epoch sweep, CW loss over stages and clean ensemble trajectory (reference fidelity) a
  five-key run measured adv prob 0.216 vs 0.148 noise and 0.150 clean (above noise on 5/5 keys), 1/5
  flips vs 0/5, clean acc 0.797 vs 0.807; unrolled CW loss 1.34 vs 1.91 for the noise control (4 batch
  draws). The test's three keys (40 % less crafting than its earlier five): adv prob 0.277 vs 0.236 noise and
  0.252 clean, 1/3 flips for every arm (the third key is already 0.51 on the clean victim), clean acc
  0.807 vs 0.806; unrolled CW loss 0.96 vs 1.36 (2 draws). The test no longer trains that noise-control
  victim (nothing was asserted on it); the unrolled-loss control stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.efficacy import noise_like, runner_up_keys, softmax
from poison_core.attacks import CraftContext, make_attack
from poison_core.perturbation import delta_of
from poison_core.attacks.metapoison import MetaPoisonParams, MetaPoisonWorker
from poison_core.config import DatasetConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import load_dataset
from poison_core.data.dataset import ImageDataset
from poison_core.metrics import wilson_interval
from poison_core.models import build_model
from poison_core.poisons import PoisonSet, apply
from poison_core.training import accuracy, predict_logits, train_model
from poison_core.transfer import extract_features, finetune

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")]
log = logging.getLogger(__name__)

HEAD = TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=0.0)
SCRATCH = TrainConfig(epochs=10, batch_size=64, lr=0.05)
VICTIM_SEED = 7
N_TRANSFER = 12


@dataclass
class Arm:
    """One victim's result on every key: adversarial-class probability, success, clean accuracy."""

    adv_prob: np.ndarray
    success: np.ndarray
    clean_acc: float

    def line(self, name: str) -> str:
        k, n = int(self.success.sum()), len(self.success)
        low, high = wilson_interval(k, n)
        return (f"{name}: success {k}/{n} (Wilson 95% [{low:.2f}, {high:.2f}]), mean adv prob "
                f"{self.adv_prob.mean():.3f}, clean acc {self.clean_acc:.3f}")






def craft(name: str, params: dict, train: ImageDataset, test: ImageDataset, models: list, key: tuple[int, int],
          eps: int, budget: float, seed: int) -> PoisonSet:
    threat = ThreatModel(epsilon=eps, budget=budget, clean_label=True,
                         targets=TargetSelection(mode="fixed", target_ids=(key[0],), adversarial_class=key[1]))
    return make_attack(name, params).craft(CraftContext(train=train, test=test, threat=threat, seed=seed,
                                                        surrogates=models))




def merge(sets: list[PoisonSet]) -> PoisonSet:
    """Several keys' poison sets as one (disjoint ids, budgets added)."""
    first = sets[0]
    threat = first.threat.model_copy(update={"budget": min(1.0, sum(s.threat.budget for s in sets))})
    targets = {"kind": "targeted", "target_ids": [i for s in sets for i in s.targets["target_ids"]],
               "adversarial_classes": [a for s in sets for a in s.targets["adversarial_classes"]]}
    return PoisonSet(ids=np.concatenate([s.ids for s in sets]), images=np.concatenate([s.images for s in sets]),
                     orig_labels=np.concatenate([s.orig_labels for s in sets]),
                     poison_labels=np.concatenate([s.poison_labels for s in sets]), threat=threat,
                     n_train=first.n_train, targets=targets)


def measure(model: torch.nn.Module, test: ImageDataset, keys: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    pos = test.positions(np.array([k[0] for k in keys]))
    adv = np.array([k[1] for k in keys])
    probs = softmax(predict_logits(model, test.images[pos], device="cpu"))
    return probs[np.arange(len(keys)), adv], probs.argmax(axis=1) == adv


@pytest.fixture(scope="module")
def transfer_setup(one_thread):
    """A feature extractor pretrained on 2,000 images, a disjoint 400-image fine-tuning set, 12 keys, and the
    control victims the attacks share (the clean head, each key's noise control: the attacks draw the same bases)."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=2400, n_test=1000, seed=0))
    order = np.random.default_rng(0).permutation(len(splits.train))
    pretrain, train = splits.train.subset(order[:2000]), splits.train.subset(order[2000:])
    extractor = build_model(ModelConfig(name="convnet", width=32), pretrain.image_shape, 10, seed=100)
    train_model(extractor, pretrain, SCRATCH, device="cpu", seed=100)
    keys = runner_up_keys([extractor], splits.test, N_TRANSFER, seed=1, distinct=False)
    test_features = extract_features(extractor, splits.test.images, device="cpu")
    return extractor.eval(), train, splits.test, keys, test_features, {}


def run_transfer(name: str, params: dict, transfer_setup, eps: int = 32, budget: float = 0.05) -> dict[str, Arm]:
    extractor, train, test, keys, test_features, controls = transfer_setup
    positions = test.positions(np.array([k[0] for k in keys]))

    def score(model: torch.nn.Module, key_index: int) -> tuple[float, bool, float]:
        """The head on the frozen body's test features: target's adv prob, success, clean accuracy."""
        with torch.no_grad():
            probs = torch.softmax(model.head(test_features), dim=1).numpy()
        adv, target = keys[key_index][1], positions[key_index]
        accuracy_ = float(np.mean(probs.argmax(1) == test.labels))
        return float(probs[target, adv]), bool(probs[target].argmax() == adv), accuracy_

    def victim(poison: PoisonSet | None) -> torch.nn.Module:
        data = train if poison is None else apply(poison, train)
        return finetune(extractor, data, HEAD, device="cpu", seed=VICTIM_SEED)

    if ("clean",) not in controls:
        controls[("clean",)] = victim(None)
    clean = controls[("clean",)]
    rows: dict[str, list] = {"clean": [], "noise": [], "attack": []}
    for i, key in enumerate(keys):
        ps = craft(name, params, train, test, [extractor], key, eps, budget, seed=1000 + i)
        rows["clean"].append(score(clean, i))
        noise_key = ("noise", i, eps, ps.ids.tobytes())
        if noise_key not in controls:
            controls[noise_key] = victim(noise_like(ps, train, i))
        rows["noise"].append(score(controls[noise_key], i))
        rows["attack"].append(score(victim(ps), i))
    result = {arm: Arm(np.array([r[0] for r in v]), np.array([r[1] for r in v]), float(np.mean([r[2] for r in v])))
              for arm, v in rows.items()}
    for arm, value in result.items():
        log.info("%s transfer eps %d budget %.2f %s", name, eps, budget, value.line(arm))
    return result


def assert_decisive(result: dict[str, Arm], min_margin: int, min_ratio: float = 3.0) -> None:
    clean, noise, attack = result["clean"], result["noise"], result["attack"]
    assert attack.success.sum() >= max(clean.success.sum(), noise.success.sum()) + min_margin, attack.line("attack")
    assert attack.adv_prob.mean() >= min_ratio * max(clean.adv_prob.mean(), noise.adv_prob.mean())
    assert attack.clean_acc >= clean.clean_acc - 0.02


def test_poison_frogs_on_transfer_learning(transfer_setup):
    # The attack's defaults: under this L-inf bound its 'auto' rule is the benchmark's (aks2203/
    # poisoning-benchmark craft_poisons_fc.py: projected descent, no beta, 120 steps at 0.001). Measured
    # over two key draws (runner_up_keys seed 1, this test's, and seed 2; 12 keys each): 3/12 and 2/12
    # flips vs 0/12 for the clean victim and the noise control in both; adv prob 0.224 vs 0.082 clean,
    # 0.074 noise (2.7x) and 0.240 vs 0.055, 0.046 (4.4x); clean acc 0.815 vs 0.817, 0.811 vs 0.817.
    # The paper's rule (beta step, 100 steps at 0.1, `rule: paper`) measured 3/12, adv prob 0.42 here.
    assert_decisive(run_transfer("poison_frogs", {}, transfer_setup), min_margin=2, min_ratio=2.5)


def test_convex_polytope_on_transfer_learning(transfer_setup):
    # lr 0.04 in the reference's normalised units (0.008 per pixel; it was 0.04 per pixel):
    # measured 3/12 flips, adv prob 0.245 vs 0.085 clean (2.9x) at 120 steps and 0.244 at 600 steps
    # (converged), so the ratio bar is 2.5x here (0.32, 3.8x, with the former 5x larger step).
    params = {"steps": 120, "lr": 0.04, "coef_iters": 50}
    assert_decisive(run_transfer("convex_polytope", params, transfer_setup), min_margin=3, min_ratio=2.5)


@pytest.fixture(scope="module")
def scratch_setup(one_thread):
    """2,000 training images, two surrogates, three keys with distinct adversarial classes, the clean victim."""
    splits = load_dataset(DatasetConfig(name="fashion-mnist", n_train=2000, n_test=1000, seed=0))
    surrogates = []
    for seed in (100, 101):
        model = build_model(ModelConfig(name="convnet", width=16), splits.train.image_shape, 10, seed=seed)
        train_model(model, splits.train, SCRATCH, device="cpu", seed=seed)
        surrogates.append(model.eval())
    keys = runner_up_keys(surrogates, splits.test, 3, seed=0, distinct=True)
    clean = scratch_victim(splits.train)
    arm = Arm(*measure(clean, splits.test, keys), accuracy(clean, splits.test, device="cpu"))
    return splits.train, splits.test, surrogates, keys, arm, {"clean_model": clean}


def scratch_victim(train: ImageDataset) -> torch.nn.Module:
    model = build_model(ModelConfig(name="convnet", width=16), train.image_shape, 10, seed=VICTIM_SEED)
    train_model(model, train, SCRATCH, device="cpu", seed=VICTIM_SEED)
    return model.eval()


def run_scratch(name: str, params: dict, scratch_setup, eps: int = 32,
                budget: float = 0.02) -> tuple[dict[str, Arm], list[PoisonSet]]:
    """Craft each key, train one victim on all the keys' poisons at once; the clean victim is the shared
    one of scratch_setup."""
    train, test, surrogates, keys, clean, _ = scratch_setup
    sets = [craft(name, params, train, test, surrogates, key, eps, budget, seed=2000 + i) for i, key in enumerate(keys)]
    model = scratch_victim(apply(merge(sets), train))
    result = {"clean": clean, "attack": Arm(*measure(model, test, keys), accuracy(model, test, device="cpu"))}
    for arm, value in result.items():
        log.info("%s from scratch eps %d budget %.2f/key %s (per key %s)", name, eps, budget, value.line(arm),
                 [round(float(v), 3) for v in value.adv_prob])
    return result, sets


def assert_effect(result: dict[str, Arm], factor: float, min_keys: int) -> None:
    clean, noise, attack = result["clean"], result["noise"], result["attack"]
    assert attack.adv_prob.mean() >= factor * max(noise.adv_prob.mean(), clean.adv_prob.mean()), attack.line("attack")
    assert int((attack.adv_prob > noise.adv_prob).sum()) >= min_keys
    assert attack.success.sum() >= noise.success.sum()
    assert attack.clean_acc >= clean.clean_acc - 0.03


def run_scratch_per_key(name: str, params: dict, scratch_setup, eps: int = 32, budget: float = 0.05,
                        n_keys: int = 8) -> dict[str, Arm]:
    """One key per victim: each key's poisons, and separately their random-noise control, are the only
    changes to the training set of their victim (same recipe and seed as the clean victim)."""
    train, test, surrogates = scratch_setup[:3]
    keys = runner_up_keys(surrogates, test, n_keys, seed=0, distinct=False)
    rows: dict[str, list] = {"noise": [], "attack": []}
    for i, key in enumerate(keys):
        ps = craft(name, params, train, test, surrogates, key, eps, budget, seed=2000 + i)
        for arm, poison in (("noise", noise_like(ps, train, i)), ("attack", ps)):
            model = scratch_victim(apply(poison, train))
            rows[arm].append((*(v[0] for v in measure(model, test, [key])), accuracy(model, test, device="cpu")))
    result = {arm: Arm(np.array([r[0] for r in v]), np.array([r[1] for r in v]), float(np.mean([r[2] for r in v])))
              for arm, v in rows.items()}
    model = scratch_setup[5]["clean_model"]
    result["clean"] = Arm(*measure(model, test, keys), accuracy(model, test, device="cpu"))
    for arm, value in result.items():
        log.info("%s from scratch, one key per victim, eps %d budget %.2f %s (per key %s)", name, eps, budget,
                 value.line(arm), [round(float(v), 3) for v in value.adv_prob])
    return result


def test_witches_brew_from_scratch(scratch_setup):
    """Measured (forest's lr rule, Gaussian start): adv prob raised over the noise control on 8/8 keys,
    mean 0.272 vs 0.096 (noise) and 0.144 (clean); flips 2/8 vs 0/8 and 0/8. With the faster crafting loop's
    copy of the surrogate (same poisons to float32 rounding): 3/8 flips, 0.391 vs 0.147 noise, 0.204
    clean. Over crafting seeds and at eps 16 / 1 %: benchmarks/results/efficacy.md."""
    result = run_scratch_per_key("witches_brew", {"steps": 100, "restarts": 1, "augment": False}, scratch_setup)
    assert_effect(result, factor=1.5, min_keys=7)
    assert result["attack"].success.sum() >= max(result["clean"].success.sum(), result["noise"].success.sum()) + 2


def unrolled_loss(model: torch.nn.Module, train: ImageDataset, test: ImageDataset, ps: PoisonSet,
                  params: MetaPoisonParams, draws: int) -> float:
    """MetaPoison's objective for `ps` on `model`: the target's adversarial loss after K unrolled SGD steps,
    averaged over `draws` fresh batch draws (seeds the crafting never used)."""
    pos = train.positions(ps.ids)
    target = test.images[test.positions(np.asarray(ps.targets["target_ids"]))]
    worker = MetaPoisonWorker(model, train.images, train.labels, pos, target, ps.targets["adversarial_classes"][0],
                              params, 0, seed=99)
    delta = delta_of(ps.images, train.images[pos]).numpy()
    return float(np.mean([worker.adversarial_grad(delta, 10_000 + d)[0] for d in range(draws)]))


def test_metapoison_from_scratch(scratch_setup):
    """MetaPoison optimises its own objective (the unrolled adversarial loss falls below the noise
    control's on fresh batches), keeps clean accuracy, and its victim effect is measured and logged.
    No efficacy claim is asserted: at this CPU scale no MetaPoison setting we tried moved the
    from-scratch victim beyond the noise control (see the module docstring)."""
    params = {"steps": 16, "n_models": 2, "stagger_epochs": 2, "epoch_batches": 4, "drop_period": 6, "lr": 0.05,
              "batch_size": 64, "warm_start": True}
    result, sets = run_scratch("metapoison", params, scratch_setup)
    train, test, surrogates = scratch_setup[:3]
    parsed = make_attack("metapoison", params).params
    attack = [unrolled_loss(m, train, test, ps, parsed, 2) for ps in sets for m in surrogates]
    control = [unrolled_loss(m, train, test, noise_like(ps, train, 0), parsed, 2) for ps in sets for m in surrogates]
    log.info("metapoison unrolled adversarial loss: poisons %.3f, noise control %.3f", np.mean(attack),
             np.mean(control))
    assert np.mean(attack) < np.mean(control)
    assert result["attack"].clean_acc >= result["clean"].clean_acc - 0.03
