"""SimCLR's settings."""

from __future__ import annotations

from pydantic import Field

from poison_core.config.base import StrictModel


class SSLConfig(StrictModel):
    """The `simclr-linear` protocol's self-supervised pretraining: SimCLR (Chen et al., ICML 2020) on the
    victim's (poisoned) training images without labels; head and recipe of TUE's SimCLR code
    (projection 128, temperature 0.5, Adam lr 1e-3); epochs and batch sized for the CPU ConvNet."""

    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(256, ge=4, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10)
    temperature: float = Field(0.5, gt=0, le=10)
    projection_dim: int = Field(128, ge=2, le=4096)
