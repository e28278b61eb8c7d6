"""STRIP as a training-set filter (Gao, Xu, Wang, Chen, Ranasinghe & Nepal, 'STRIP: A Defence
Against Trojan Attacks on Deep Neural Networks', ACSAC 2019).

STRIP perturbs an input x by superimposing it with N other images x_n and looks at how random the
model's predictions on the blends are (Algorithm 1, Sec. 4): the entropy of each blend's softmax
y = f(x (+) x_n) is  H_n = -sum_i y_i log2 y_i,  their sum H_sum = sum_{n=1..N} H_n  and the
normalised entropy  H = H_sum / N.  A trojaned input keeps its trigger in every blend and so keeps
being classified as the target class (H near 0), while a clean input's blends wander between
classes (high H). Inputs with H below a detection boundary are flagged.

Here STRIP filters the training set: the victim architecture is trained on all of it (the model an
undefended victim would get), every training sample is superimposed with N (paper: 100) other
training samples drawn at random, and the samples with low H are dropped before FilterDefense
trains a fresh victim on the rest. Superimposition (`blend`):
  * "add" (default): x' = clip(x + x_n, 0, 1), the authors' code (cv2.addWeighted(x, 1, x_n, 1, 0)
    on uint8 images), which keeps a saturated trigger intact in every blend;
  * "linear": x' = alpha x + (1 - alpha) x_n (alpha 0.5), as ART's STRIP does
    (art/estimators/poison_mitigation/strip/strip.py, `combine_images`). It halves the trigger, and
    on digits (10 % BadNets 3x3 patches, ConvNet) the poisons' blends then had *higher* entropy than
    the clean ones (median 1.30 vs 1.18 bits, recall 0.00 at FRR 1 %), whereas "add" separated
    them (median 0.63 vs 0.93 for a checkerboard patch, 0.02 vs 1.01 for a white one: recall 1.0).
Detection boundary (`rule`):
  * "frr" (default): the paper assumes the clean inputs' entropies are normally distributed, fits
    that normal on held-out clean inputs and puts the boundary at the quantile of the preset false
    rejection rate (FRR; the paper's settings are 2 %, 1 % and 0.5 %; 1 % is our default). A training
    filter has no clean held-out set, so the normal is fitted robustly to the training set's own
    entropies (location: median, scale: 1.4826 x median absolute deviation), which the minority of
    near-zero-entropy poisons barely moves; samples with H < median + scale * Phi^-1(FRR) are dropped.
  * "fraction": drop the `removal_fraction` lowest-entropy samples (a fixed budget, as spectral
    signatures does), for comparisons at equal removal.
Ground truth (ctx.is_poison) is only used by FilterDefense to report precision and recall.
"""

from __future__ import annotations

import logging
import math
from statistics import NormalDist
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from poison_core.defenses.base import (DefenseContext, DefenseParams, DefenseResult, FilterDefense, detection_scores,
                                       register_defense, train_victim)
from poison_core.defenses.filters import feature_model
from poison_core.seeding import derive_seed
from poison_core.training import to_tensor

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826  # consistency constant: sigma = 1.4826 * MAD for a normal distribution


class STRIPParams(DefenseParams):
    """n_overlays: N blends per sample (paper 100 at test time); blend / alpha: how images are
    superimposed (see the module docstring); rule: 'frr' boundary at the FRR quantile of a robust
    normal fit (paper FRR 1 %), or 'fraction' dropping `removal_fraction` lowest entropies."""

    n_overlays: int = Field(100, ge=1, le=1000)
    blend: Literal["add", "linear"] = "add"
    alpha: float = Field(0.5, gt=0, lt=1)
    rule: Literal["frr", "fraction"] = "frr"
    frr: float = Field(0.01, gt=0, lt=0.5)
    removal_fraction: float = Field(0.15, gt=0, lt=1)


def overlay_indices(n: int, n_overlays: int, seed: int) -> np.ndarray:
    """(n, N) indices of the images superimposed on each sample: uniform over the *other* samples."""
    if n < 2:
        raise ValueError(f"STRIP needs at least 2 samples to superimpose, got {n}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n - 1, size=(n, n_overlays))
    return draws + (draws >= np.arange(n)[:, None])


def superimpose(x: torch.Tensor, overlays: torch.Tensor, blend: str, alpha: float) -> torch.Tensor:
    """Blend each x[i] (C, H, W) with each overlays[i, n] (N, C, H, W): the STRIP perturbation."""
    if blend == "add":
        return (x[:, None] + overlays).clamp_(0.0, 1.0)
    return alpha * x[:, None] + (1.0 - alpha) * overlays


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = (1/N) sum_n -sum_i y_i log2 y_i over the last-but-one axis of (..., N, K) logits."""
    probs = torch.softmax(logits.double(), dim=-1)
    per_blend = -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(2.0)
    return per_blend.mean(dim=-1)


def strip_entropies(model: nn.Module, images: np.ndarray, overlays: np.ndarray, device: torch.device,
                    blend: str = "linear", alpha: float = 0.5, max_batch: int = 8192) -> np.ndarray:
    """Normalised STRIP entropy (N,) of every uint8 NHWC image; `overlays` (n, N) indexes `images`."""
    model.eval()
    n_overlays = overlays.shape[1]
    pool = to_tensor(images, device)
    chunk = max(1, max_batch // n_overlays)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), chunk):
            x = pool[start:start + chunk]
            idx = torch.from_numpy(overlays[start:start + chunk]).to(device)
            blended = superimpose(x, pool[idx], blend, alpha)
            logits = model(blended.reshape(-1, *x.shape[1:])).reshape(len(x), n_overlays, -1)
            out.append(normalized_entropy(logits).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def robust_normal_threshold(entropies: np.ndarray, frr: float) -> float:
    """The FRR quantile of a normal with location median(H) and scale 1.4826 * MAD(H)."""
    median = float(np.median(entropies))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(entropies - median)))
    return median + scale * NormalDist().inv_cdf(frr) if scale > 0 else median


def strip_keep(entropies: np.ndarray, rule: str, frr: float, removal_fraction: float) -> tuple[np.ndarray, float]:
    """Keep mask (True = keep) and the entropy boundary: samples strictly below it are dropped."""
    if rule == "fraction":
        n_remove = min(len(entropies) - 1, math.floor(removal_fraction * len(entropies) + 1e-9))
        keep = np.ones(len(entropies), dtype=bool)
        order = np.argsort(entropies, kind="stable")
        keep[order[:n_remove]] = False
        boundary = float(entropies[order[n_remove]]) if n_remove else float(entropies.min())
        return keep, boundary
    boundary = robust_normal_threshold(entropies, frr)
    return entropies >= boundary, boundary


@register_defense
class STRIP(FilterDefense):
    """Drop training samples whose superimposed copies the model classifies with low entropy."""

    name = "strip"
    paper = "Gao et al., ACSAC 2019, STRIP: A defence against trojan attacks on deep neural networks"
    summary = ("filter: superimpose each sample with N others, drop the low-entropy ones "
               "(boundary at the FRR quantile of a robust normal fit)")
    Params = STRIPParams

    def entropies(self, ctx: DefenseContext) -> np.ndarray:
        """Normalised STRIP entropy of every training sample under the undefended model."""
        p = self.params
        overlays = overlay_indices(len(ctx.train), p.n_overlays, derive_seed(ctx.seed, "strip", "overlays"))
        return strip_entropies(feature_model(ctx), ctx.train.images, overlays, ctx.device, p.blend, p.alpha)

    def decide(self, ctx: DefenseContext) -> tuple[np.ndarray, dict[str, float]]:
        p = self.params
        entropies = self.entropies(ctx)
        keep, boundary = strip_keep(entropies, p.rule, p.frr, p.removal_fraction)
        stats = {"strip_threshold": boundary, "strip_entropy_median": float(np.median(entropies))}
        log.info("strip: boundary %.4f, dropping %d of %d", boundary, int((~keep).sum()), len(keep))
        return keep, stats

    def keep_mask(self, ctx: DefenseContext) -> np.ndarray:
        return self.decide(ctx)[0]

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        """FilterDefense.fit with the entropy statistics added to the info (entropies computed once)."""
        keep, stats = self.decide(ctx)
        if not keep.any():
            raise ValueError(f"{self.name}: the entropy boundary {stats['strip_threshold']:.4g} drops every sample")
        result = train_victim(ctx, ctx.train.subset(np.flatnonzero(keep)))
        result.info.update(detection_scores(keep, ctx.is_poison))
        result.info.update(stats)
        return result
