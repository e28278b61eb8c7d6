"""Model registry: every member builds for small and CIFAR-size inputs, follows the features/head
convention, is seeded without touching the global RNG, and round-trips through safetensors."""

from __future__ import annotations

import pytest
import torch

from poison_core.config import ModelConfig
from poison_core.errors import ConfigError, InputError, UnknownNameError
from poison_core.models import MODELS, Classifier, build_model
from poison_core.models.io import load_state, save_model, state_checksum

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
EXPECTED = {e.name for e in MODELS.entries() if e.origin == "built-in"}  # from the registry, not typed by hand


def _batch(shape: tuple[int, int, int], n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, shape[2], shape[0], shape[1], generator=gen)


def test_registry_has_all_models_with_citations() -> None:
    assert {"convnet", "resnet18", "mobilenet_v2", "vgg11", "mlp"} <= EXPECTED
    for entry in MODELS.entries():
        assert entry.paper and entry.summary, entry.name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_and_follows_features_head_convention(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(name=name), shape, num_classes=7, seed=0)
    assert isinstance(model, Classifier)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    x = _batch(shape)
    model.train()
    model(x).sum().backward()  # trains at this size (BatchNorm sees > 1 value per channel)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (3, 7)
    assert feats.shape == (3, model.head.in_features)
    torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["convnet", "mlp", "resnet18"])
def test_width_scales_model(name: str) -> None:
    small = build_model(ModelConfig(name=name, width=8), (8, 8, 1), 10, seed=0)
    large = build_model(ModelConfig(name=name, width=16), (8, 8, 1), 10, seed=0)
    assert _n_params(small) < _n_params(large)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_seed_same_weights_different_seed_different(name: str) -> None:
    cfg = ModelConfig(name=name, width=8)
    a = build_model(cfg, (8, 8, 1), 10, seed=3)
    b = build_model(cfg, (8, 8, 1), 10, seed=3)
    c = build_model(cfg, (8, 8, 1), 10, seed=4)
    assert state_checksum(a) == state_checksum(b)
    assert state_checksum(a) != state_checksum(c)


def test_build_model_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    build_model(ModelConfig(name="convnet"), (8, 8, 1), 10, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'nope'; known: .*convnet.*resnet18"):
        MODELS.get("nope")
    with pytest.raises(KeyError):
        MODELS.get("nope")


@pytest.mark.parametrize("shape", [(7, 8, 1), (8, 8, 2), (8, 8)])
def test_build_model_rejects_bad_image_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        build_model(ModelConfig(), shape, 10, seed=0)  # type: ignore[arg-type]


def test_build_model_rejects_one_class() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ModelConfig(), (8, 8, 1), 1, seed=0)


def _trained_like(name: str) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the defaults, so buffers are round-tripped too."""
    model = build_model(ModelConfig(name=name, width=8), (8, 8, 1), 10, seed=1)
    model.train()
    with torch.no_grad():
        model(_batch((8, 8, 1), n=16, seed=5))
    return model.eval()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_safetensors_round_trip(tmp_path, where: str) -> None:
    model = _trained_like("convnet")
    uri = str(tmp_path / "sub" / "model.safetensors") if where == "local" else "memory://belladonna-test/m.safetensors"
    save_model(model, uri, {"arch": "convnet", "seed": "1"})
    fresh = build_model(ModelConfig(name="convnet", width=8), (8, 8, 1), 10, seed=99).eval()
    assert state_checksum(fresh) != state_checksum(model)
    metadata = load_state(fresh, uri)
    assert metadata == {"arch": "convnet", "seed": "1"}
    assert state_checksum(fresh) == state_checksum(model)
    x = _batch((8, 8, 1))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    if where == "local":
        assert [p.name for p in (tmp_path / "sub").iterdir()] == ["model.safetensors"]  # no temp file left


def test_load_state_rejects_other_architecture(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(_trained_like("convnet"), path)
    with pytest.raises(InputError, match="does not fit"):
        load_state(build_model(ModelConfig(name="mlp", width=8), (8, 8, 1), 10, seed=0), path)
    with pytest.raises(InputError, match="shape"):
        load_state(build_model(ModelConfig(name="convnet", width=16), (8, 8, 1), 10, seed=0), path)


def test_load_state_rejects_garbage(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x80\x04 not safetensors, perhaps a pickle")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_state(build_model(ModelConfig(), (8, 8, 1), 10, seed=0), path)


def test_save_model_rejects_non_string_metadata(tmp_path) -> None:
    with pytest.raises(InputError, match="metadata"):
        save_model(_trained_like("mlp"), tmp_path / "m.safetensors", {"epochs": 3})  # type: ignore[dict-item]
