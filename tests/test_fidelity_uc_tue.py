"""Fidelity of Unlearnable Clusters and TUE to their reference implementations.

UC (github:jiamingzhang94/Unlearnable-Clusters) is label-agnostic: its encoder never sees the target
labels, so permuting the labels (and the surrogate trained on them) leaves the poisoned pixels alone.
TUE (github:renjie3/TUE) shuffles its batches, so on class-sorted data every batch holds several
classes and the class-wise separability term is not 0; its views carry colour jitter and greyscale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poison_core.attacks import CraftContext, make_attack
from poison_core.simclr import color_jitter, random_grayscale, shuffled_batches, simclr_views
from poison_core.attacks.tue import csd
from poison_core.config import ModelConfig, ThreatModel, TrainConfig
from poison_core.models import build_model
from poison_core.poisons import to_parquet_bytes
from poison_core.training import train_model
from tests.helpers import tiny_dataset

EPS = 8
UC_TINY = {"epochs": 1, "generator_width": 4, "batch_size": 64, "encoder": {"width": 4, "epochs": 1, "batch_size": 64}}
TUE_TINY = {"width": 4, "epochs": 2, "train_steps": 2, "steps": 3, "batch_size": 40}


def sorted_by_class(n: int = 200, k: int = 5, shape=(8, 8, 1)):
    """A tiny dataset whose samples are sorted by class, like the imagefolder loader's."""
    data = tiny_dataset(n=n, k=k, shape=shape)
    return data.subset(np.argsort(data.labels, kind="stable"))


def fit_surrogate(train):
    model = build_model(ModelConfig(name="convnet", width=4), train.image_shape, train.num_classes, seed=0)
    train_model(model, train, TrainConfig(epochs=2, batch_size=64), device="cpu", seed=0)
    return model


def craft(name, train, params, seed=0, surrogates=(), budget=1.0):
    threat = ThreatModel(epsilon=EPS, budget=budget, clean_label=True)
    return make_attack(name, params).craft(CraftContext(train=train, threat=threat, seed=seed,
                                                        surrogates=list(surrogates)))


def deltas(ps, train):
    return ps.images.astype(np.int16) - train.images[train.positions(ps.ids)].astype(np.int16)


# --- Unlearnable Clusters: label-agnostic --------------------------------------------------------------------


def test_uc_needs_no_surrogate_and_ignores_the_labels(one_thread):
    """Permuting the labels (the pipeline's surrogate is then trained on the permuted labels) leaves the
    poisoned pixels and ids byte-identical; the label columns follow the dataset (clean-label).
    Fails on the old code, which clustered the features of the labelled surrogate."""
    train = tiny_dataset(n=160, k=4)
    perm = np.random.default_rng(7).permutation(train.num_classes)
    permuted = train.replace(labels=perm[train.labels])
    a = craft("unlearnable_clusters", train, UC_TINY, surrogates=[fit_surrogate(train)], budget=0.5)
    b = craft("unlearnable_clusters", permuted, UC_TINY, surrogates=[fit_surrogate(permuted)], budget=0.5)
    assert np.array_equal(a.ids, b.ids)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(b.orig_labels, perm[a.orig_labels]) and np.array_equal(b.poison_labels, b.orig_labels)
    assert np.abs(deltas(a, train)).max() > 0
    c = craft("unlearnable_clusters", train, UC_TINY, budget=0.5)  # no surrogate at all: same poisons
    assert to_parquet_bytes(a) == to_parquet_bytes(c)


def test_uc_generator_trains_on_the_whole_set_with_crop_and_flip(one_thread):
    """Each cluster's generator sees every protected sample under crop/flip (the reference's train_gnet);
    switching the augmentation off changes the poisons, and every cluster still gets one shared pattern."""
    train = tiny_dataset(n=120, k=3)
    with_aug = craft("unlearnable_clusters", train, UC_TINY)
    without = craft("unlearnable_clusters", train, {**UC_TINY, "augment": False})
    assert not np.array_equal(with_aug.images, without.images)
    assert sum(with_aug.targets["cluster_sizes"]) == len(train)


# --- TUE: shuffled batches, reference augmentations ----------------------------------------------------------


def test_shuffled_batches_mix_classes_so_csd_is_not_zero_on_sorted_data():
    """Contiguous slices of class-sorted data (the old batching) hold one class each and give CSD = 0;
    the seeded shuffle gives every batch several classes and a positive CSD."""
    labels = torch.from_numpy(sorted_by_class().labels)
    noise = torch.rand((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    contiguous = [np.arange(i, i + 40) for i in range(0, 200, 40)]
    assert all(float(csd(noise[b], labels[b])) == 0.0 for b in contiguous)
    batches = shuffled_batches(len(labels), 40, torch.Generator().manual_seed(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    assert all(len(torch.unique(labels[b])) >= 2 and float(csd(noise[b], labels[b])) > 0 for b in batches)


def test_tue_on_class_sorted_data_makes_the_noise_class_separable(one_thread):
    """With the reference's weights (CSD only) on class-sorted data, crafting lowers the CSD of the noise
    far below that of the uniform random start. On the old code every batch was one class, CSD and its
    gradient were 0 and the noise never left the random start."""
    train = sorted_by_class()
    ps = craft("tue", train, TUE_TINY)
    labels = torch.from_numpy(ps.orig_labels)
    crafted = torch.from_numpy(deltas(ps, train).astype(np.float32))
    start = torch.randint(-EPS, EPS + 1, crafted.shape, generator=torch.Generator().manual_seed(0)).float()
    assert float(csd(crafted, labels)) < 0.5 * float(csd(start, labels))
    assert ps.targets["final_batch_csd"] > 0


@pytest.mark.parametrize("ssl_weight", [0.0, 1.0])
def test_tue_same_seed_same_poisons(one_thread, ssl_weight):
    train = sorted_by_class(n=80, k=4)
    params = {**TUE_TINY, "epochs": 1, "ssl_weight": ssl_weight}
    a, b, c = (craft("tue", train, params, seed=s) for s in (3, 3, 4))
    assert to_parquet_bytes(a) == to_parquet_bytes(b)
    assert not np.array_equal(a.images, c.images)


def test_tue_defaults_are_the_reference_demo():
    p = make_attack("tue").params
    assert (p.epochs, p.train_steps, p.steps, p.step_size, p.step_fraction, p.batch_size) == (40, 20, 20, 0.8, None, 512)
    assert (p.ssl_weight, p.csd_weight, p.random_start, p.projection_dim) == (0.0, 0.1, True, 128)


def test_rgb_views_carry_colour_jitter_and_greyscale():
    """On pure-red images: about 20 % of views turn grey (R = G = B), most others change hue/saturation;
    the old augmentation only scaled brightness, so red stayed red and nothing turned grey."""
    red = torch.zeros((400, 3, 8, 8))
    red[:, 0] = 0.8
    views = simclr_views(red, torch.Generator().manual_seed(0))
    grey = (views.amax(dim=1) - views.amin(dim=1)).amax(dim=(1, 2)) < 1e-6
    assert 0.12 < float(grey.float().mean()) < 0.28
    tinted = (views[:, 1:].amax(dim=(1, 2, 3)) > 0.02) & ~grey
    assert float(tinted.float().mean()) > 0.5
    jittered = color_jitter(red, torch.Generator().manual_seed(1))
    assert 0.7 < float((jittered != red).flatten(1).any(1).float().mean()) < 0.9  # applied with p = 0.8
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(random_grayscale(red[:, :1], gen), red[:, :1])  # identity on one channel


def test_views_are_differentiable_for_the_noise():
    x = torch.rand((6, 3, 8, 8))
    delta = torch.zeros_like(x, requires_grad=True)
    simclr_views((x + delta).clamp(0, 1), torch.Generator().manual_seed(0)).sum().backward()
    assert delta.grad is not None and float(delta.grad.abs().sum()) > 0
