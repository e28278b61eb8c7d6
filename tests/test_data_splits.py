"""Splitting, subsampling and the digits loader: determinism, stratification, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poison_core.config import BenchmarkConfig, DatasetConfig
from poison_core.data import DATASETS, ImageDataset, load_dataset, split_dataset, subsample
from poison_core.data.splits import allocate
from poison_core.errors import ConfigError, DatasetError
from poison_core.members import check_names


def make_dataset(counts: list[int], seed: int = 0) -> ImageDataset:
    """A dataset with counts[k] samples of class k, shuffled, ids 100.. (not positions)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    images = rng.integers(0, 256, size=(len(labels), 4, 4, 1), dtype=np.uint8)
    return ImageDataset(images, labels, tuple(str(k) for k in range(len(counts))),
                        ids=np.arange(100, 100 + len(labels)), name="toy")


def class_counts(ds: ImageDataset) -> np.ndarray:
    return np.bincount(ds.labels, minlength=ds.num_classes)


def test_allocate_is_exact_and_proportional() -> None:
    quotas = allocate(np.array([50, 30, 20]), 10)
    assert quotas.tolist() == [5, 3, 2]
    assert allocate(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
@settings(max_examples=100, deadline=None)
def test_allocate_property(counts: list[int], data: st.DataObject) -> None:
    n = data.draw(st.integers(0, sum(counts)))
    quotas = allocate(np.array(counts), n)
    assert quotas.sum() == n
    assert np.all(quotas <= np.array(counts)) and np.all(quotas >= 0)
    assert np.all(np.abs(quotas - np.array(counts) * n / max(sum(counts), 1)) < 1)


def test_split_sizes_disjoint_and_ids_preserved() -> None:
    ds = make_dataset([40, 40, 20])
    rest, held = split_dataset(ds, 0.25, seed=3)
    assert (len(rest), len(held)) == (75, 25)
    assert set(rest.ids).isdisjoint(held.ids)
    assert set(rest.ids) | set(held.ids) == set(ds.ids)
    for part in (rest, held):
        pos = ds.positions(part.ids)
        assert np.all(np.diff(pos) > 0), "results are ordered by position"
        np.testing.assert_array_equal(ds.images[pos], part.images)
        np.testing.assert_array_equal(ds.labels[pos], part.labels)


def test_split_is_stratified() -> None:
    rest, held = split_dataset(make_dataset([60, 30, 10]), 0.2, seed=0)
    assert class_counts(held).tolist() == [12, 6, 2]
    assert class_counts(rest).tolist() == [48, 24, 8]


def test_split_is_deterministic_by_seed() -> None:
    ds = make_dataset([30, 30])
    a, b, c = (split_dataset(ds, 0.3, seed=s)[1].ids for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_split_unstratified_has_exact_size() -> None:
    _, held = split_dataset(make_dataset([90, 10]), 0.1, seed=1, stratify=False)
    assert len(held) == 10


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DatasetError, match="fraction"):
        split_dataset(make_dataset([5, 5]), fraction, seed=0)


def test_split_rejects_single_sample() -> None:
    with pytest.raises(DatasetError, match="at least 2"):
        split_dataset(make_dataset([1]), 0.5, seed=0)


def test_subsample_stratified_deterministic() -> None:
    ds = make_dataset([50, 30, 20])
    small = subsample(ds, 10, seed=5)
    assert class_counts(small).tolist() == [5, 3, 2]
    assert set(small.ids) <= set(ds.ids)
    np.testing.assert_array_equal(small.ids, subsample(ds, 10, seed=5).ids)
    assert not np.array_equal(small.ids, subsample(ds, 10, seed=6).ids)
    assert np.all(np.diff(ds.positions(small.ids)) > 0)


def test_subsample_full_size_is_identity() -> None:
    ds = make_dataset([3, 3])
    assert subsample(ds, 6, seed=0) is ds


@pytest.mark.parametrize("n", [0, 101])
def test_subsample_out_of_range_names_field(n: int) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.n_train: .* outside 1\.\.100"):
        subsample(make_dataset([50, 50]), n, seed=0, field="dataset.n_train")


def test_digits_real_loading() -> None:
    splits = load_dataset(DatasetConfig(name="digits"))
    train, test = splits.train, splits.test
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    assert train.class_names == tuple(str(d) for d in range(10))
    assert (len(train), len(test)) == (1348, 449)
    assert splits.val is None
    assert (train.name, test.name) == ("digits/train", "digits/test")
    assert set(train.ids).isdisjoint(test.ids)
    assert train.images.max() == 255 and train.images.min() == 0
    assert len(np.unique(test.labels)) == 10


def test_digits_determinism_and_seed() -> None:
    a = load_dataset(DatasetConfig(name="digits", seed=1))
    b = load_dataset(DatasetConfig(name="digits", seed=1))
    c = load_dataset(DatasetConfig(name="digits", seed=2))
    assert a.train.checksum() == b.train.checksum() and a.test.checksum() == b.test.checksum()
    assert a.test.checksum() != c.test.checksum()


def test_digits_subsample_and_val() -> None:
    cfg = DatasetConfig(name="digits", n_train=200, n_test=50, val_fraction=0.1, test_fraction=0.5, seed=4)
    splits = load_dataset(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 50)
    assert splits.val.name == "digits/val"
    assert set(splits.train.ids).isdisjoint(splits.val.ids)
    assert np.all(class_counts(splits.train) >= 17)


def test_changing_n_test_keeps_train() -> None:
    a = load_dataset(DatasetConfig(name="digits", n_train=100, n_test=50))
    b = load_dataset(DatasetConfig(name="digits", n_train=100, n_test=60))
    np.testing.assert_array_equal(a.train.ids, b.train.ids)


def test_digits_n_train_too_large_names_field() -> None:
    with pytest.raises(DatasetError, match=r"dataset\.n_train"):
        load_dataset(DatasetConfig(name="digits", n_train=5000))


def test_registry_lists_loaders_and_config_validates_name() -> None:
    assert {"digits", "fashion-mnist", "cifar10", "imagefolder", "parquet"} <= set(DATASETS.names())
    assert DATASETS.entry("digits").summary
    with pytest.raises(ConfigError, match="^dataset.name: unknown dataset 'nope'"):
        check_names(BenchmarkConfig(name="t", dataset=DatasetConfig(name="nope"), attacks=[{"name": "label_flip"}]))
