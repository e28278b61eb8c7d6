"""Deep Partition Aggregation: the certificate checked by brute force, content-hash partitions, the
job map, and the premise of the certificate (one inserted/removed sample changes one base model)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poison_core.config import ModelConfig, TrainConfig, VictimConfig
from poison_core.defenses import DefenseContext, EnsembleClassifier, make_defense, sequential_map
from poison_core.defenses.dpa import (certified_accuracy, certified_radius, certified_report, partition_of, plurality,
                                      train_one)
from tests.helpers import tiny_dataset

VICTIM = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=32))


def _reachable(votes: tuple[int, ...], moves: int) -> list[set[tuple[int, ...]]]:
    """levels[d] = every vote vector reachable from `votes` by exactly d single-vote moves (a vote taken
    from one class and given to another, i.e. one base model changing its output)."""
    levels = [{votes}]
    for _ in range(moves):
        nxt = set()
        for v in levels[-1]:
            for a in range(len(v)):
                if v[a] == 0:
                    continue
                for b in range(len(v)):
                    if b != a:
                        w = list(v)
                        w[a] -= 1
                        w[b] += 1
                        nxt.add(tuple(w))
        levels.append(nxt)
    return levels


def _check_tight(votes: tuple[int, ...]) -> None:
    radius = int(certified_radius(np.array([votes]))[0])
    pred = int(plurality(np.array([votes]))[0])
    levels = _reachable(votes, radius + 1)
    for d in range(radius + 1):
        changed = [v for v in levels[d] if int(np.argmax(v)) != pred]
        assert not changed, f"{votes}: radius {radius} but {d} moves reach {changed[0]}"
    assert any(int(np.argmax(v)) != pred for v in levels[radius + 1]), \
        f"{votes}: radius {radius} is not tight, {radius + 1} moves cannot change the prediction"


def test_certified_radius_is_exact_by_brute_force_on_random_vote_tables():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        k_classes, n_models = int(rng.integers(2, 5)), int(rng.integers(1, 10))
        votes = np.bincount(rng.integers(0, k_classes, n_models), minlength=k_classes)
        _check_tight(tuple(int(v) for v in votes))
        checked += 1
    assert checked == 300


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=4).filter(lambda v: sum(v) > 0))
def test_certified_radius_is_exact_for_any_vote_vector(votes):
    _check_tight(tuple(votes))


def test_certified_radius_examples_and_tie_rule():
    votes = np.array([[3, 1, 0], [2, 2, 0], [1, 2, 0], [0, 5, 0], [0, 0, 7], [1, 1, 1]])
    # [1,2,0]: c=1, rival 0 gets +1 for being the smaller label -> (2 - 2) // 2 = 0
    assert certified_radius(votes).tolist() == [1, 0, 0, 2, 3, 0]
    assert plurality(votes).tolist() == [0, 0, 1, 1, 2, 0]


@pytest.mark.parametrize("bad", [np.array([1, 2]), np.array([[3], [1]]), np.array([[1.5, 2.0]]),
                                 np.array([[-1, 2]])])
def test_certified_radius_rejects_malformed_votes(bad):
    with pytest.raises(ValueError, match="votes"):
        certified_radius(bad)


def test_certified_accuracy_is_accuracy_at_zero_and_non_increasing():
    rng = np.random.default_rng(1)
    votes = rng.multinomial(9, [0.6, 0.2, 0.1, 0.1], size=200)
    labels = rng.integers(0, 4, 200)
    radii = np.arange(0, 7)
    curve = certified_accuracy(votes, labels, radii)
    assert curve[0] == pytest.approx(np.mean(plurality(votes) == labels))
    assert np.all(np.diff(curve) <= 0)
    assert curve[-1] == 0.0  # 9 voters cannot certify 6 changes
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(votes, labels[:-1], radii)


def test_partition_is_a_function_of_content_not_position_or_id():
    data = tiny_dataset(n=300, k=5, seed=3)
    parts = partition_of(data.images, 7)
    perm = np.random.default_rng(0).permutation(len(data))
    shuffled = data.subset(perm).replace(ids=np.arange(len(data)) * 13 + 5)
    assert np.array_equal(partition_of(shuffled.images, 7), parts[perm])
    assert np.array_equal(partition_of(data.images[:10], 7), parts[:10])
    assert np.array_equal(partition_of(data.images, 7, "pixel_sum"),
                          data.images.reshape(len(data), -1).astype(np.int64).sum(1) % 7)  # the reference's hash


def test_partitions_are_roughly_balanced():
    data = tiny_dataset(n=5000, k=10, seed=4)
    for k in (2, 10, 50):
        sizes = np.bincount(partition_of(data.images, k), minlength=k)
        expected = len(data) / k
        assert sizes.sum() == len(data)
        assert np.all(np.abs(sizes - expected) < 5 * np.sqrt(expected)), (k, sizes)


def test_fit_trains_k_models_through_ctx_map_with_a_picklable_module_level_job():
    data = tiny_dataset(n=80, k=4)
    recorded = []

    def recording_map(fn, calls):
        recorded.append((fn, list(calls)))
        pickle.dumps((fn, calls))  # what a Ray-backed map has to ship
        return sequential_map(fn, calls)

    result = make_defense("dpa", {"k": 4}).fit(DefenseContext(train=data, victim=VICTIM, seed=0, map=recording_map))
    assert len(recorded) == 1 and recorded[0][0] is train_one and len(recorded[0][1]) == 4
    state = train_one(*recorded[0][1][0])
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert isinstance(result.classifier, EnsembleClassifier) and len(result.classifier.models) == 4
    votes = result.classifier.votes(data.images)
    assert votes.shape == (80, 4) and np.all(votes.sum(axis=1) == 4)
    assert np.array_equal(result.classifier.predict_logits(data.images).argmax(1), plurality(votes))
    sizes = np.bincount(partition_of(data.images, 4), minlength=4)
    assert [h["size"] for h in result.history] == sizes.tolist()


def _states(data, k=4, seed=0):
    result = make_defense("dpa", {"k": k}).fit(DefenseContext(train=data, victim=VICTIM, seed=seed))
    return [m.state_dict() for m in result.classifier.models]


def _same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


def test_base_models_depend_only_on_their_partition_content():
    data = tiny_dataset(n=120, k=4, seed=5)
    base = _states(data)
    perm = np.random.default_rng(1).permutation(len(data))
    reordered = _states(data.subset(perm).replace(ids=np.arange(len(data)) + 1000))
    assert all(_same(a, b) for a, b in zip(base, reordered))
    extra = tiny_dataset(n=1, k=4, seed=99, id_offset=5000)
    inserted = data.replace(images=np.concatenate([data.images, extra.images]),
                            labels=np.concatenate([data.labels, extra.labels]),
                            ids=np.concatenate([data.ids, extra.ids]))
    changed = [i for i, (a, b) in enumerate(zip(base, _states(inserted))) if not _same(a, b)]
    assert changed == [int(partition_of(extra.images, 4)[0])]
    without_first = _states(data.subset(np.arange(1, len(data))))
    deleted = [i for i, (a, b) in enumerate(zip(base, without_first)) if not _same(a, b)]
    assert deleted == [int(partition_of(data.images[:1], 4)[0])]


def test_tiny_partitions_vote_for_class_zero_and_the_report_names_radii():
    data = tiny_dataset(n=6, k=3)
    result = make_defense("dpa", {"k": 40}).fit(DefenseContext(train=data, victim=VICTIM, seed=0))
    assert result.info["constant_partitions"] >= 34  # 6 samples leave at least 34 of 40 partitions empty
    votes = result.classifier.votes(data.images)
    assert np.all(votes[:, 0] >= 34)
    report = certified_report(result.classifier, data.images, data.labels)
    assert set(report) == {"certified_acc_r0", "certified_acc_r1", "certified_acc_r2", "certified_acc_r5",
                           "median_certified_radius"}


def test_dpa_is_reproducible():
    data = tiny_dataset(n=90, k=3, seed=6)
    preds = [make_defense("dpa", {"k": 3}).fit(DefenseContext(train=data, victim=VICTIM, seed=7))
             .classifier.predict_logits(data.images) for _ in range(2)]
    assert np.array_equal(preds[0], preds[1])
