"""One home for SimCLR's settings (poison_core.config.SimCLRConfig): the protocol's SSL victims, TUE and
Unlearnable Clusters take them from it, state only what differs, and keep their field names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poison_core.attacks.clusters import ClustersParams
from poison_core.attacks.tue import TUEParams
from poison_core.config import SimCLRConfig, SimCLRViews, SSLConfig, VictimConfig, parse_config
from poison_core.errors import ConfigError
from poison_core.simclr import SimCLREncoderConfig, build_encoder, simclr_optimizer, simclr_views

SIMCLR_FIELDS = set(SimCLRConfig.model_fields)


def _simclr_part(model) -> dict:
    return {name: getattr(model, name) for name in SIMCLR_FIELDS}


def test_every_user_is_a_simclr_config():
    assert issubclass(SSLConfig, SimCLRConfig) and issubclass(SimCLREncoderConfig, SimCLRConfig)
    assert issubclass(TUEParams, SimCLREncoderConfig)
    assert isinstance(VictimConfig().ssl, SimCLRConfig) and isinstance(ClustersParams().encoder, SimCLRConfig)


def test_base_defaults_are_tue_codes_simclr_recipe():
    base = SimCLRConfig()
    assert (base.projection_dim, base.temperature, base.epochs, base.batch_size, base.lr, base.weight_decay) == (
        128, 0.5, 40, 512, 1e-3, 1e-6)
    views = base.views
    assert (views.crop_min_scale, views.flip, views.jitter, views.grayscale) == (0.08, 0.5, 0.8, 0.2)
    assert views.jitter_factors() == pytest.approx((0.4, 0.4, 0.4, 0.1))  # ColorJitter(0.4, 0.4, 0.4, 0.1)


def test_each_user_keeps_its_deliberate_defaults():
    base = _simclr_part(SimCLRConfig())
    assert _simclr_part(SSLConfig()) == {**base, "epochs": 20, "batch_size": 256}  # sized for the CPU ConvNet
    assert _simclr_part(TUEParams()) == base  # TUE's own code is the base
    assert _simclr_part(ClustersParams().encoder) == base
    # a partial override keeps the user's other defaults, not the base's
    assert VictimConfig(protocol="simclr-linear", ssl={"lr": 0.01}).ssl.epochs == 20


def test_user_facing_field_names_still_parse():
    tue = TUEParams.model_validate({"model": "mlp", "width": 4, "projection_dim": 64, "temperature": 0.2,
                                    "epochs": 2, "batch_size": 32, "lr": 0.01})
    assert (tue.model, tue.projection_dim, tue.temperature, tue.epochs, tue.batch_size, tue.lr) == (
        "mlp", 64, 0.2, 2, 32, 0.01)
    uc = ClustersParams.model_validate({"encoder": {"width": 4, "epochs": 1, "batch_size": 64, "temperature": 0.1}})
    assert (uc.encoder.width, uc.encoder.epochs, uc.encoder.batch_size, uc.encoder.temperature) == (4, 1, 64, 0.1)
    ssl = VictimConfig.model_validate({"protocol": "simclr-linear", "ssl": {"epochs": 3, "projection_dim": 32}}).ssl
    assert (ssl.epochs, ssl.projection_dim, ssl.batch_size) == (3, 32, 256)


@pytest.mark.parametrize("model, raw, expected", [
    (VictimConfig, {"protocol": "simclr-linear", "ssl": {"epochs": 0}}, r"^ssl\.epochs: .*\(allowed: 1 <= epochs <= 10000"),
    (TUEParams, {"temperature": 0}, r"^temperature: .*\(allowed: 0 < temperature <= 10"),
    (ClustersParams, {"encoder": {"views": {"grayscale": 2}}}, r"^encoder\.views\.grayscale: .*\(allowed: 0 <= grayscale <= 1"),
    (TUEParams, {"feature_dim": 128}, r"^feature_dim: Extra inputs are not permitted"),
])
def test_bounds_live_once_and_name_the_field(model, raw, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(model, raw)


def test_views_and_weight_decay_reach_the_code():
    x = torch.rand(6, 3, 8, 8)
    grey = simclr_views(x, torch.Generator().manual_seed(0), SimCLRViews(jitter=0.0, grayscale=1.0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    colour = simclr_views(x, torch.Generator().manual_seed(0), SimCLRViews(jitter=0.0, grayscale=0.0))
    assert not torch.allclose(colour[:, 0], colour[:, 1])
    encoder = build_encoder("mlp", 4, 8, (8, 8, 3), 10, np.random.default_rng(0), torch.device("cpu"))
    group = simclr_optimizer(encoder, SSLConfig(lr=0.02, weight_decay=0.5)).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.5)
