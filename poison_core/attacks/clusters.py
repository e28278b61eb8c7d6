"""Unlearnable Clusters: Zhang et al., 'Unlearnable Clusters: Towards Label-agnostic Unlearnable
Examples', CVPR 2023.

Label-agnostic: the attacker never uses the labels, and neither does any model it relies on. The
protected samples are grouped by k-means on the features of an encoder that never saw the target
labels (Sec. 3.2, p clusters; default p = number of classes), and every cluster C_i gets ONE
perturbation delta_i = clamp(tanh(G_i(z_i)), -eps, eps) from a generator G_i with a fixed latent z_i, so
samples of a cluster share a pattern (this disrupts the uniformity of the data). G_i is trained to
disrupt discrepancy: the encoder features of x + delta_i are pulled towards the centroid of ANOTHER
cluster, mu_{(i + offset) mod p} (Eq. 5 of the paper; the authors' code measures the pull as
KL(softmax(mu) || softmax(f(x + delta_i))), which we follow):

    min_{G_i}  sum_{x}  KL( softmax(mu_{(i+o) mod p}) || softmax(f(aug(x) + eps tanh G_i(z_i))) ).

As in the authors' `main.py::train_gnet` (github:jiamingzhang94/Unlearnable-Clusters), each G_i is
trained on the WHOLE protected set (not only its cluster) under random crop + horizontal flip
(their Resize 256 / RandomCrop 224 is a shift of up to 1/8 of the side: `_augment.default_shift`),
with Adam (weight decay 5e-4) and a cosine learning-rate schedule, for 50 epochs (their
stage_1.yaml). Their encoder is an ImageNet-pretrained ResNet-50 or CLIP; ours is a SimCLR encoder
(:mod:`poison_core.simclr`) trained here, without labels, on the protected images, so the
attack needs no surrogate and its PoisonSet pixels do not depend on the labels at all. Labels are
unchanged (clean-label).

The encoder (`encoder_source`): 'simclr' (default) is the SimCLR encoder above; 'pretrained' is the
`transfer` protocol's source model (:func:`poison_core.protocols.source_state`): the architecture
`encoder_model` trained supervised on ANOTHER dataset (`pretrain`, its images resized to the victim's),
the stand-in for the authors' strong pretrained encoder (their point: a good encoder that never saw the
target labels). Its features are clustered and its feature space is where the generators pull.

The generator follows the authors' code: a ResNet generator (the image-to-image ResnetGenerator of
Johnson et al. / CycleGAN: 7x7 stem, two stride-2 downsamplings, 6 residual blocks, two upsamplings,
7x7 head, Tanh) trained at lr 1e-4, whose Tanh output is CLAMPED to [-eps, eps] (`output: clamp`), so
the noise saturates near +-eps wherever the Tanh exceeds eps. `generator_width` (the stem's channels;
theirs 64) is 16 by default for CPU cost. The earlier rules are kept as options: `generator: conv` (a
three-layer conv generator, at lr 0.01) and `output: scale` (eps * tanh(.), which stays inside the ball).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from poison_core.attacks._augment import default_shift, random_shift_flip
from poison_core.attacks._pgd import choose_positions, frozen, torch_generator
from poison_core.perturbation import clip_unit, quantize, to_unit
from poison_core.simclr import SimCLREncoderConfig, fit_simclr_encoder, shuffled_batches
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.config import ModelConfig, PretrainConfig, VictimConfig
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.training import batch_slices, to_tensor

log = logging.getLogger(__name__)


class ClustersParams(AttackParams):
    """Defaults: the authors' stage_1.yaml and main.py (target_offset 1, 50 epochs, a 6-block ResNet
    generator at lr 1e-4, its Tanh output clamped to +-eps); lr None: 1e-4 for the ResNet generator, 0.01
    for the conv one; `encoder`: the label-free SimCLR encoder whose features are clustered, with SimCLR's
    settings of :class:`poison_core.config.SimCLRConfig` unchanged (the authors cluster the features of a
    pretrained ResNet-50 or CLIP, so their code has no SimCLR recipe to follow)."""

    n_clusters: int | None = Field(None, ge=2, le=10_000)
    target_offset: int = Field(1, ge=1, le=10_000)
    epochs: int = Field(50, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, le=10)
    generator: Literal["resnet", "conv"] = "resnet"
    output: Literal["clamp", "scale"] = "clamp"
    resnet_blocks: int = Field(6, ge=1, le=64)
    generator_width: int = Field(16, ge=1, le=512)
    batch_size: int = Field(256, ge=1, le=65_536)
    augment: bool = True
    encoder: SimCLREncoderConfig = SimCLREncoderConfig()
    encoder_source: Literal["simclr", "pretrained"] = "simclr"
    encoder_model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _pretrained_needs_a_source(self) -> "ClustersParams":
        if self.encoder_source == "pretrained" and self.pretrain is None:
            raise ValueError("encoder_source 'pretrained' needs pretrain, a source dataset "
                             "(e.g. pretrain: {dataset: {name: digits}})")
        return self


GENERATOR_LR = {"resnet": 1e-4, "conv": 0.01}


class ResidualBlock(nn.Module):
    """conv3x3 - norm - ReLU - conv3x3 - norm, plus the input (reflection padding)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width, affine=True),
                                  nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3),
                                  nn.InstanceNorm2d(width, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet_generator(channels: int, width: int, blocks: int) -> nn.Module:
    """The ResnetGenerator layout (Johnson et al. 2016; CycleGAN): 7x7 stem, two stride-2 downsamplings,
    `blocks` residual blocks, two x2 upsamplings, 7x7 head; raw output (Tanh applied by the caller)."""
    norm = lambda c: nn.InstanceNorm2d(c, affine=True)  # noqa: E731
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 7, padding=3), norm(width), nn.ReLU()]
    for mult in (1, 2):
        layers += [nn.Conv2d(width * mult, width * mult * 2, 3, stride=2, padding=1), norm(width * mult * 2), nn.ReLU()]
    layers += [ResidualBlock(width * 4) for _ in range(blocks)]
    for mult in (4, 2):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width * mult, width * mult // 2, 3, padding=1),
                   norm(width * mult // 2), nn.ReLU()]
    layers += [nn.Conv2d(width, channels, 7, padding=3)]
    return nn.Sequential(*layers)


class PerturbationGenerator(nn.Module):
    """Fixed latent z (1, C, H, W) -> perturbation: clamp(tanh(G(z)), -eps, eps) (`output` 'clamp', the
    authors' rule) or eps * tanh(G(z)) ('scale'); G the ResNet generator or a three-layer conv net."""

    def __init__(self, channels: int, width: int, radius: float, *, kind: str = "resnet", output: str = "clamp",
                 blocks: int = 6) -> None:
        super().__init__()
        self.radius, self.output = radius, output
        if kind == "resnet":
            self.net = resnet_generator(channels, width, blocks)
        else:
            self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raw = self.net(z)
        if raw.shape[-2:] != z.shape[-2:]:  # sides not divisible by 4: back to the image's size
            raw = F.interpolate(raw, size=z.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "clamp":
            return torch.tanh(raw).clamp(-self.radius, self.radius)
        return self.radius * torch.tanh(raw)


def pretrained_encoder(params: ClustersParams, image_shape: tuple[int, int, int], num_classes: int,
                       device: torch.device) -> nn.Module:
    """The `transfer` protocol's source model as the encoder: `encoder_model` trained supervised on
    `pretrain.dataset` (resized to `image_shape`), its body loaded into a fresh model (head unused)."""
    from poison_core.protocols import source_state  # here: protocols imports the attacks' SimCLR lazily

    assert params.pretrain is not None
    victim = VictimConfig(model=params.encoder_model, protocol="transfer", pretrain=params.pretrain)
    model = build_model(params.encoder_model, image_shape, num_classes, seed=0)
    missing, unexpected = model.load_state_dict(source_state(victim, image_shape), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ConfigError(f"params.encoder_model: the pretrained body does not fit ({missing}, {unexpected})")
    return model.to(device).eval()


def encoder_features(model: nn.Module, images: np.ndarray, device: torch.device,
                     batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (N, D) of uint8 NHWC `images` under the eval-mode encoder."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model.features(to_tensor(images[b], device)) for b in batch_slices(len(images), batch_size)])


def train_cluster_noise(model: nn.Module, images: np.ndarray, anchor: torch.Tensor, params: ClustersParams, *,
                        radius: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Train one cluster's generator (Eq. 5) on all `images` and return its perturbation (1, C, H, W)."""
    channels, height, width = images.shape[3], images.shape[1], images.shape[2]
    z = torch.rand((1, channels, height, width), generator=gen, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen, device=device)))
        generator = PerturbationGenerator(channels, params.generator_width, radius, kind=params.generator,
                                          output=params.output, blocks=params.resnet_blocks).to(device)
    lr = params.lr if params.lr is not None else GENERATOR_LR[params.generator]
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, weight_decay=5e-4)
    n_batches = -(-len(images) // params.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, params.epochs * n_batches, eta_min=1e-6)
    target = F.softmax(anchor, dim=0)
    shift = default_shift(height)
    for _ in range(params.epochs):
        for batch in shuffled_batches(len(images), params.batch_size, gen):
            x = to_tensor(images[batch], device)
            if params.augment:
                x = random_shift_flip(x, gen, max_shift=shift)
            feats = model.features(clip_unit(x + generator(z)))
            loss = F.kl_div(F.log_softmax(feats, dim=1), target.expand_as(feats), reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return generator(z)


@register_attack
class UnlearnableClusters(Attack):
    """Cluster-wise generator noise that pulls each k-means cluster of label-free features to another's centroid."""

    name = "unlearnable_clusters"
    paper = "Zhang et al., Unlearnable Clusters, CVPR 2023 (Eq. 5)"
    summary = "label-agnostic availability: one generated noise per k-means cluster of SimCLR features"
    Params = ClustersParams
    smoke = {"epochs": 1, "generator_width": 4, "encoder": {"width": 4, "epochs": 1, "batch_size": 64}}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = False

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, eps = self.params, ctx.train, ctx.threat.epsilon
        pos = choose_positions(len(train), n_poison, rng)
        images = train.images[pos]
        k = p.n_clusters or train.num_classes
        if k > len(pos):
            raise ConfigError(f"params.n_clusters: {k} clusters need at least {k} protected samples, got {len(pos)}")
        from sklearn.cluster import KMeans  # here, not at import: sklearn costs every process ~1 s

        gen = torch_generator(rng, ctx.device)
        if p.encoder_source == "pretrained":
            model = pretrained_encoder(p, train.image_shape, train.num_classes, ctx.device)
        else:
            model = fit_simclr_encoder(images, p.encoder, p.encoder.backbone(), num_classes=train.num_classes,
                                       rng=rng, gen=gen, device=ctx.device)
        with frozen([model]):
            feats = encoder_features(model, images, ctx.device)
            kmeans = KMeans(n_clusters=k, n_init=4, random_state=int(rng.integers(2**31))).fit(feats.cpu().numpy())
            centres = torch.as_tensor(kmeans.cluster_centers_, dtype=feats.dtype, device=ctx.device)
            assign = kmeans.labels_.astype(np.int64)
            out = images.copy()
            for i in range(k):
                members = np.flatnonzero(assign == i)
                if not len(members):
                    continue
                delta = train_cluster_noise(model, images, centres[(i + p.target_offset) % k], p,
                                            radius=to_unit(eps), gen=gen, device=ctx.device)
                out[members] = quantize(images[members], delta.expand(len(members), -1, -1, -1), eps)
                log.info("unlearnable_clusters: cluster %d/%d (%d samples) done", i + 1, k, len(members))
        return Crafted(positions=pos, images=out, poison_labels=train.labels[pos],
                       targets={"kind": "availability", "n_clusters": k,
                                "cluster_sizes": np.bincount(assign, minlength=k).tolist()})
