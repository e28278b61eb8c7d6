"""Training and filter defenses on tiny data: every member fits and predicts, parameters are bounded
with one-line errors, seeded runs repeat exactly, and each algorithm's building block does what its
paper says (trimmed mean, LGA, mixing, PGD, spectral/cluster/k-NN rules on planted data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from poison_core.config import DefenseConfig, ModelConfig, TrainConfig, VictimConfig, parse_config
from poison_core.defenses import DEFENSES, DefenseContext, make_defense
from poison_core.defenses.abl import lga_loss
from poison_core.defenses.adversarial import pgd_attack
from poison_core.defenses.augment import cutmix, cutout, gaussian_noise, mixup
from poison_core.defenses.filters import activation_clustering_keep, deep_knn_keep, spectral_keep
from poison_core.defenses.trimmed_loss import trimmed_mean
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.training import train_model
from poison_core.members import defense_params
from tests.helpers import tiny_dataset

MLP = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=32))
CONV = VictimConfig(model=ModelConfig(name="convnet", width=4), train=TrainConfig(epochs=1, batch_size=32))
SMALL = {"dpa": {"k": 3}, "abl": {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1},
         "adversarial_training": {"steps": 1}, "ueraser": {"repeats": 2}, "strip": {"n_overlays": 4},
         "neural_cleanse": {"epochs": 2, "n_samples": 32}}
EXPECTED = {e.name for e in DEFENSES.entries() if e.origin == "built-in"}  # from the registry, not typed by hand


def _ctx(victim=MLP, n=96, seed=0, poison=True, **kw):
    data = tiny_dataset(n=n, k=4, seed=1)
    mask = (np.arange(n) % 10 == 0) if poison else None
    return DefenseContext(train=data, victim=victim, seed=seed, is_poison=mask, **kw)


def _fit(name, params=None, **kw):
    """The logits on the training images and the info of `name` fitted on a tiny context."""
    ctx = _ctx(**kw)
    result = make_defense(name, params if params is not None else SMALL.get(name)).fit(ctx)
    return result.classifier.predict_logits(ctx.train.images), result.info


def _predict(name, params=None, **kw):
    return _fit(name, params, **kw)[0]


def test_every_defense_of_the_brief_is_registered_with_paper_and_summary():
    assert {"none", "trimmed_loss", "dpa", "abl", "dp_sgd", "neural_cleanse", "strip"} <= EXPECTED
    for name in EXPECTED - {"none"}:
        entry = DEFENSES.entry(name)
        assert entry.paper and entry.summary


@pytest.mark.parametrize("victim", [MLP, CONV], ids=["mlp", "convnet"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_defense_fits_tiny_data_and_returns_a_classifier(name, victim):
    ctx = _ctx(victim)
    result = make_defense(name, SMALL.get(name)).fit(ctx)
    logits = result.classifier.predict_logits(ctx.train.images[:7])
    assert logits.shape == (7, 4) and np.all(np.isfinite(logits))
    assert all(isinstance(v, float) for v in result.info.values())


BAD_PARAMS = [
    ("trimmed_loss", "alpha", 0.0), ("trimmed_loss", "alpha", 1.5), ("trimmed_loss", "warmup_epochs", -1),
    ("dpa", "k", 1), ("dpa", "k", 10001), ("dpa", "epochs", 0),
    ("abl", "isolation_epochs", 0), ("abl", "gamma", -0.1), ("abl", "isolation_fraction", 0.0),
    ("abl", "isolation_fraction", 1.0), ("abl", "finetune_epochs", -1), ("abl", "unlearning_epochs", -1),
    ("abl", "unlearning_lr", 0.0),
    ("mixup", "alpha", 0.0), ("cutmix", "alpha", -1.0), ("cutout", "size", 0.0), ("cutout", "size", 1.5),
    ("gaussian", "sigma", 0.0),
    ("adversarial_training", "epsilon", 300), ("adversarial_training", "steps", 0),
    ("adversarial_training", "step_size", 0.0),
    ("spectral_signatures", "removal_fraction", 1.0), ("activation_clustering", "n_components", 0),
    ("activation_clustering", "size_threshold", 0.6), ("deep_knn", "k", 0),
    ("dp_sgd", "clip_norm", 0.0), ("dp_sgd", "clip_norm", 1e5), ("dp_sgd", "noise_multiplier", -0.1),
    ("dp_sgd", "noise_multiplier", 101), ("iss_jpeg", "quality", 0), ("iss_jpeg", "quality", 96),
    ("iss_bitdepth", "bits", 0), ("iss_bitdepth", "bits", 8), ("ueraser", "repeats", 0),
    ("ueraser", "repeats", 33), ("ueraser", "adversarial_fraction", 1.5), ("ueraser", "erasing", -0.1),
    ("strip", "n_overlays", 0), ("strip", "n_overlays", 1001), ("strip", "alpha", 0.0), ("strip", "alpha", 1.0),
    ("strip", "frr", 0.0), ("strip", "frr", 0.5), ("strip", "removal_fraction", 1.0),
    ("neural_cleanse", "epochs", 0), ("neural_cleanse", "epochs", 1001), ("neural_cleanse", "n_samples", 1),
    ("neural_cleanse", "batch_size", 0), ("neural_cleanse", "lr", 0.0), ("neural_cleanse", "init_cost", 0.0),
    ("neural_cleanse", "cost_multiplier", 1.0), ("neural_cleanse", "patience", 0),
    ("neural_cleanse", "attack_success", 1.5), ("neural_cleanse", "anomaly_threshold", 0.0),
    ("neural_cleanse", "unlearn_fraction", 0.0), ("neural_cleanse", "stamp_fraction", 1.5),
    ("neural_cleanse", "unlearn_epochs", 0), ("neural_cleanse", "unlearn_lr", 0.0),
]


@pytest.mark.parametrize(("name", "field", "value"), BAD_PARAMS, ids=[f"{n}.{f}={v}" for n, f, v in BAD_PARAMS])
def test_out_of_range_parameter_is_a_one_line_error_naming_field_and_range(name, field, value):
    with pytest.raises(ConfigError, match=rf"params of '{name}': {field}: .*\(allowed: .*{field}.*; got ") as err:
        defense_params(parse_config(DefenseConfig, {"name": name, "params": {field: value}}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValidationError, match=field):
        make_defense(name, {field: value})


def test_unknown_parameter_and_unknown_choice_are_refused():
    with pytest.raises(ConfigError, match="params of 'abl': gama: Extra inputs are not permitted"):
        defense_params(parse_config(DefenseConfig, {"name": "abl", "params": {"gama": 0.5}}))
    with pytest.raises(ConfigError, match="reduction: Input should be 'ica' or 'pca'"):
        defense_params(parse_config(DefenseConfig, {"name": "activation_clustering", "params": {"reduction": "lda"}}))


def test_paper_defaults():
    assert make_defense("trimmed_loss").params.alpha == 0.8
    assert make_defense("abl").params.gamma == 0.5 and make_defense("abl").params.isolation_fraction == 0.01
    assert make_defense("mixup").params.alpha == 1.0 and make_defense("cutmix").params.alpha == 1.0
    assert make_defense("adversarial_training").params.epsilon == 8
    assert make_defense("spectral_signatures").params.removal_fraction == 0.15
    assert make_defense("activation_clustering").params.size_threshold == 0.35


@pytest.mark.parametrize("name", ["trimmed_loss", "mixup", "cutmix", "cutout", "gaussian", "abl",
                                  "adversarial_training", "dp_sgd", "iss_jpeg", "iss_grayscale", "iss_bitdepth",
                                  "ueraser", "strip", "neural_cleanse"])
def test_same_seed_same_predictions_other_seed_other_predictions(name):
    (first, info), (again, info_again) = _fit(name, victim=CONV, seed=3), _fit(name, victim=CONV, seed=3)
    assert np.array_equal(first, again) and info == info_again
    assert not np.array_equal(first, _predict(name, victim=CONV, seed=4))


@pytest.mark.parametrize("name", ["trimmed_loss", "abl", "strip", "neural_cleanse"])
def test_ground_truth_is_only_reported_never_used(name):
    assert np.array_equal(_predict(name, victim=CONV, poison=True), _predict(name, victim=CONV, poison=False))


def test_trimmed_mean_keeps_the_alpha_fraction_of_lowest_losses():
    losses = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0], requires_grad=True)
    assert trimmed_mean(losses, 0.6).item() == pytest.approx(2.0)  # floor(3.0) lowest: 1, 2, 3
    assert trimmed_mean(losses, 0.1).item() == pytest.approx(1.0)  # at least one sample is kept
    trimmed_mean(losses, 0.6).backward()
    assert losses.grad.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 0])


def test_trimmed_loss_with_alpha_one_is_plain_training():
    assert np.array_equal(_predict("trimmed_loss", {"alpha": 1.0}, victim=CONV), _predict("none", victim=CONV))


def test_trimmed_loss_reports_how_many_poisons_it_trimmed():
    result = make_defense("trimmed_loss", {"alpha": 0.5}).fit(_ctx(CONV))
    assert 0 <= result.info["trimmed_poison_fraction"] <= 1
    assert "poison_trimmed_recall" in result.history[-1]


def test_lga_descends_above_gamma_and_ascends_below():
    for value, sign in ((2.0, 1.0), (0.1, -1.0)):
        losses = torch.full((4,), value, requires_grad=True)
        lga_loss(losses, 0.5).backward()
        assert torch.all(torch.sign(losses.grad) == sign)


def test_abl_history_logs_clean_and_poison_losses_per_stage_and_isolation_precision():
    result = make_defense("abl", {"isolation_epochs": 2, "finetune_epochs": 1, "unlearning_epochs": 1,
                                  "isolation_fraction": 0.1}).fit(_ctx(CONV))
    assert [h["stage"] for h in result.history] == ["isolation", "isolation", "finetune", "unlearning"]
    assert all("loss_clean" in h and "loss_poison" in h for h in result.history[:-1])
    # unlearning trains on the isolated samples only (the reference's pure ascent): their groups' losses
    assert "loss_isolated" in result.history[-1] and ({"loss_clean", "loss_poison"} & set(result.history[-1]))
    assert result.info["n_isolated"] == 9 and 0 <= result.info["isolation_precision"] <= 1
    unsupervised = make_defense("abl", SMALL["abl"]).fit(_ctx(CONV, poison=False))
    assert "isolation_precision" not in unsupervised.info
    assert all("loss_poison" not in h for h in unsupervised.history)


def _batch(n=16, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % k


def test_mixup_and_cutmix_return_soft_labels_matching_their_mixing_weight():
    x, y = _batch()
    for fn in (mixup, cutmix):
        xa, ya = fn(x, y, torch.Generator().manual_seed(1), 4, 1.0)
        xb, yb = fn(x, y, torch.Generator().manual_seed(1), 4, 1.0)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == x.shape and ya.shape == (16, 4)
        assert torch.allclose(ya.sum(1), torch.ones(16))
        assert 0 <= float(xa.min()) and float(xa.max()) <= 1
    mixed, labels = cutmix(x, y, torch.Generator().manual_seed(2), 4, 1.0)
    own = (mixed == x).float().mean(dim=(1, 2, 3))
    differs = labels.argmax(1) != y  # partner of another class; lam is the fraction of own pixels
    lam = labels[torch.arange(16), y]
    assert torch.allclose(own[differs], lam[differs])


def test_cutout_erases_one_square_per_image_and_keeps_labels():
    x = torch.ones(64, 1, 8, 8)
    out, y = cutout(x, torch.arange(64) % 4, torch.Generator().manual_seed(0), 0.5)
    erased = (out == 0).sum(dim=(1, 2, 3))
    assert torch.equal(y, torch.arange(64) % 4)
    assert int(erased.max()) == 16 and int(erased.min()) >= 4  # 4x4 square, clipped at the border


def test_gaussian_noise_is_reproducible_and_stays_in_range():
    x, y = _batch()
    a, _ = gaussian_noise(x, y, torch.Generator().manual_seed(0), 0.1)
    b, _ = gaussian_noise(x, y, torch.Generator().manual_seed(0), 0.1)
    assert torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert 0.05 < float((a - x).std()) < 0.12


def test_pgd_stays_in_the_ball_raises_the_loss_and_leaves_the_model_alone():
    data = tiny_dataset(n=64, k=4, seed=2)
    model = build_model(CONV.model, data.image_shape, 4, seed=0)
    train_model(model, data, TrainConfig(epochs=3, batch_size=32), device="cpu", seed=0)
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.labels)
    adv = pgd_attack(model, x, y, torch.Generator().manual_seed(0), eps=8 / 255, steps=3, step_size=4 / 255)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        clean_loss = torch.nn.functional.cross_entropy(model(x), y)
        adv_loss = torch.nn.functional.cross_entropy(model(adv), y)
    assert float(adv_loss) > float(clean_loss)


def _planted(n_clean=90, n_poison=10, dim=12, seed=0):
    """Two classes of Gaussian features; the last n_poison samples of class 0 are shifted along one
    direction (the backdoor's 'spectral signature')."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(2 * n_clean + n_poison, dim))
    labels = np.r_[np.zeros(n_clean + n_poison, int), np.ones(n_clean, int)]
    poison = np.zeros(len(labels), bool)
    poison[n_clean:n_clean + n_poison] = True
    feats[poison, 0] += 8.0
    feats[labels == 1, 1] += 20.0
    return feats, labels, poison


def test_spectral_signatures_removes_the_planted_direction_per_class():
    feats, labels, poison = _planted()
    keep = spectral_keep(feats, labels, 0.15)
    assert not keep[poison].any()  # all 10 poisons among the 15 removed from class 0
    assert (~keep[labels == 1]).sum() == 13  # floor(0.15 * 90) removed from the clean class too


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_clustering_flags_the_small_cluster_only(seed):
    feats, labels, poison = _planted(seed=seed)
    pca = activation_clustering_keep(feats, labels, 10, "pca", 0.35, seed=seed)
    assert np.array_equal(~pca, poison)
    ica = activation_clustering_keep(feats, labels, 2, "ica", 0.35, seed=seed)
    assert np.array_equal(~ica, poison)
    assert activation_clustering_keep(feats, labels, 10, "pca", 0.05, seed=seed).all()  # 10 % > 5 %: kept


def test_deep_knn_drops_samples_whose_neighbours_disagree():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(3), 30)
    feats = centres[labels] + rng.normal(scale=0.5, size=(90, 2))
    flipped = labels.copy()
    flipped[[0, 31, 62]] = [1, 2, 0]
    keep = deep_knn_keep(feats, flipped, 10, 3)
    assert np.array_equal(np.flatnonzero(~keep), [0, 31, 62])


def test_filters_report_precision_and_recall_and_train_on_the_kept_data():
    result = make_defense("spectral_signatures", {"removal_fraction": 0.2}).fit(_ctx(CONV))
    assert result.info["kept_fraction"] == pytest.approx(1 - 4 * 4 / 96)
    assert {"filter_precision", "filter_recall"} <= set(result.info)
