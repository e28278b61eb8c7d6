"""Linear separability of perturbations: Yu et al., 'Availability Attacks Create Shortcuts', KDD 2022
(Table 1), as used in Ren et al., 'Transferable Unlearnable Examples', ICLR 2023 (Table 1).

Both papers train simple classifiers on the perturbations ALONE, (delta_i, y_i), and report their
accuracy: availability poisons that work are (almost) linearly separable by class, while random
noise is not. :func:`perturbation_separability` fits a linear model (logistic regression) and a
two-layer MLP (one hidden ReLU layer) on a seeded, stratified train split of the flattened deltas
and returns their accuracies on the held-out split (chance is 1 / number of classes).

Deltas measured after the [0, 255] clip carry some of the image: where a pixel is black only
positive noise survives, so on data with black backgrounds (Fashion-MNIST) even uniform random noise
traces the object's silhouette and scores well above chance (~0.48 there). Compare attacks with the
random-noise control on the same data rather than with 1 / K alone.

scikit-learn is imported on first use: the report module that imports this one loads in every
flow process, and sklearn costs about a second there.
"""

from __future__ import annotations

import warnings

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.poisons import PoisonSet


def perturbation_separability(deltas: np.ndarray, labels: np.ndarray, *, seed: int = 0, test_fraction: float = 0.3,
                              hidden: int = 128, max_iter: int = 200) -> dict[str, float]:
    """Held-out accuracy of a linear model and a two-layer MLP trained on (delta, label).

    deltas: integer perturbations (N, H, W, C) on the uint8 grid (poisoned - clean, int16);
    labels: (N,) class labels. Returns {"linear": acc, "mlp": acc, "chance": 1 / K}.
    """
    deltas, labels = np.asarray(deltas), np.asarray(labels)
    if deltas.ndim != 4 or len(deltas) != len(labels):
        raise ConfigError(f"deltas: expected (N, H, W, C) with N = {len(labels)} labels, got {deltas.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: {test_fraction} is outside (0, 1)")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ConfigError("labels: need at least two classes with two samples each")
    x = deltas.reshape(len(deltas), -1).astype(np.float64)
    x /= max(float(np.abs(x).max()), 1.0)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=test_fraction, random_state=seed,
                                                        stratify=labels)
    linear = LogisticRegression(max_iter=max_iter)
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear.fit(x_train, y_train)
        mlp.fit(x_train, y_train)
    return {"linear": float(linear.score(x_test, y_test)), "mlp": float(mlp.score(x_test, y_test)),
            "chance": 1.0 / len(classes)}


def poison_separability(poison_set: PoisonSet, train: ImageDataset, *, max_samples: int = 2000,
                        seed: int = 0) -> dict[str, float] | None:
    """:func:`perturbation_separability` of a PoisonSet's deltas (at most `max_samples`, drawn with
    `seed`), labelled by the poisons' true classes; None when it changes no pixel (label flips) or
    covers fewer than two classes."""
    clean = train.images[train.positions(poison_set.ids)].astype(np.int16)
    deltas = poison_set.images.astype(np.int16) - clean
    labels = np.asarray(poison_set.orig_labels)
    if not deltas.any():
        return None
    if len(deltas) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(deltas), size=max_samples, replace=False))
        deltas, labels = deltas[keep], labels[keep]
    _, counts = np.unique(labels, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        return None
    return perturbation_separability(deltas, labels, seed=seed)
