"""Metrics and intervals against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from poison_core import metrics


def test_accuracy_and_drop():
    assert metrics.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    assert metrics.accuracy_drop(0.9, 0.6) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.accuracy(np.zeros(3), np.zeros(4))


def test_attack_success_rate_ignores_target_class_samples():
    pred = np.array([0, 0, 0, 1, 2])
    true = np.array([0, 1, 2, 1, 2])
    assert metrics.attack_success_rate(pred, true, target_class=0) == pytest.approx(2 / 4)
    assert np.isnan(metrics.attack_success_rate(pred[:1], true[:1], 0))


def test_targeted_success():
    assert metrics.targeted_success(np.array([3, 1]), np.array([3, 2])).tolist() == [True, False]


def test_wilson_interval_known_values():
    # Wilson 95 % for 0/10: (0, 0.2775); for 5/10: (0.2366, 0.7634) (Brown, Cai & DasGupta 2001).
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert metrics.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        metrics.wilson_interval(11, 10)


def test_bootstrap_interval_contains_mean_and_is_seeded():
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    low, high = metrics.bootstrap_interval(values, seed=3)
    assert low <= values.mean() <= high and (low, high) == metrics.bootstrap_interval(values, seed=3)
    assert metrics.bootstrap_interval(np.array([0.7, 0.7])) == pytest.approx((0.7, 0.7))


def test_t_quantile_matches_the_table():
    # two-sided 95 % Student-t quantiles (Fisher & Yates tables): df 1, 2, 4, 9, 29
    for df, known in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert metrics.t_quantile(0.95, df) == pytest.approx(known, abs=1e-4)
    assert metrics.t_quantile(0.90, 3) == pytest.approx(2.3534, abs=1e-4)


def test_t_interval_hand_computed_and_none_from_one_seed():
    values = np.array([0.85, 0.87, 0.893])  # mean 0.871, sd 0.021564 (n-1); t(0.975, 2) = 4.3027
    sd = ((0.021 ** 2 + 0.001 ** 2 + 0.022 ** 2) / 2) ** 0.5
    half = 4.302653 * sd / 3 ** 0.5
    assert metrics.t_interval(values) == pytest.approx((0.871 - half, 0.871 + half), abs=1e-6)
    assert metrics.t_interval(np.array([0.9])) is None
    assert metrics.t_interval(np.array([1.0, 1.0])) == (1.0, 1.0)


def test_metric_kinds_are_defined_in_one_place():
    assert metrics.metric_kind("target_success") == metrics.metric_kind("baseline_target_success") == "keys"
    for rate in ("clean_acc", "asr", "baseline_asr", "pair_flip_rate", "acc_drop", "certified_acc_r2"):
        assert metrics.metric_kind(rate) == "seeds"
    for setting in ("n_poison", "n_targets", "target_hits", "n_seeds"):
        assert metrics.metric_kind(setting) == "none"


def rows_of(**by_seed):
    """One cell row per seed from {metric: [value per seed]}."""
    n = len(next(iter(by_seed.values())))
    return [{"attack": "a", "defense": "d", "seed": s, **{k: v[s] for k, v in by_seed.items()}} for s in range(n)]


def test_summarize_interval_by_metric_kind():
    from poison_core.evaluation import summarize

    # ASR 1.0 on two seeds: the old code took each seed for one coin flip (Wilson (0.34, 1.0));
    # a rate over test images varies over seeds: Student-t, here of zero spread.
    (entry,) = summarize(rows_of(asr=[1.0, 1.0], baseline_asr=[0.0, 0.0], clean_acc=[0.90, 0.92],
                                 n_poison=[50, 50]))
    assert entry["asr"] == 1.0 and entry["asr_ci"] == (1.0, 1.0) and entry["asr_n"] == 2
    assert entry["baseline_asr_ci"] == (0.0, 0.0)
    half = 12.706205 * (0.02 / 2 ** 0.5) / 2 ** 0.5  # t(0.975, 1) * sd / sqrt(2)
    assert entry["clean_acc_ci"] == pytest.approx((0.91 - half, 1.0), abs=1e-6)  # 0.91 + 0.127, clipped to 1
    assert entry["n_poison"] == 50 and "n_poison_ci" not in entry and "n_poison_n" not in entry


def test_rate_intervals_are_clipped_to_the_rate_range():
    from poison_core.evaluation import summarize

    (entry,) = summarize(rows_of(clean_acc=[0.9, 1.0], acc_drop=[0.0, 0.1]))
    half = 12.706205 * (0.1 / 2 ** 0.5) / 2 ** 0.5  # 0.635: the unclipped interval passes 1
    assert entry["clean_acc_ci"] == pytest.approx((0.95 - half, 1.0), abs=1e-6)
    assert entry["acc_drop_ci"] == pytest.approx((0.05 - half, 0.05 + half), abs=1e-6)


def test_summarize_pools_targeted_success_over_keys_of_all_seeds():
    from poison_core.evaluation import summarize

    (entry,) = summarize(rows_of(target_success=[0.25, 0.5, 0.0], target_hits=[1, 2, 0], n_targets=[4, 4, 4]))
    assert entry["target_success"] == pytest.approx(3 / 12) and entry["target_success_n"] == 12
    assert entry["target_success_ci"] == metrics.wilson_interval(3, 12)
    assert entry["target_success_ci"] == pytest.approx((0.0889, 0.5323), abs=1e-4)  # Wilson 3/12, by hand


def test_summarize_gives_no_interval_from_a_single_seed():
    from poison_core.evaluation import summarize

    (entry,) = summarize(rows_of(clean_acc=[0.9], asr=[0.4]))
    assert entry["clean_acc_n"] == 1 and "clean_acc_ci" not in entry and "asr_ci" not in entry
    assert metrics.format_value(entry, "clean_acc") == "0.900 (n=1)"


def test_format_value_reads_mean_interval_and_n():
    entry = {"clean_acc": 0.8714, "clean_acc_ci": [0.8421, 0.8969], "clean_acc_n": 3, "n_poison": 50.0, "n_seeds": 3}
    assert metrics.format_value(entry, "clean_acc") == "0.871 [0.842, 0.897] (n=3)"
    assert metrics.format_value(entry, "n_poison") == "50" and metrics.format_value(entry, "n_seeds") == "3"
    assert metrics.format_value(entry, "asr") == "-"
