"""A victim (or surrogate): architecture, training recipe and the protocol it learns under."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from poison_core.config.base import StrictModel
from poison_core.config.dataset import ModelConfig
from poison_core.config.simclr import SSLConfig
from poison_core.config.train import PretrainConfig, TrainConfig


PROTOCOLS = ("supervised", "simclr-linear", "transfer", "finetune", "relabel")
Protocol = Literal["supervised", "simclr-linear", "transfer", "finetune", "relabel"]


class VictimConfig(StrictModel):
    """A victim (or surrogate): an architecture, its training recipe and how it learns (`protocol`).

    protocol (poison_core.protocols): `supervised` trains from scratch on the training labels;
    `simclr-linear` pretrains the body with SimCLR on the training images (no labels, `ssl`) and
    trains a linear probe on frozen features; `transfer` freezes a body pretrained on another dataset
    (`pretrain`) and trains the linear head ('Just How Toxic', Schwarzschild et al., ICML 2021, Sec. 3);
    `finetune` starts from that body and trains every layer; `relabel` trains from scratch on labels
    the attacker did not know: the classes merged into `relabel_classes` groups by a seeded draw
    (the label-agnostic victim of Unlearnable Clusters, Zhang et al., CVPR 2023). The protocol's
    fields are left out of the dump for `supervised`, so such victims hash as they did before.
    """

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    protocol: Protocol = "supervised"
    pretrain: PretrainConfig | None = None
    ssl: SSLConfig = SSLConfig()
    relabel_classes: int = Field(2, ge=2, le=100_000)
    relabel_seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _protocol_has_what_it_needs(self) -> "VictimConfig":
        if self.protocol in ("transfer", "finetune") and self.pretrain is None and self.model.weights is None:
            raise ValueError(f"protocol {self.protocol!r} needs pretrain, a source dataset "
                             "(e.g. pretrain: {dataset: {name: digits}}), or model.weights, a trained model")
        return self

    @model_serializer(mode="wrap")
    def _dump_protocol_fields_only_when_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        used = {"supervised": (), "simclr-linear": ("ssl",), "transfer": ("pretrain",),
                "finetune": ("pretrain",), "relabel": ("relabel_classes", "relabel_seed")}[self.protocol]
        for name in ("protocol", "pretrain", "ssl", "relabel_classes", "relabel_seed"):
            if name not in used and not (name == "protocol" and self.protocol != "supervised"):
                data.pop(name, None)
        return data

    def supervised(self) -> "VictimConfig":
        """This architecture and recipe under the plain supervised protocol, from a random initialisation
        (what a surrogate uses unless `surrogate` is given: the attacker does not hold the victim's weights)."""
        return VictimConfig(model=self.model.model_copy(update={"weights": None}), train=self.train)
