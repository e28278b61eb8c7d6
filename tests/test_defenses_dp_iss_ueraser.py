"""DP-SGD, Image Shortcut Squeezing and UEraser on tiny data: paper defaults, and each building block does
what its paper says (per-sample clipping and noise of Abadi et al.'s Alg. 1, forest's batch-wise
clip and noise, PIL's JPEG / luma / posterize,
the max over K augmented copies of Qin et al.'s Eq. 3). Registration, fitting, bounded parameters and
seeded repeats are the shared tests of tests/test_defenses.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.func import functional_call, grad, vmap

from poison_core.config import DefenseConfig, ModelConfig, TrainConfig, VictimConfig, parse_config
from poison_core.defenses import DefenseContext, make_defense
from poison_core.defenses.dp_sgd import (DPSGDParams, batch_gradient, clip_per_sample, noisy_mean,
                                         per_sample_gradients)
from poison_core.defenses.iss import grayscale, jpeg_round_trip, reduce_bit_depth
from poison_core.defenses.ueraser import (channel_shuffle, max_over_repeats, plasma, random_erasing, trivial_augment,
                                          ueraser_policy)
from poison_core.errors import ConfigError
from poison_core.models import build_model
from poison_core.training import to_tensor
from poison_core.members import defense_params
from tests.helpers import tiny_dataset

MLP = VictimConfig(model=ModelConfig(name="mlp", width=16), train=TrainConfig(epochs=1, batch_size=32))
CONV = VictimConfig(model=ModelConfig(name="convnet", width=4), train=TrainConfig(epochs=1, batch_size=32))


def _ctx(victim=MLP, data=None):
    return DefenseContext(train=data if data is not None else tiny_dataset(n=96, k=4, seed=1), victim=victim,
                          seed=0, is_poison=np.arange(96) % 10 == 0)


def _predict(name, params=None, **kw):
    ctx = _ctx(**kw)
    return make_defense(name, params).fit(ctx).classifier.predict_logits(ctx.train.images)


def test_grayscale_has_no_parameters_and_defaults_are_the_papers():
    with pytest.raises(ConfigError, match="params of 'iss_grayscale': quality: Extra inputs are not permitted"):
        defense_params(parse_config(DefenseConfig, {"name": "iss_grayscale", "params": {"quality": 10}}))
    assert make_defense("iss_jpeg").params.quality == 10
    assert make_defense("ueraser").params.repeats == 5 and make_defense("ueraser").params.adversarial_fraction == 1
    dp = make_defense("dp_sgd").params  # forest's PRIVACY_GAUSSIAN, batch-wise (the earlier: per sample, 1, 0.1)
    assert (dp.granularity, dp.clip_norm, dp.noise_multiplier) == ("batch", 1.0, 0.01)


# ---------------------------------------------------------------- DP-SGD


def _batch(n=16):
    data = tiny_dataset(n=n, k=4, seed=1)
    return data, to_tensor(data.images, "cpu"), torch.from_numpy(data.labels)


def test_per_sample_gradients_equal_torch_func_vmap_without_batch_norm():
    _, x, y = _batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(64, 4))
    grads, losses, _ = per_sample_gradients(model, x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])  # noqa: E731
    reference = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name, g in reference.items():
        assert torch.allclose(grads[name], g, atol=1e-6), name
    assert torch.allclose(losses, F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("name", ["convnet", "mobilenet_v2"])
def test_per_sample_gradients_sum_to_the_batch_gradient_with_batch_norm(name):
    data, x, y = _batch()
    model = build_model(ModelConfig(name=name, width=8), data.image_shape, 4, seed=0).double()
    grads, _, _ = per_sample_gradients(model, x.double(), y)
    model.zero_grad()
    F.cross_entropy(model(x.double()), y, reduction="sum").backward()
    for pname, p in model.named_parameters():
        scale = float(grads[pname].abs().max())
        assert torch.allclose(grads[pname].sum(0), p.grad, atol=1e-9 * max(scale, 1.0)), pname


def test_clipping_bounds_every_per_sample_norm_and_keeps_small_ones():
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), "b": torch.tensor([[0.0], [0.0], [0.5]])}
    clipped, norms = clip_per_sample(g, clip_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5, 0.5])
    total = torch.cat([clipped["a"], clipped["b"]], dim=1).norm(dim=1)
    assert total.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert clipped["a"][0].tolist() == pytest.approx([0.6, 0.8])  # direction kept
    data, x, y = _batch()
    model = build_model(ModelConfig(name="convnet", width=4), data.image_shape, 4, seed=0)
    clipped, norms = clip_per_sample(per_sample_gradients(model, x, y)[0], clip_norm=0.1)
    flat = torch.cat([c.flatten(1) for c in clipped.values()], dim=1).norm(dim=1)
    assert (norms > 0.1).all() and torch.all(flat <= 0.1 + 1e-6)


def test_noise_has_std_sigma_times_c_over_batch_and_repeats_under_the_generator():
    batch, sigma, clip = 8, 0.5, 2.0
    zeros = {"w": torch.zeros(batch, 200, 100)}
    noisy = noisy_mean(zeros, clip, sigma, torch.Generator().manual_seed(0))["w"]
    assert noisy.std().item() == pytest.approx(sigma * clip / batch, rel=0.02)
    assert abs(noisy.mean().item()) < 0.05 * sigma * clip / batch
    assert torch.equal(noisy, noisy_mean(zeros, clip, sigma, torch.Generator().manual_seed(0))["w"])
    ones = {"w": torch.ones(batch, 3)}
    assert torch.equal(noisy_mean(ones, clip, 0.0, torch.Generator())["w"], torch.ones(3))


@pytest.mark.parametrize("granularity, victim", [("sample", MLP), ("batch", MLP), ("batch", CONV)])
def test_dp_sgd_without_noise_and_clipping_is_plain_sgd(granularity, victim):
    plain = _predict("none", victim=victim)
    dp = _predict("dp_sgd", {"granularity": granularity, "clip_norm": 1e4, "noise_multiplier": 0.0}, victim=victim)
    assert np.allclose(dp, plain, atol=1e-4)
    assert not np.allclose(_predict("dp_sgd", {"granularity": granularity}, victim=victim), plain, atol=1e-4)


def test_batch_rule_clips_the_mean_gradient_then_adds_sigma_c_noise():
    """forest's rule: the batch's mean-loss gradient, scaled to norm C if longer, plus N(0, (sigma C)^2)."""
    data, x, y = _batch()
    model = build_model(ModelConfig(name="convnet", width=4), data.image_shape, 4, seed=0)
    named = dict(model.named_parameters())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    full = torch.cat([q.grad.flatten() for q in named.values()])
    gen = torch.Generator().manual_seed(0)
    step, losses, _, norm = batch_gradient(model, named, x, y, DPSGDParams(clip_norm=0.01, noise_multiplier=0), gen)
    flat = torch.cat([g.flatten() for g in step.values()])
    assert float(norm) == pytest.approx(float(full.norm()), rel=1e-4) and float(norm) > 0.01
    assert float(flat.norm()) == pytest.approx(0.01, rel=1e-4)
    assert float(F.cosine_similarity(flat, full, dim=0)) == pytest.approx(1.0, abs=1e-5)
    assert losses.shape == (len(y),)
    kept, _, _, _ = batch_gradient(model, named, x, y, DPSGDParams(clip_norm=1e4, noise_multiplier=0), gen)
    assert torch.allclose(torch.cat([g.flatten() for g in kept.values()]), full, atol=1e-6)
    noisy, _, _, _ = batch_gradient(model, named, x, y, DPSGDParams(clip_norm=1e-6, noise_multiplier=2.0), gen)
    noise = torch.cat([g.flatten() for g in noisy.values()])
    assert float(noise.std()) == pytest.approx(2e-6, rel=0.1)  # sigma * C per coordinate, on the mean


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_dp_sgd_history_reports_clipping(granularity):
    result = make_defense("dp_sgd", {"clip_norm": 0.01, "granularity": granularity}).fit(_ctx(CONV))
    assert result.history[-1]["clipped_fraction"] == 1.0 and result.history[-1]["grad_norm"] > 0.01
    assert 0 <= result.history[-1]["train_acc"] <= 1


# ---------------------------------------------------------------- ISS


def _pil_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer)).reshape(image.shape)


@pytest.mark.parametrize("shape", [(16, 16, 1), (16, 16, 3)], ids=["gray", "rgb"])
def test_jpeg_equals_the_pil_round_trip_and_changes_the_image(shape):
    images = tiny_dataset(n=5, shape=shape, seed=2).images
    for quality in (10, 75):
        squeezed = jpeg_round_trip(images, quality)
        assert squeezed.dtype == np.uint8 and squeezed.shape == images.shape
        assert all(np.array_equal(squeezed[i], _pil_jpeg(images[i], quality)) for i in range(5))
        assert not np.array_equal(squeezed, images)
    assert np.array_equal(jpeg_round_trip(images, 10), jpeg_round_trip(images, 10))


def test_grayscale_is_pil_luma_on_rgb_and_the_identity_on_one_channel():
    rgb = tiny_dataset(n=4, shape=(8, 8, 3), seed=3).images
    gray = grayscale(rgb)
    for i in range(4):
        luma = np.asarray(Image.fromarray(rgb[i]).convert("L"))
        assert np.array_equal(gray[i], np.repeat(luma[..., None], 3, axis=-1))
    one = tiny_dataset(n=4, shape=(8, 8, 1), seed=3).images
    assert np.array_equal(grayscale(one), one)
    assert np.array_equal(_predict("iss_grayscale", victim=CONV), _predict("none", victim=CONV))


def test_bit_depth_reduction_is_pil_posterize():
    rgb = tiny_dataset(n=3, shape=(8, 8, 3), seed=4).images
    for bits in (1, 2, 5):
        squeezed = reduce_bit_depth(rgb, bits)
        assert all(np.array_equal(squeezed[i], np.asarray(ImageOps.posterize(Image.fromarray(rgb[i]), bits)))
                   for i in range(3))
        assert len(np.unique(squeezed)) <= 2 ** bits


@pytest.mark.parametrize(("name", "params", "squeeze", "channels"), [
    ("iss_jpeg", None, lambda x: jpeg_round_trip(x, 10), 1),
    ("iss_jpeg", {"quality": 30}, lambda x: jpeg_round_trip(x, 30), 1),
    ("iss_bitdepth", {"bits": 3}, lambda x: reduce_bit_depth(x, 3), 1), ("iss_grayscale", None, grayscale, 3)],
    ids=["jpeg-10", "jpeg-30", "bitdepth-3", "grayscale-rgb"])
def test_iss_squeezes_training_images_once_and_leaves_test_images_alone(name, params, squeeze, channels):
    data = tiny_dataset(n=96, k=4, shape=(8, 8, channels), seed=1)
    squeezed = data.replace(images=squeeze(data.images))
    defended = make_defense(name, params).fit(_ctx(CONV, data=data))
    plain = make_defense("none").fit(_ctx(CONV, data=squeezed))
    assert np.array_equal(defended.classifier.predict_logits(data.images), plain.classifier.predict_logits(data.images))
    change = np.abs(squeezed.images.astype(int) - data.images.astype(int))
    assert defended.info["squeeze_mean_abs_change"] == pytest.approx(change.mean()) and change.mean() > 0
    assert defended.info["squeeze_max_abs_change"] == change.max()


# ---------------------------------------------------------------- UEraser


def test_max_over_repeats_trains_on_the_highest_loss_copy_of_each_sample():
    losses = torch.tensor([1.0, 5.0, 2.0,    # copy 0 of samples 0, 1, 2
                           4.0, 0.5, 2.5,    # copy 1
                           3.0, 1.0, 0.1], requires_grad=True)
    value = max_over_repeats(losses, repeats=3)
    assert value.item() == pytest.approx((4.0 + 5.0 + 2.5) / 3)
    value.backward()
    picked = torch.zeros(9)
    picked[[3, 1, 5]] = 1 / 3
    assert torch.equal(losses.grad, picked)
    assert max_over_repeats(torch.tensor([1.0, 3.0]), repeats=1).item() == pytest.approx(2.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_policy_is_seeded_in_range_and_changes_images(channels):
    x = torch.rand(12, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    out = ueraser_policy(x, torch.Generator().manual_seed(1), erasing=0.5)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert torch.equal(out, ueraser_policy(x, torch.Generator().manual_seed(1), erasing=0.5))
    assert not torch.equal(out, ueraser_policy(x, torch.Generator().manual_seed(2), erasing=0.5))
    ta = trivial_augment(x, torch.Generator().manual_seed(3))
    assert ta.min() >= 0 and ta.max() <= 1 + 1e-6
    erased = random_erasing(x, torch.Generator().manual_seed(4), p=1.0)
    assert ((erased == 0) & (x != 0)).flatten(1).any(1).all()


def test_plasma_is_a_normalised_fractal_and_channel_shuffle_permutes_channels():
    maps = plasma(4, 16, 16, torch.tensor([0.3, 0.5, 0.7, 0.7]), torch.Generator().manual_seed(0))
    assert maps.shape == (4, 1, 16, 16)
    assert torch.allclose(maps.amin((1, 2, 3)), torch.zeros(4)) and torch.allclose(maps.amax((1, 2, 3)), torch.ones(4))
    gray = torch.rand(4, 1, 8, 8)
    assert torch.equal(channel_shuffle(gray, torch.Generator().manual_seed(0), p=1.0), gray)
    rgb = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    shuffled = channel_shuffle(rgb, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(shuffled.sort(dim=1).values, rgb.sort(dim=1).values) and not torch.equal(shuffled, rgb)


def test_ueraser_repeats_follow_the_adversarial_schedule():
    victim = VictimConfig(model=ModelConfig(name="convnet", width=4), train=TrainConfig(epochs=4, batch_size=32))
    result = make_defense("ueraser", {"repeats": 3, "adversarial_fraction": 0.5}).fit(_ctx(victim))
    assert [h["repeats"] for h in result.history] == [3, 3, 1, 1]
    assert all(0 <= h["train_acc"] <= 1 for h in result.history)
    assert result.info["adversarial_epochs"] == 2.0
