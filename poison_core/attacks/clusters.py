"""Unlearnable Clusters: Zhang et al., 'Unlearnable Clusters: Towards Label-agnostic Unlearnable
Examples', CVPR 2023.

Label-agnostic: the attacker does not use the labels. The protected samples are grouped by k-means
on a surrogate's features (Sec. 3.2, p clusters; default p = number of classes), and every cluster
C_i gets ONE perturbation delta_i = eps * tanh(G_i(z_i)) from a small generator G_i with a fixed
latent z_i, so samples of a cluster share a pattern (this disrupts the uniformity of the data).
G_i is trained to disrupt discrepancy: the surrogate features of x + delta_i, for x in C_i, are
pulled towards the centroid of ANOTHER cluster, mu_{(i + offset) mod p} (Eq. 5 of the paper; the
authors' code measures the pull as KL(softmax(mu) || softmax(f(x + delta_i))), which we follow):

    min_{G_i}  sum_{x in C_i}  KL( softmax(mu_{(i+o) mod p}) || softmax(f(x + eps tanh G_i(z_i))) ).

The paper's surrogate is CLIP and its generator a ResNet; ours is the ctx surrogate (the first one
when several are given) and a three-layer conv generator, trained on the cluster's own members
(the authors' code sweeps the whole training set per cluster). Labels are unchanged (clean-label).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks._pgd import choose_positions, clip_unit, frozen, quantize, to_unit, torch_generator
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.errors import ConfigError
from poison_core.training import batch_slices, to_tensor

logger = logging.getLogger(__name__)


class ClustersParams(AttackParams):
    n_clusters: int | None = Field(None, ge=2, le=10_000)
    target_offset: int = Field(1, ge=1, le=10_000)
    epochs: int = Field(5, ge=1, le=1000)
    lr: float = Field(0.01, gt=0, le=10)
    generator_width: int = Field(16, ge=1, le=512)
    batch_size: int = Field(256, ge=1, le=65_536)


class PerturbationGenerator(nn.Module):
    """A tiny conv generator: fixed latent z (1, C, H, W) -> perturbation eps * tanh(G(z))."""

    def __init__(self, channels: int, width: int, radius: float) -> None:
        super().__init__()
        self.radius = radius
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.radius * torch.tanh(self.net(z))


def surrogate_features(model: nn.Module, images: np.ndarray, device: torch.device,
                       batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (N, D) of uint8 NHWC `images` under the eval-mode surrogate."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model.features(to_tensor(images[b], device)) for b in batch_slices(len(images), batch_size)])


def train_cluster_noise(model: nn.Module, images: np.ndarray, anchor: torch.Tensor, params: ClustersParams, *,
                        radius: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Train one cluster's generator (Eq. 5) and return its perturbation (1, C, H, W) on [0, 1]."""
    channels, height, width = images.shape[3], images.shape[1], images.shape[2]
    z = torch.rand((1, channels, height, width), generator=gen, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen, device=device)))
        generator = PerturbationGenerator(channels, params.generator_width, radius).to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=params.lr)
    target = F.softmax(anchor, dim=0)
    for _ in range(params.epochs):
        order = torch.randperm(len(images), generator=gen, device=device).cpu().numpy()
        for batch in batch_slices(len(images), params.batch_size):
            x = to_tensor(images[order[batch]], device)
            feats = model.features(clip_unit(x + generator(z)))
            loss = F.kl_div(F.log_softmax(feats, dim=1), target.expand_as(feats), reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return generator(z)


@register_attack
class UnlearnableClusters(Attack):
    """Cluster-wise generator noise that pulls each k-means cluster to another's centroid."""

    name = "unlearnable_clusters"
    paper = "Zhang et al., Unlearnable Clusters, CVPR 2023 (Eq. 5)"
    summary = "label-agnostic availability: one generated noise per k-means cluster of surrogate features"
    Params = ClustersParams
    label_policy = "clean"
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        pos = choose_positions(len(train), n_poison, rng)
        images = train.images[pos]
        k = p.n_clusters or train.num_classes
        if k > len(pos):
            raise ConfigError(f"params.n_clusters: {k} clusters need at least {k} protected samples, got {len(pos)}")
        from sklearn.cluster import KMeans  # here, not at import: sklearn costs every process ~1 s

        model = ctx.surrogates[0]
        with frozen([model]):
            feats = surrogate_features(model, images, ctx.device)
            kmeans = KMeans(n_clusters=k, n_init=4, random_state=int(rng.integers(2**31))).fit(feats.cpu().numpy())
            centres = torch.as_tensor(kmeans.cluster_centers_, dtype=feats.dtype, device=ctx.device)
            assign = kmeans.labels_.astype(np.int64)
            gen = torch_generator(rng, ctx.device)
            out = images.copy()
            for i in range(k):
                members = np.flatnonzero(assign == i)
                if not len(members):
                    continue
                delta = train_cluster_noise(model, images[members], centres[(i + p.target_offset) % k], p,
                                            radius=to_unit(eps), gen=gen, device=ctx.device)
                out[members] = quantize(images[members], delta.expand(len(members), -1, -1, -1), eps)
                logger.info("unlearnable_clusters: cluster %d/%d (%d samples) done", i + 1, k, len(members))
        return Crafted(positions=pos, images=out, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "n_clusters": k,
                                "cluster_sizes": np.bincount(assign, minlength=k).tolist()})
