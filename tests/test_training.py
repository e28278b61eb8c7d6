"""The trainer: learns digits, is bit-deterministic on CPU, leaves the global RNG alone, and calls
its hooks with the documented arguments."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poison_core.config import ModelConfig, TrainConfig
from poison_core.data.dataset import ImageDataset
from poison_core.models import build_model
from poison_core.models.io import state_checksum
from poison_core.training import (
    LossContext,
    TrainHooks,
    accuracy,
    batch_slices,
    learning_rate,
    predict,
    predict_logits,
    reestimate_batchnorm,
    to_tensor,
    train_model,
)

CPU = torch.device("cpu")
FAST = TrainConfig(epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataset, ImageDataset]:
    """sklearn digits as uint8 (N, 8, 8, 1), split 75/25 by a fixed permutation."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images / 16.0 * 255.0).astype(np.uint8)[..., None]
    full = ImageDataset(images, raw.target, tuple(str(i) for i in range(10)), name="digits")
    order = np.random.default_rng(0).permutation(len(full))
    cut = int(0.75 * len(full))
    return full.subset(order[:cut], "digits-train"), full.subset(order[cut:], "digits-test")


@pytest.fixture(scope="module")
def small(digits) -> ImageDataset:
    return digits[0].subset(np.arange(200), "digits-small")


def _model(seed: int = 0, name: str = "convnet") -> torch.nn.Module:
    return build_model(ModelConfig(name=name, width=8), (8, 8, 1), 10, seed=seed)


def test_to_tensor_is_nchw_unit_interval() -> None:
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    x = to_tensor(images, CPU)
    assert x.shape == (2, 3, 3, 4) and x.dtype == torch.float32
    assert x[1, 2, 0, 3].item() == pytest.approx(images[1, 0, 3, 2] / 255)


def test_convnet_learns_digits(digits) -> None:
    train, test = digits
    model = build_model(ModelConfig(name="convnet"), train.image_shape, train.num_classes, seed=0)
    history = train_model(model, train, TrainConfig(epochs=8, batch_size=64), device=CPU, seed=0, eval_data=test)
    assert not model.training
    assert len(history) == 8 and [r["epoch"] for r in history.epochs] == list(range(8))
    assert set(history.final) == {"epoch", "loss", "train_acc", "lr", "eval_acc"}
    assert history.final["eval_acc"] == pytest.approx(accuracy(model, test, device=CPU))
    assert accuracy(model, test, device=CPU) > 0.85
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]


@pytest.mark.parametrize("cfg", [FAST, TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-3, schedule="step")],
                         ids=["sgd-cosine", "adam-step"])
def test_same_seed_identical_weights(small, cfg: TrainConfig) -> None:
    a, b, c = _model(), _model(), _model()
    train_model(a, small, cfg, device=CPU, seed=7)
    train_model(b, small, cfg, device=CPU, seed=7)
    train_model(c, small, cfg, device=CPU, seed=8)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert state_checksum(a) == state_checksum(b) != state_checksum(c)


def test_train_model_leaves_global_rng_untouched(small) -> None:
    torch.manual_seed(2024)
    before = torch.random.get_rng_state()
    train_model(_model(), small, FAST, device=CPU, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())


def test_empty_dataset_is_a_clear_error(small) -> None:
    with pytest.raises(ValueError, match="no samples"):
        train_model(_model(), small.subset(np.arange(0)), FAST, device=CPU, seed=0)


def test_singleton_last_batch_joins_previous() -> None:
    assert batch_slices(65, 32) == [slice(0, 32), slice(32, 65)]
    assert batch_slices(64, 32) == [slice(0, 32), slice(32, 64)]
    assert batch_slices(1, 32) == [slice(0, 1)]


def test_schedules() -> None:
    cos = TrainConfig(epochs=4, lr=0.1, schedule="cosine")
    assert learning_rate(cos, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cos, 20, 10) == pytest.approx(0.05)
    assert learning_rate(cos, 39, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 39 / 40)))
    step = TrainConfig(epochs=4, lr=0.1, schedule="step")
    assert [learning_rate(step, e * 10, 10) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert learning_rate(TrainConfig(epochs=1, lr=0.1, schedule="step"), 5, 10) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(lr=0.3, schedule="none"), 99, 10) == pytest.approx(0.3)


def test_history_records_lr_per_epoch(small) -> None:
    history = train_model(_model(), small, TrainConfig(epochs=4, batch_size=50, lr=0.1, schedule="step"),
                          device=CPU, seed=0)
    assert [r["lr"] for r in history.epochs] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_augment_hook_may_return_soft_labels(small) -> None:
    calls: list[tuple[int, torch.Generator]] = []

    def mixup(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((len(x), gen))
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
        perm = torch.randperm(len(x), generator=gen)
        soft = F.one_hot(y, 10).float()
        return 0.5 * (x + x[perm]), 0.5 * (soft + soft[perm])

    history = train_model(_model(), small, FAST, device=CPU, seed=0, hooks=TrainHooks(augment=mixup))
    assert len(calls) == 2 * math.ceil(200 / 32) and all(isinstance(g, torch.Generator) for _, g in calls)
    assert math.isfinite(history.final["loss"])


def test_loss_hook_gets_per_sample_losses_and_indices(small) -> None:
    seen: list[tuple[torch.Tensor, LossContext]] = []

    def trimmed(per_sample: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        seen.append((per_sample.detach(), ctx))
        keep = per_sample.argsort()[: max(1, int(0.8 * len(per_sample)))]
        return per_sample[keep].mean()

    train_model(_model(), small, FAST, device=CPU, seed=0, hooks=TrainHooks(loss=trimmed))
    assert [ctx.epoch for _, ctx in seen] == [0] * 7 + [1] * 7
    for losses, ctx in seen:
        assert losses.shape == (len(ctx.indices),) == (ctx.logits.shape[0],) == (len(ctx.targets),)
        assert ctx.indices.dtype == torch.long
        assert torch.equal(ctx.targets, torch.from_numpy(small.labels[ctx.indices.numpy()]))
        expected = F.cross_entropy(ctx.logits.detach(), ctx.targets, reduction="none")
        torch.testing.assert_close(losses, expected)
    epoch0 = torch.cat([ctx.indices for _, ctx in seen if ctx.epoch == 0])
    assert sorted(epoch0.tolist()) == list(range(len(small)))  # each sample exactly once per epoch


def test_on_epoch_end_called_each_epoch(small, caplog) -> None:
    calls: list[tuple[int, dict]] = []
    hooks = TrainHooks(on_epoch_end=lambda epoch, model, record: calls.append((epoch, dict(record))))
    with caplog.at_level(logging.DEBUG, logger="poison_core.training"):
        history = train_model(_model(), small, TrainConfig(epochs=3, batch_size=64), device=CPU, seed=0,
                              hooks=hooks, eval_data=small)
    assert [e for e, _ in calls] == [0, 1, 2]
    assert [r for _, r in calls] == history.epochs
    assert sum("epoch" in rec.getMessage() for rec in caplog.records) == 3


def test_predict_and_accuracy_agree(small) -> None:
    model = _model()
    model.train()
    logits = predict_logits(model, small.images, device=CPU, batch_size=64)
    assert not model.training
    assert logits.shape == (len(small), 10) and logits.dtype == np.float32
    labels = predict(model, small.images, device=CPU)
    assert labels.dtype == np.int64 and np.array_equal(labels, logits.argmax(1))
    assert accuracy(model, small, device=CPU) == pytest.approx(float(np.mean(labels == small.labels)))
    assert predict_logits(model, small.images[:0], device=CPU).shape == (0, 10)


def test_reestimate_batchnorm_gives_the_data_statistics_of_the_current_weights(small) -> None:
    """After re-estimation each BatchNorm's running mean is the average of its batch means over the data
    (here: the first BatchNorm's input mean per channel, which a stale EMA would not match)."""
    model = _model()
    train_model(model, small, FAST, device=CPU, seed=0)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))  # the weights move; the running statistics do not
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].mean(dim=(0, 2, 3))))
    reestimate_batchnorm(model, small, device=CPU, batch_size=64)
    handle.remove()
    assert not model.training and len(seen) == len(batch_slices(len(small), 64))
    assert torch.allclose(first.running_mean, torch.stack(seen).mean(dim=0), atol=1e-5)
    assert first.momentum == 0.1  # restored


@pytest.mark.slow
def test_compiled_training_matches_eager(small) -> None:
    """TrainConfig.compile runs the same optimisation through torch.compile (TorchInductor on CPU
    needs a C++ compiler: .ci/run installs g++)."""
    cfg = TrainConfig(epochs=2, batch_size=50)
    eager, compiled = _model(), _model()
    train_model(eager, small, cfg, device=CPU, seed=3)
    from torch._dynamo.utils import counters

    counters.clear()
    history = train_model(compiled, small, cfg.model_copy(update={"compile": True}), device=CPU, seed=3)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really went through dynamo
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    se, sc = eager.state_dict(), compiled.state_dict()
    assert set(se) == set(sc)
    assert all(torch.allclose(se[k].float(), sc[k].float(), atol=1e-3, rtol=1e-3) for k in se)
    assert not all(torch.equal(se[k], _model().state_dict()[k]) for k in se)
