"""SimCLR's settings, in one place: the `simclr-linear` protocol's pretraining (``VictimConfig.ssl``), the
encoder of TUE and the label-free encoder of Unlearnable Clusters all take them from :class:`SimCLRConfig`.

SimCLR: Chen et al., 'A Simple Framework for Contrastive Learning of Visual Representations', ICML 2020.
The defaults are the SimCLR recipe of Ren et al.'s TUE code (github:renjie3/TUE), the reference our
implementation (:mod:`poison_core.simclr`) follows: projection head output ``feature_dim`` 128, NT-Xent
temperature 0.5, batch 512, Adam with lr 1e-3 and weight decay 1e-6, 40 epochs (its demo.sh). Its views
(utils.py ``train_transform``) are the SimCLR paper's CIFAR-10 augmentation (Appendix A, B.9):
RandomResizedCrop with scale 0.08-1, a horizontal flip with p = 0.5, ColorJitter(0.8 s, 0.8 s, 0.8 s,
0.2 s) applied with p = 0.8 at strength s = 0.5, i.e. (0.4, 0.4, 0.4, 0.1), and RandomGrayscale p = 0.2.

A user restates only the defaults it changes, with its reason, by subclassing (the bounds live in the
annotated types below, once): :class:`SSLConfig` here; ``poison_core.simclr.SimCLREncoderConfig`` adds
the backbone for the attacks that build their own encoder.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from poison_core.config.base import StrictModel

Temperature = Annotated[float, Field(gt=0, le=10)]
ProjectionDim = Annotated[int, Field(ge=2, le=4096)]
SimCLREpochs = Annotated[int, Field(ge=1, le=10_000)]
SimCLRBatch = Annotated[int, Field(ge=4, le=65_536)]
LearningRate = Annotated[float, Field(gt=0, le=10)]
Probability = Annotated[float, Field(ge=0, le=1)]


class SimCLRViews(StrictModel):
    """The random views (SimCLR paper, Appendix A): crop scale range from `crop_min_scale` to 1, flip with
    probability `flip`, colour jitter of strength `jitter_strength` (s: brightness, contrast and saturation
    0.8 s, hue 0.2 s) with probability `jitter`, greyscale with probability `grayscale`."""

    crop_min_scale: float = Field(0.08, gt=0, le=1)
    flip: Probability = 0.5
    jitter_strength: float = Field(0.5, ge=0, le=1.25)
    jitter: Probability = 0.8
    grayscale: Probability = 0.2

    def jitter_factors(self) -> tuple[float, float, float, float]:
        """ColorJitter's (brightness, contrast, saturation, hue) at this strength."""
        s = self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s


class SimCLRConfig(StrictModel):
    """SimCLR's settings, defaults from TUE's SimCLR code (see the module docstring)."""

    projection_dim: ProjectionDim = 128
    temperature: Temperature = 0.5
    epochs: SimCLREpochs = 40
    batch_size: SimCLRBatch = 512
    lr: LearningRate = 1e-3
    weight_decay: float = Field(1e-6, ge=0, le=1)
    views: SimCLRViews = SimCLRViews()


class SSLConfig(SimCLRConfig):
    """The `simclr-linear` protocol's self-supervised pretraining: SimCLR on the victim's (poisoned) training
    images without labels. Differs from :class:`SimCLRConfig` only in size, chosen for the CPU ConvNet
    victims: 20 epochs of batch 256."""

    epochs: SimCLREpochs = 20
    batch_size: SimCLRBatch = 256
