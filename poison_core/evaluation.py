"""Evaluate a trained classifier against a PoisonSet's goal, and summarise cells over seeds.

For every cell the metrics are: clean test accuracy; for backdoors the attack success rate on
triggered test images of other classes (of the trigger's `source_class` only, when it names one);
for class-pair flips the rate at which source-class test images are classified as the target class;
for targeted attacks the per-target success and the adversarial-class probability. The same
function applied to the clean victim gives the no-poison baseline (`baseline_*`), as docs/design.md
asks for every cell.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from poison_core import metrics
from poison_core.data.dataset import ImageDataset
from poison_core.defenses.base import EnsembleClassifier, Predictor
from poison_core.poisons import PoisonSet
from poison_core.triggers import apply_trigger


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(classifier: Predictor, test: ImageDataset, poison_set: PoisonSet | None = None) -> dict[str, float]:
    """Metrics of `classifier` on `test`, and against the goal of `poison_set` when given."""
    pred = classifier.predict_logits(test.images).argmax(axis=1)
    out = {"clean_acc": metrics.accuracy(pred, test.labels)}
    if isinstance(classifier, EnsembleClassifier):  # DPA: certified accuracy by radius (Levine & Feizi 2021)
        from poison_core.defenses.dpa import certified_report

        out.update(certified_report(classifier, test.images, test.labels))
    if poison_set is None:
        return out
    goal = poison_set.targets or {}
    if poison_set.trigger is not None:
        source = poison_set.trigger.get("source_class")
        keep = np.ones(len(test), dtype=bool) if source is None else test.labels == int(source)
        triggered = apply_trigger(poison_set.trigger, test.images[keep])
        tpred = classifier.predict_logits(triggered).argmax(axis=1)
        out["asr"] = metrics.attack_success_rate(tpred, test.labels[keep], int(poison_set.trigger["target_class"]))
    if goal.get("kind") == "class_pair":
        src = test.labels == goal["source_class"]
        out["pair_flip_rate"] = float(np.mean(pred[src] == goal["target_class"])) if src.any() else float("nan")
    if goal.get("kind") == "targeted":
        pos = test.positions(np.asarray(goal["target_ids"]))
        adv = np.asarray(goal["adversarial_classes"])
        probs = _softmax(classifier.predict_logits(test.images[pos]))
        hits = metrics.targeted_success(probs.argmax(axis=1), adv)
        out["target_success"] = float(hits.mean())
        out["target_hits"], out["n_targets"] = int(hits.sum()), int(hits.size)
        out["adv_prob"] = float(probs[np.arange(len(pos)), adv].mean())
    return out


def summarize(rows: Iterable[dict[str, Any]], keys: tuple[str, ...] = ("attack", "defense"),
              confidence: float = 0.95) -> list[dict[str, Any]]:
    """Group cell rows by `keys`; per numeric metric the mean over seeds, and, by the metric's kind
    (:func:`poison_core.metrics.metric_kind`), a `confidence` interval ``<m>_ci`` with the n it is over
    ``<m>_n``:

    * targeted success ("keys"): Wilson on the successes pooled over every poison key of every seed
      (``target_hits`` of ``n_targets``), n = keys; the mean is then the pooled rate;
    * rates and means on test images ("seeds": clean accuracy, ASR, pair-flip rate, ...): Student-t
      over seeds, n = seeds, clipped to the metric's range (:func:`poison_core.metrics.metric_range`);
      no interval from a single seed;
    * counts and settings ("none": n_poison, ...): the mean only.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    table = []
    for group_key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, group_key))
        entry["n_seeds"] = len(members)
        names = sorted({m for row in members for m, v in row.items()
                        if m not in keys and isinstance(v, (int, float)) and not isinstance(v, bool) and m != "seed"})
        for name in names:
            values = np.array([row[name] for row in members if name in row], dtype=np.float64)
            values = values[~np.isnan(values)]
            if not len(values):
                continue
            entry[name] = float(values.mean())
            kind = metrics.metric_kind(name)
            if kind == "keys":
                _pooled_wilson(entry, name, members, confidence)
            elif kind == "seeds":
                entry[f"{name}_n"] = int(len(values))
                interval, bounds = metrics.t_interval(values, confidence), metrics.metric_range(name)
                if interval is not None and bounds is not None:  # the mean of a rate lies in [0, 1]
                    interval = (max(interval[0], bounds[0]), min(interval[1], bounds[1]))
                if interval is not None:
                    entry[f"{name}_ci"] = interval
        table.append(entry)
    return table


def _pooled_wilson(entry: dict[str, Any], name: str, members: list[dict[str, Any]], confidence: float) -> None:
    """Targeted success over the keys of all seeds; no interval for rows without the counts."""
    hits_col, trials_col = metrics.key_count_columns(name)
    counted = [row for row in members if hits_col in row and trials_col in row]
    if len(counted) != len(members):
        return
    hits, trials = sum(int(r[hits_col]) for r in counted), sum(int(r[trials_col]) for r in counted)
    if trials:
        entry[name] = hits / trials
        entry[f"{name}_ci"] = metrics.wilson_interval(hits, trials, confidence)
        entry[f"{name}_n"] = trials
