"""Evaluation metrics and confidence intervals.

* clean accuracy; accuracy drop against the clean (no-poison) victim;
* targeted success: the target test sample classified as the adversarial class
  (Shafahi et al. 2018; Geiping et al. 2021);
* backdoor attack success rate (ASR): triggered test images whose true class is not the target
  class, classified as the target class (Gu et al. 2017);
* Wilson score interval for a rate k/n (Wilson, JASA 1927; Brown, Cai & DasGupta 2001), a Student-t
  interval of a mean over seeds (Student 1908; Abramowitz & Stegun 26.7.3-4 for its quantile), and a
  percentile bootstrap interval for a mean over seeds or targets (Efron & Tibshirani 1993).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to labels (NaN for an empty set)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def accuracy_drop(clean_accuracy: float, poisoned_accuracy: float) -> float:
    """Clean victim's accuracy minus the poisoned victim's (positive = damage)."""
    return float(clean_accuracy - poisoned_accuracy)


def targeted_success(predictions: np.ndarray, adversarial_classes: np.ndarray) -> np.ndarray:
    """Per target: True when the target sample is classified as its adversarial class."""
    return np.asarray(predictions) == np.asarray(adversarial_classes)


def attack_success_rate(triggered_predictions: np.ndarray, true_labels: np.ndarray, target_class: int) -> float:
    """Backdoor ASR over triggered test images whose true class is not `target_class`."""
    keep = np.asarray(true_labels) != target_class
    if not keep.any():
        return float("nan")
    return float(np.mean(np.asarray(triggered_predictions)[keep] == target_class))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate; (0, 1) when there are no trials."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..trials, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: np.ndarray, confidence: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer) degrees of freedom, in closed form
    (Abramowitz & Stegun 1964, eq. 26.7.3 for odd df and 26.7.4 for even df)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + c2/2 + 1*3 c2^2/(2*4) + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0  # (2/pi)(theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ... up to cos^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = `confidence` (e.g. 12.706 for 95 % and df=1), by bisection."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_coverage(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_coverage(mid, df) < confidence else (low, mid)
    return (low + high) / 2


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean over seeds, ``mean +- t_{n-1} * sd / sqrt(n)`` (Student 1908),
    or None for fewer than two values: a single seed says nothing about the seed-to-seed spread."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return None
    mean, half = float(values.mean()), t_quantile(confidence, values.size - 1) * float(values.std(ddof=1))
    half /= math.sqrt(values.size)
    return mean - half, mean + half


# How each metric varies, so its interval is the right one (the one place that says so):
#   "keys":  a success count over poison keys (targeted attacks): Wilson on the successes pooled over
#            every key of every seed (numerator and denominator columns in KEY_COUNTS);
#   "seeds": a rate or mean measured on test images: Student-t over seeds, none from one seed;
#   "none":  a count or a setting (n_poison, ...): no interval.
KEY_COUNTS = {"target_success": ("target_hits", "n_targets")}
SETTINGS = ("n_poison", "n_targets", "target_hits", "n_seeds", "seed")


def metric_kind(name: str) -> str:
    """"keys", "seeds" or "none" for a cell metric (``baseline_x`` is of the kind of ``x``)."""
    base = name.removeprefix("baseline_")
    if base in KEY_COUNTS:
        return "keys"
    if base in SETTINGS or base.startswith("n_") or base.endswith("_count"):
        return "none"
    return "seeds"


def metric_range(name: str) -> tuple[float, float] | None:
    """The values a metric can take, where bounded: an interval is clipped to it (the mean cannot lie
    outside). Accuracy drop is a difference of two rates, in [-1, 1]; rates, accuracies,
    probabilities, precision and recall are in [0, 1]; anything else is unbounded (None)."""
    base = name.removeprefix("baseline_").removeprefix("defense_")
    if base.endswith("acc_drop"):
        return -1.0, 1.0
    if any(word in base for word in ("acc", "asr", "rate", "success", "prob", "precision", "recall")):
        return 0.0, 1.0
    return None


def key_count_columns(name: str) -> tuple[str, str]:
    """The (successes, trials) columns of a "keys" metric: ``target_success`` -> target_hits, n_targets."""
    prefix = "baseline_" if name.startswith("baseline_") else ""
    hits, trials = KEY_COUNTS[name.removeprefix(prefix)]
    return prefix + hits, prefix + trials


# Plain column titles of the results table (summary.md, `belladonna report`, the MLflow description).
SUMMARY_COLUMNS = {"attack": "attack", "defense": "defense", "n_seeds": "seeds", "clean_acc": "clean accuracy",
                   "baseline_clean_acc": "clean accuracy (no poison)", "acc_drop": "accuracy drop",
                   "asr": "attack success (backdoor)", "baseline_asr": "attack success (no poison)",
                   "pair_flip_rate": "source->target flips", "target_success": "targets hit",
                   "adv_prob": "p(adversarial class)", "baseline_adv_prob": "p(adversarial class) (no poison)"}


def format_value(entry: dict, name: str, digits: int = 3) -> str:
    """A summary value as ``0.871 [0.842, 0.897] (n=3)``: the mean, its interval when it has one, and
    the n the interval is over (seeds, or poison keys for targeted success); "-" when absent."""
    value = entry.get(name)
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return str(value)
    if metric_kind(name) == "none" or name in ("n_seeds", "seed"):
        return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)
    text = f"{value:.{digits}f}"
    ci, n = entry.get(f"{name}_ci"), entry.get(f"{name}_n")
    if ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text + (f" (n={n})" if n is not None else "")
