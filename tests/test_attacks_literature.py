"""The classic attacks of the poisoning literature (and SIG, WaNet, Bullseye Polytope and
Hidden Trigger join the shared tables) on tiny data: threat-model invariants, determinism, one error per
bad parameter; the implicit-differentiation machinery checked against dense linear algebra, finite
differences of the retrained learner and leave-one-out retraining; and each attack crafted and trained
against through the benchmark's defense interface."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from poison_core.attacks import ATTACKS, CraftContext, make_attack
from poison_core.config import DatasetConfig, ModelConfig, ThreatModel, TrainConfig, VictimConfig, load_benchmark
from poison_core.convex import (conjugate_gradient, fit, hvp, implicit_gradient, inverse_hvp, lissa, loss_gradient,
                                make_learner, removal_influence)
from poison_core.convex.svm import KernelSpec, attack_gradient, fit_svc, hinge_loss
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.errors import ConfigError
from poison_core.evaluation import evaluate
from poison_core.models import build_model
from poison_core.poisons import apply, to_parquet_bytes
from poison_core.training import train_model

log = logging.getLogger(__name__)

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=300, n_test=100, seed=0))
TRAIN = SPLITS.train
# attack -> (tiny params, threat) ; every threat keeps the crafting to a fraction of a second
CASES = {
    "bilevel": ({"steps": 2, "n_val": 40, "max_fit": 120}, ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
    "influence": ({"steps": 2, "refit_every": 1, "n_val": 40, "max_fit": 120},
                  ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
    "svm_poison": ({"classes": (7, 1), "n_fit": 20, "n_val": 20, "steps": 3},
                   ThreatModel(epsilon=32, budget=0.02, clean_label=False)),
    "p_tampering": ({"p": 0.3, "n_candidates": 16, "n_target": 10, "target_class": 3},
                    ThreatModel(epsilon=255, budget=0.3, clean_label=False)),
    "generative": ({"epochs": 4, "width": 4, "lr": 0.01}, ThreatModel(epsilon=8, budget=0.1, clean_label=True)),
    "pgan": ({"iterations": 5, "width": 8, "classes": (7, 1)}, ThreatModel(epsilon=64, budget=0.03, clean_label=False)),
    "sig": ({"target_class": 3}, ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
    "wanet": ({"target_class": 2}, ThreatModel(epsilon=8, budget=0.05, clean_label=False)),
    "bullseye_polytope": ({"steps": 4}, ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
    "hidden_trigger": ({"steps": 4, "patch_size": 3, "lr": 0.05},
                       ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
    "sleeper_agent": ({"steps": 4, "retrain_every": 2, "retrain": {"epochs": 1, "batch_size": 64}},
                      ThreatModel(epsilon=8, budget=0.05, clean_label=True)),
}
CLASSIC = ("bilevel", "influence", "svm_poison", "p_tampering", "generative", "pgan")  # the classic attacks; the rest came later
TINY_DEFENSE = {"dpa": {"k": 2, "epochs": 1}, "abl": {"isolation_epochs": 1, "unlearning_epochs": 1},
                "ueraser": {"repeats": 2}, "strip": {"n_overlays": 4}, "neural_cleanse": {"epochs": 2, "n_samples": 32}}


@pytest.fixture(scope="module")
def surrogate(one_thread) -> torch.nn.Module:
    model = build_model(ModelConfig(name="mlp", width=16), TRAIN.image_shape, TRAIN.num_classes, seed=0)
    train_model(model, TRAIN, TrainConfig(epochs=2, batch_size=64), device="cpu", seed=0)
    return model.eval()


def craft(name, surrogate, seed=0, params=None, threat=None, train=TRAIN):
    tiny, default_threat = CASES[name]
    ctx = CraftContext(train=train, test=SPLITS.test, threat=threat or default_threat, seed=seed,
                       surrogates=[surrogate])
    return make_attack(name, {**tiny, **(params or {})}).craft(ctx)


def test_every_new_attack_is_registered_with_paper_summary_and_docstring():
    for name in CASES:
        entry = ATTACKS.entry(name)
        assert entry.paper and entry.summary and entry.obj.__doc__
    for name in CLASSIC:
        module_doc = __import__(ATTACKS.entry(name).obj.__module__, fromlist=["_"]).__doc__
        assert "Eq." in module_doc or "Sec." in module_doc


@pytest.mark.parametrize("name", list(CASES))
def test_epsilon_budget_and_labels(name, surrogate):
    ps = craft(name, surrogate)
    threat = CASES[name][1]
    clean = TRAIN.images[TRAIN.positions(ps.ids)].astype(np.int16)
    assert 0 < len(ps) <= threat.max_poisons(len(TRAIN))
    assert np.abs(ps.images.astype(np.int16) - clean).max() <= threat.epsilon
    if threat.clean_label:
        assert np.array_equal(ps.poison_labels, ps.orig_labels)
    if name in ("svm_poison", "pgan"):
        assert set(ps.orig_labels) <= {7, 1} and set(ps.poison_labels) <= {7, 1}
        assert np.all(ps.poison_labels != ps.orig_labels)
    if name in ("bilevel", "influence", "generative"):
        assert len(ps) == threat.max_poisons(len(TRAIN))
        assert np.any(ps.images != TRAIN.images[TRAIN.positions(ps.ids)])


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_bytes_other_seed_other_poisons(name, surrogate):
    a, b, c = craft(name, surrogate, seed=3), craft(name, surrogate, seed=3), craft(name, surrogate, seed=4)
    assert to_parquet_bytes(a) == to_parquet_bytes(b)
    assert not (np.array_equal(a.ids, c.ids) and np.array_equal(a.images, c.images))


def test_p_tampering_clean_label_keeps_labels_and_epsilon(surrogate):
    ps = craft("p_tampering", surrogate, threat=ThreatModel(epsilon=8, budget=0.3, clean_label=True))
    clean = TRAIN.images[TRAIN.positions(ps.ids)].astype(np.int16)
    assert len(ps) > 0 and np.array_equal(ps.poison_labels, ps.orig_labels)
    assert np.abs(ps.images.astype(np.int16) - clean).max() <= 8
    few = craft("p_tampering", surrogate, threat=ThreatModel(epsilon=255, budget=0.02, clean_label=False))
    assert len(few) == ThreatModel(budget=0.02).max_poisons(len(TRAIN))


def test_label_policies_are_enforced(surrogate):
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft("svm_poison", surrogate, threat=ThreatModel(epsilon=255, budget=0.02, clean_label=True))
    with pytest.raises(ConfigError, match="threat.clean_label"):
        craft("generative", surrogate, threat=ThreatModel(epsilon=8, budget=0.1, clean_label=False))
    with pytest.raises(ConfigError, match="needs at least one surrogate"):
        make_attack("generative", CASES["generative"][0]).craft(
            CraftContext(train=TRAIN, threat=CASES["generative"][1], seed=0))


@pytest.mark.parametrize("name, params", [
    ("bilevel", {"steps": 0}), ("bilevel", {"learner": "tree"}), ("bilevel", {"classes": [3]}),
    ("bilevel", {"lam": 0}), ("bilevel", {"classes": [3, 3]}), ("influence", {"solver": "exact"}),
    ("influence", {"refit_every": 0}), ("influence", {"selection": "best"}),
    ("svm_poison", {"classes": [3, 3]}), ("svm_poison", {"kernel": "poly"}), ("svm_poison", {"C": 0}),
    ("svm_poison", {"classes": [1, 2, 3]}), ("p_tampering", {"p": 0}), ("p_tampering", {"p": 1.5}),
    ("p_tampering", {"choice": "best"}), ("generative", {"epochs": 0}), ("pgan", {"alpha": 1.5}),
    ("pgan", {"classes": [4, 4]}), ("pgan", {"unknown": 1}),
])
def test_bad_params_raise(name, params):
    with pytest.raises(ValidationError):
        make_attack(name, params)


@pytest.mark.parametrize("name, params, field", [
    ("bilevel", {"classes": [7, 12]}, "classes"), ("influence", {"classes": [10, 1]}, "classes"),
    ("svm_poison", {"classes": [7, 10]}, "classes"), ("pgan", {"classes": [11, 1]}, "classes"),
    ("p_tampering", {"target_class": 10}, "target_class"),
])
def test_class_ids_outside_the_dataset_are_one_line_config_errors(name, params, field, surrogate):
    with pytest.raises(ConfigError, match=rf"^params\.{field}: class 1[0-2] is outside 0\.\.9$"):
        craft(name, surrogate, params=params)


def test_two_class_attacks_choose_only_among_their_classes(surrogate):
    ps = craft("bilevel", surrogate, params={"classes": (3, 8)})
    assert set(ps.orig_labels) <= {3, 8}
    ps = craft("influence", surrogate, params={"classes": (3, 8)})
    assert set(ps.orig_labels) <= {3, 8}


# ---------------------------------------------------------------- implicit differentiation


def tiny_problem(n=24, d=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    x[torch.arange(n), y % d] += 0.3  # some signal
    xv = torch.rand(12, d, generator=gen, dtype=torch.float64)
    yv = torch.randint(0, k, (12,), generator=gen)
    return x, y, xv, yv


@pytest.mark.parametrize("name", ["logistic", "ridge", "svm"])
def test_cg_and_lissa_match_a_dense_solve(name):
    x, y, xv, yv = tiny_problem()
    learner = make_learner(name, 3, x.shape[1], lam=0.05)
    theta = fit(learner, x, y)
    hessian = torch.autograd.functional.hessian(lambda t: learner.objective(t, x, y), theta)
    b = loss_gradient(learner, theta, xv, yv)
    dense = torch.linalg.solve(hessian, b)
    v = torch.randn(learner.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hvp(lambda t: learner.objective(t, x, y), theta, v), hessian @ v, atol=1e-12)
    cg = inverse_hvp(learner, theta, x, y, b)
    assert torch.allclose(cg, dense, rtol=1e-7, atol=1e-9)
    top = float(torch.linalg.eigvalsh(hessian).max())
    est = lissa(lambda u: hessian @ u, b, scale=1.2 * top, depth=3000)
    assert float((est - dense).norm() / dense.norm()) < 1e-4
    assert torch.allclose(conjugate_gradient(lambda u: hessian @ u, b), dense, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["logistic", "ridge", "svm"])
def test_implicit_gradient_matches_finite_differences_of_the_retrained_learner(name):
    x, y, xv, yv = tiny_problem()
    learner = make_learner(name, 3, x.shape[1], lam=0.05)

    def outer(features: torch.Tensor) -> float:
        theta = fit(learner, features, y, tol=1e-13)
        return float(learner.sample_losses(theta, xv, yv).mean())

    theta = fit(learner, x, y, tol=1e-13)
    v = inverse_hvp(learner, theta, x, y, loss_gradient(learner, theta, xv, yv), tol=1e-13)
    grad = implicit_gradient(learner, theta, x, y, v)
    h, errors = 1e-5, []
    for row, col in [(0, 0), (3, 2), (7, 1), (11, 3), (20, 0)]:
        plus, minus = x.clone(), x.clone()
        plus[row, col] += h
        minus[row, col] -= h
        fd = (outer(plus) - outer(minus)) / (2 * h)
        errors.append(abs(fd - float(grad[row, col])) / max(abs(fd), 1e-6))
    log.info("implicit gradient vs central finite differences (%s): max relative error %.2e", name, max(errors))
    assert max(errors) < 1e-4


def test_influence_predicts_leave_one_out_retraining():
    x, y, xv, yv = tiny_problem(n=40, d=5, k=2, seed=2)
    learner = make_learner("logistic", 2, x.shape[1], lam=0.02)
    theta = fit(learner, x, y, tol=1e-13)
    base = float(learner.sample_losses(theta, xv, yv).mean())
    v = inverse_hvp(learner, theta, x, y, loss_gradient(learner, theta, xv, yv), tol=1e-13)
    predicted = removal_influence(learner, theta, x, y, v).numpy()
    actual = []
    for i in range(len(x)):
        weights = torch.ones(len(x), dtype=torch.float64)
        weights[i] = 0.0
        loo = fit(learner, x, y, weights=weights, theta0=theta, tol=1e-13)
        actual.append(float(learner.sample_losses(loo, xv, yv).mean()) - base)
    r = float(np.corrcoef(predicted, actual)[0, 1])
    log.info("influence vs leave-one-out retraining on %d points: Pearson r = %.4f", len(x), r)
    assert r > 0.95


def test_svm_attack_gradient_matches_finite_differences_of_the_retrained_svm():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0.3, 0.1, (15, 3)), rng.normal(0.7, 0.1, (15, 3))])
    y = np.repeat([-1.0, 1.0], 15)
    xv = np.vstack([rng.normal(0.3, 0.1, (20, 3)), rng.normal(0.7, 0.1, (20, 3))])
    yv = np.repeat([-1.0, 1.0], 20)
    for kind in ("linear", "rbf"):
        spec = KernelSpec(kind, gamma=2.0, C=1.0)
        xa, ya = np.vstack([x, [[0.6, 0.65, 0.7]]]), np.append(y, -1.0)
        alpha, b = fit_svc(xa, ya, spec)
        grad = attack_gradient(xa, ya, xv, yv, spec, alpha, b)
        fd = np.zeros(3)
        for j in range(3):
            plus, minus = xa.copy(), xa.copy()
            plus[-1, j] += 1e-3  # wider than usual: the SVC dual is exact only to its solver tolerance
            minus[-1, j] -= 1e-3
            fd[j] = (hinge_loss(plus, ya, xv, yv, spec)[0] - hinge_loss(minus, ya, xv, yv, spec)[0]) / 2e-3
        log.info("svm (%s) attack gradient %s vs finite differences %s", kind, grad.round(5), fd.round(5))
        assert np.allclose(grad, fd, rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------- the benchmark grid


@pytest.mark.parametrize("name", list(CASES))
def test_each_attack_runs_through_a_defense_like_a_grid_cell(name, surrogate):
    ps = craft(name, surrogate)
    victim = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=64))
    result = make_defense("none").fit(DefenseContext(train=apply(ps, TRAIN), victim=victim, seed=1))
    metrics = evaluate(result.classifier, SPLITS.test, ps)
    assert 0.0 <= metrics["clean_acc"] <= 1.0


def test_the_literature_benchmark_config_validates():
    cfg = load_benchmark("configs/digits-literature.yaml")
    assert {a.name for a in cfg.attacks} >= set(CLASSIC)
    assert {d.name for d in cfg.defenses} >= {"none", "trimmed_loss", "dpa", "spectral_signatures"}
    assert cfg.victim.model.name == "mlp" and cfg.dataset.name == "digits"


def test_a_tiny_grid_of_every_new_attack_against_every_defense_runs_end_to_end():
    from poison_core.config import BenchmarkConfig, parse_config
    from poison_core.defenses import DEFENSES
    from poison_core.experiment import run_benchmark

    raw = {"name": "tiny-literature", "dataset": {"name": "digits", "n_train": 300, "n_test": 100, "seed": 0},
           "victim": {"model": {"name": "mlp", "width": 16}, "train": {"epochs": 1, "batch_size": 64}},
           "attacks": [{"name": name, "params": params, "threat": threat.model_dump()}
                       for name, (params, threat) in CASES.items()],
           "defenses": [{"name": name, "params": TINY_DEFENSE.get(name, {})} for name in DEFENSES.names()]}
    result = run_benchmark(parse_config(BenchmarkConfig, raw))
    assert len(result.rows) == len(CASES) * len(DEFENSES.names())
    assert all(0.0 <= row["clean_acc"] <= 1.0 for row in result.rows)
    assert {row["attack"] for row in result.rows} == set(CASES)
