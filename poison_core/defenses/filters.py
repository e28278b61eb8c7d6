"""Filter defenses in feature space: spectral signatures, activation clustering, deep k-NN.

Each trains the victim architecture on the full (possibly poisoned) training set with the victim's
own recipe and seed (the model an undefended victim would get), reads every training sample's
penultimate features `model.features(x)`, decides a keep mask, and FilterDefense then trains a fresh
victim on what is kept and reports filter precision/recall against the ground truth. The decision
rules are pure functions of (features, labels) so they can be tested on planted data.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from poison_core.defenses.base import DefenseContext, DefenseParams, FilterDefense, register_defense
from poison_core.training import to_tensor

log = logging.getLogger(__name__)


def feature_model(ctx: DefenseContext) -> nn.Module:
    """The victim architecture trained on all of ctx.train with the victim recipe and seed (eval mode)."""
    from poison_core.protocols import build_victim
    from poison_core.training import train_model

    data = ctx.train
    model = build_victim(ctx.victim, data, ctx.seed, ctx.device)
    train_model(model, data, ctx.victim.train, device=ctx.device, seed=ctx.seed)
    return model.eval()


def extract_features(model: nn.Module, images: np.ndarray, device: torch.device,
                     batch_size: int = 512) -> np.ndarray:
    """Penultimate features (N, D) float64 of uint8 NHWC images, in eval mode without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(model.features(to_tensor(images[start:start + batch_size], device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """Outlier score of each row (Tran et al. 2018, Algorithm 1): the squared projection of the centred
    representation onto the top right singular vector of the centred matrix, tau_i = ((R_i - mean) . v)^2."""
    centred = features - features.mean(axis=0, keepdims=True)
    if not np.any(centred):
        return np.zeros(len(features))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


def spectral_keep(features: np.ndarray, labels: np.ndarray, removal_fraction: float) -> np.ndarray:
    """Per class y, drop the floor(removal_fraction * n_y) samples with the largest spectral scores."""
    keep = np.ones(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_remove = math.floor(removal_fraction * len(idx) + 1e-9)
        if len(idx) < 2 or n_remove == 0:
            continue
        scores = spectral_scores(features[idx])
        keep[idx[np.argsort(-scores, kind="stable")[:n_remove]]] = False
    return keep


def activation_clustering_keep(features: np.ndarray, labels: np.ndarray, n_components: int,
                               reduction: Literal["ica", "pca"], size_threshold: float, seed: int) -> np.ndarray:
    """Chen et al. 2018 (Sec. 4): per class, reduce the activations to `n_components` dimensions
    (ICA, or PCA), split them with 2-means, and flag the smaller cluster when its share of the class
    is below `size_threshold` (the relative-size analysis). ICA runs on the leading principal
    components (at most the activations' rank), which is the whitening step ICA needs anyway.
    Caveat: ICA outputs unit-variance components, so a cluster holding a fraction q of its class is
    at most 1/sqrt(q (1 - q)) standard deviations from the rest along its component, and with many
    near-Gaussian components 2-means may prefer a balanced split; 'pca' keeps the variance scale."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    keep = np.ones(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        acts = features[idx]
        rank = int(np.linalg.matrix_rank(acts - acts.mean(axis=0))) if len(idx) > 2 else 0
        dims = min(n_components, rank, len(idx) - 1)
        if dims < 1:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reduced = PCA(n_components=dims, random_state=seed).fit_transform(acts)
            if reduction == "ica":
                reduced = FastICA(n_components=dims, max_iter=1000, tol=0.005, whiten="unit-variance",
                                  random_state=seed).fit_transform(reduced)
            clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(clusters, minlength=2)
        small = int(np.argmin(sizes))
        if sizes[small] / len(idx) < size_threshold:
            keep[idx[clusters == small]] = False
    return keep


def deep_knn_keep(features: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
                  chunk: int = 1024) -> np.ndarray:
    """Peri et al. 2020 (Algorithm 1): keep a sample iff its label is a plurality label of its k nearest
    other training samples in feature space (Euclidean); a tie that includes its label keeps it."""
    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return np.ones(n, dtype=bool)
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    neighbours = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        dist = torch.cdist(feats[start:start + chunk], feats)
        rows = torch.arange(len(dist))
        dist[rows, rows + start] = float("inf")
        neighbours[start:start + chunk] = torch.topk(dist, k, largest=False).indices.numpy()
    counts = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), k), labels[neighbours].ravel()), 1)
    return counts[np.arange(n), labels] == counts.max(axis=1)


class SpectralParams(DefenseParams):
    """removal_fraction: share of each class removed, 1.5 x the assumed poison rate (paper: 1.5 x 10 %)."""

    removal_fraction: float = Field(0.15, gt=0, lt=1)


class ActivationClusteringParams(DefenseParams):
    """n_components: dimensions after reduction (paper 10); reduction: ICA (paper) or PCA;
    size_threshold: a cluster smaller than this share of its class is flagged (0.35)."""

    n_components: int = Field(10, ge=1, le=1024)
    reduction: Literal["ica", "pca"] = "ica"
    size_threshold: float = Field(0.35, gt=0, le=0.5)


class DeepKNNParams(DefenseParams):
    """k: neighbours consulted (Peri et al. tune it to about the number of poisons per class)."""

    k: int = Field(10, ge=1, le=1000)


@register_defense
class SpectralSignatures(FilterDefense):
    """Remove, per class, the samples whose centred features project most on the top singular vector."""

    name = "spectral_signatures"
    paper = "Tran, Li & Madry, NeurIPS 2018, Spectral signatures in backdoor attacks"
    summary = "filter: per class, drop the largest projections on the top singular vector of the features"
    Params = SpectralParams

    def keep_mask(self, ctx: DefenseContext) -> np.ndarray:
        feats = extract_features(feature_model(ctx), ctx.train.images, ctx.device)
        return spectral_keep(feats, ctx.train.labels, self.params.removal_fraction)


@register_defense
class ActivationClustering(FilterDefense):
    """Per class, 2-means on reduced activations; drop the small cluster (Chen et al. 2018)."""

    name = "activation_clustering"
    paper = "Chen et al., 2018, Detecting backdoor attacks on deep neural networks by activation clustering"
    summary = "filter: per class, ICA + 2-means on activations, drop a cluster below the size threshold"
    Params = ActivationClusteringParams

    def keep_mask(self, ctx: DefenseContext) -> np.ndarray:
        p = self.params
        feats = extract_features(feature_model(ctx), ctx.train.images, ctx.device)
        return activation_clustering_keep(feats, ctx.train.labels, p.n_components, p.reduction, p.size_threshold,
                                          seed=ctx.seed)


@register_defense
class DeepKNN(FilterDefense):
    """Drop samples whose label is not the plurality of their k nearest neighbours' (Peri et al. 2020)."""

    name = "deep_knn"
    paper = "Peri et al., ECCV Workshops 2020, Deep k-NN defense against clean-label data poisoning attacks"
    summary = "filter: drop samples whose label disagrees with the plurality of their k feature-space neighbours"
    Params = DeepKNNParams

    def keep_mask(self, ctx: DefenseContext) -> np.ndarray:
        feats = extract_features(feature_model(ctx), ctx.train.images, ctx.device)
        return deep_knn_keep(feats, ctx.train.labels, self.params.k, ctx.train.num_classes)
