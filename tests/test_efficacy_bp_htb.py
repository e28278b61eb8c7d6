"""Efficacy of Bullseye Polytope and Hidden Trigger Backdoor in their papers' transfer setting:
a feature extractor pretrained on clean data is frozen and only its linear head is retrained on the
(poisoned) fine-tuning set (poison_core.transfer.finetune). Fashion-MNIST: a width-32 ConvNet (128
features) pretrained 10 epochs on 2,000 images; fine-tuning sets disjoint from them; head recipe as in
tests/test_efficacy_targeted.py. Run with ``-o log_cli=true --log-cli-level=INFO`` to see the numbers.

* Bullseye Polytope vs Convex Polytope on the *same* keys and bases (the base draw depends on the seed
  only) and vs the random-noise control of those bases: 8 keys (correctly classified test image, the
  extractor's runner-up class), eps 32/255, 5 % of a 400-image fine-tuning set (20 poisons) per key, 80
  Adam steps each at the reference lr 0.04 (normalised units). On this module's split: see the test's
  docstring. On the 2,400-image split of test_efficacy_targeted (its first 8 keys): Bullseye 4/8 flips,
  mean adv prob 0.479; Convex Polytope 2/8, 0.242; noise 0/8, 0.095; clean 0/8, 0.085; clean accuracy
  0.811 vs 0.817; with its 12 keys: Bullseye 6/12, 0.515 at 120 steps (7/12, 0.523 at 400: converged),
  Convex Polytope 3/12, 0.241, noise 0/12, 0.074.
* Hidden Trigger: source sneaker (7) -> target ankle boot (9), eps 16/255 (the paper's), the 4-pixel
  random-noise patch, all 100 target-class images of a 1,000-image fine-tuning set poisoned (10 %;
  the paper poisons 400 of about 1,300 target images), 200 steps at the reference lr 0.01 in its
  relative units, two crafts per target image (the reference's rules, the attack's defaults). ASR on
  patched source test images vs the clean victim and vs the random-noise control of the same images
  (same patch): see the test's docstring. Measured with the earlier rule (one craft, lr on the raw
  squared distance): the effect is partly not trigger-specific: unpatched sneakers are also more often
  called boots (0.14 vs 0.05 clean), patched ones most (0.19 vs 0.07); pullover -> shirt (0 -> 6) 0.31
  vs 0.17 (unpatched 0.26 vs 0.17); 5 % budget 0.16 vs 0.07; eps 32 0.18 vs 0.07; a 6-pixel
  checkerboard 0.15 vs 0.06; fine-tuning on the two classes only (the paper's binary case) 0.20 vs 0.08.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.efficacy import noise_like, runner_up_keys, softmax
from benchmarks.transfer import HEADS, VICTIM_SEED
from benchmarks.transfer import setup as transfer_setting
from poison_core.attacks import CraftContext, make_attack
from poison_core.config import TargetSelection, ThreatModel
from poison_core.defenses.base import ModelClassifier
from poison_core.evaluation import evaluate
from poison_core.metrics import wilson_interval
from poison_core.poisons import apply
from poison_core.training import predict_logits
from poison_core.transfer import extract_features, finetune

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")]
log = logging.getLogger(__name__)

HEAD = HEADS["plain"]  # the attacks' references train the head without augmentation
HTB_MARGIN = 0.04  # see the hidden-trigger test's docstring
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(one_thread):
    """The frozen extractor, the 1,000 fine-tuning images it never saw, the test split (the setting of
    benchmarks/transfer.py, which measures these attacks over crafting seeds)."""
    return transfer_setting()


def line(arm: str, adv: np.ndarray, hits: np.ndarray, acc: float) -> str:
    low, high = wilson_interval(int(hits.sum()), len(hits))
    return (f"{arm}: {int(hits.sum())}/{len(hits)} flips (Wilson 95% [{low:.2f}, {high:.2f}]), adv prob "
            f"{adv.mean():.3f} {np.round(adv, 2).tolist()}, clean acc {acc:.3f}")


def test_bullseye_beats_convex_polytope_and_noise_on_the_same_bases(setup):
    """Measured on this split (8 keys, eps 32, 20 poisons per key, 80 steps): Bullseye 3/8 flips, adv prob
    0.481 (above Convex Polytope's on 8/8 keys); Convex Polytope 2/8, 0.285; noise 2/8, 0.192; clean
    2/8, 0.165 (two keys' runner-up is already at 0.62 for the clean victim); clean acc 0.809 vs 0.821."""
    extractor, finetune_set, test = setup
    train = finetune_set.subset(np.arange(400))
    keys = runner_up_keys([extractor], test, 8, seed=1, distinct=False)
    positions = test.positions(np.array([k[0] for k in keys]))
    test_features = extract_features(extractor, test.images, device="cpu")

    def score(model: torch.nn.Module, i: int) -> tuple[float, bool, float]:
        with torch.no_grad():
            probs = torch.softmax(model.head(test_features), dim=1).numpy()
        adv = keys[i][1]
        return float(probs[positions[i], adv]), bool(probs[positions[i]].argmax() == adv), \
            float(np.mean(probs.argmax(1) == test.labels))

    clean = finetune(extractor, train, HEAD, device="cpu", seed=VICTIM_SEED)
    rows: dict[str, list] = {"clean": [], "noise": [], "convex_polytope": [], "bullseye_polytope": []}
    params = {"bullseye_polytope": {"steps": 80}, "convex_polytope": {"steps": 80, "coef_iters": 50}}
    for i, (target_id, adversarial) in enumerate(keys):
        selection = TargetSelection(mode="fixed", target_ids=(target_id,), adversarial_class=adversarial)
        threat = ThreatModel(epsilon=32, budget=0.05, clean_label=True, targets=selection)
        ctx = CraftContext(train=train, test=test, threat=threat, seed=1000 + i, surrogates=[extractor])
        sets = {name: make_attack(name, p).craft(ctx) for name, p in params.items()}
        assert np.array_equal(sets["bullseye_polytope"].ids, sets["convex_polytope"].ids)  # the same bases
        sets["noise"] = noise_like(sets["bullseye_polytope"], train, i)
        rows["clean"].append(score(clean, i))
        for arm, ps in sets.items():
            rows[arm].append(score(finetune(extractor, apply(ps, train), HEAD, device="cpu", seed=VICTIM_SEED), i))
    result = {arm: (np.array([r[0] for r in v]), np.array([r[1] for r in v]), float(np.mean([r[2] for r in v])))
              for arm, v in rows.items()}
    for arm, value in result.items():
        log.info("transfer eps 32, 20 poisons/key %s", line(arm, *value))
    bp, cp, noise, base = (result[a] for a in ("bullseye_polytope", "convex_polytope", "noise", "clean"))
    assert bp[0].mean() > cp[0].mean() and int((bp[0] > cp[0]).sum()) >= 7
    assert bp[0].mean() >= 2 * max(noise[0].mean(), base[0].mean()) and int((bp[0] > noise[0]).sum()) >= 7
    assert bp[1].sum() >= max(noise[1].sum(), base[1].sum(), cp[1].sum())
    assert bp[2] >= base[2] - 0.02


def test_hidden_trigger_raises_patched_source_asr_over_the_clean_victim_and_noise(setup):
    """The reference's rules (Hidden Trigger's defaults: two crafts per target image with fresh sources, the best
    kept; the step relative to the sources' feature scale) at 200 steps, lr 0.01. Measured on this split
    for crafting seeds 0, 1, 2 (the test runs seed 0): ASR on patched sneakers 0.12 / 0.12 / 0.12 against
    0.07 for both the clean victim and the random-noise control of the same 100 images (every seed;
    unpatched sneakers 0.09 on the attack's victim, seed 0);
    clean accuracy 0.825-0.826 vs 0.825; two crafts took 424-513 s then on the loaded 2-core machine, 28-29 s
    a seed now (benchmarks/transfer.py beside two other processes; benchmarks/results/transfer.md has seeds
    0-3 and the benchmark's augmented head). The
    earlier rule (one craft, lr on the raw squared distance) measured 0.19 vs 0.07 on seed 0: at 200 of
    the reference's 5,000 steps the relative step moves the poisons less. Bar: 4 points over the larger
    control (measured 5 on every seed)."""
    extractor, train, test = setup
    params = {"source_class": 7, "target_class": 9, "patch_size": 4, "steps": 200, "lr": 0.01}
    threat = ThreatModel(epsilon=16, budget=0.1, clean_label=True)
    ps = make_attack("hidden_trigger", params).craft(CraftContext(train=train, threat=threat, seed=0,
                                                                  surrogates=[extractor]))
    assert len(ps) == 100 and set(ps.orig_labels) == {9}
    victims = {"attack": apply(ps, train), "noise": apply(noise_like(ps, train, 0), train), "clean": train}
    models = {arm: finetune(extractor, data, HEAD, device="cpu", seed=VICTIM_SEED) for arm, data in victims.items()}
    result = {arm: evaluate(ModelClassifier(m, CPU), test, ps) for arm, m in models.items()}
    sources = test.images[test.labels == 7]
    unpatched = float(np.mean(softmax(predict_logits(models["attack"], sources, device="cpu")).argmax(1) == 9))
    log.info("hidden_trigger 7->9: ASR patched sources %s; unpatched (attack victim) %.3f; clean acc %s",
             {a: r["asr"] for a, r in result.items()}, unpatched, {a: r["clean_acc"] for a, r in result.items()})
    attack, control = result["attack"]["asr"], max(result["noise"]["asr"], result["clean"]["asr"])
    assert attack >= control + HTB_MARGIN, (attack, control)
    assert result["attack"]["clean_acc"] >= result["clean"]["clean_acc"] - 0.02
