"""Defenses: one file per defense, registered by name in DEFENSES."""

from poison_core.defenses.base import (DEFENSES, Defense, DefenseContext, DefenseParams, DefenseResult,
                                       EnsembleClassifier, FilterDefense, ModelClassifier, Predictor, detection_scores,
                                       make_defense, register_defense, sequential_map, train_victim)
from poison_core.defenses import none  # noqa: F401  (registration)
from poison_core.defenses import abl, adversarial, augment, dpa, filters, trimmed_loss  # noqa: F401  (registration)
from poison_core.defenses import dp_sgd, iss, ueraser  # noqa: F401  (registration)
from poison_core.defenses import neural_cleanse, strip  # noqa: F401  (registration)
from poison_core.defenses.dpa import certified_accuracy, certified_radius, certified_report, partition_of

__all__ = ["DEFENSES", "Predictor", "Defense", "DefenseContext", "DefenseParams", "DefenseResult",
           "EnsembleClassifier", "FilterDefense", "ModelClassifier", "detection_scores", "make_defense",
           "register_defense", "sequential_map", "train_victim",
           "certified_accuracy", "certified_radius", "certified_report", "partition_of"]
