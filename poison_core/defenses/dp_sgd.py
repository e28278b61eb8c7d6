"""Differentially private SGD as a poisoning defense (Hong, Chandrasekaran, Kaya, Dumitras & Papernot,
'On the Effectiveness of Mitigating Data Poisoning Attacks with Gradient Shaping', 2020).

Hong et al. observe that poisons show up as per-sample gradients of larger norm and different
orientation than clean ones, and that DP-SGD's *gradient shaping* blunts them "even in configurations
that do not result in meaningful privacy guarantees". With `granularity: sample` the optimiser step is
Abadi et al. ('Deep Learning with Differential Privacy', CCS 2016), Algorithm 1, with the lot equal to
the batch B:

    g_i = grad_theta L(theta, x_i)                        per-sample gradient
    g_i <- g_i / max(1, ||g_i||_2 / C)                    clip to L2 norm C
    g~  = (sum_i g_i + N(0, sigma^2 C^2 I)) / B           add Gaussian noise, average

and g~ replaces the batch gradient of the victim's own optimiser, schedule and weight decay
(``training.make_optimizer`` / ``learning_rate``). Per-sample gradients come from one forward and
backward pass of the batch, as layer inputs times the gradients at layer outputs (Goodfellow, 'Efficient
Per-Example Gradient Computations', 2015; Opacus's grad samplers), for Linear, Conv2d and BatchNorm
layers: without BatchNorm this is exactly torch.func's vmap(grad) per-sample gradient (tested), and a
vmap cannot run BatchNorm on the batch. Geiping et al.'s forest (``forest/victims/training.py``) instead
clips and noises the *batch* gradient "to cope with effects on batch normalization". Here BN stays in
train mode on the whole batch and g_i is the gradient through sample i's own activations: these sum to
the batch gradient exactly, but BN's batch statistics pass some of the other samples' losses through
sample i, so with BatchNorm no formal (epsilon, delta) guarantee holds; privacy accounting is not the
point of the defense and is not computed. Memory: B copies of the parameters' gradients per step.

Two granularities (`granularity`):

* 'batch' (default), forest's rule (JonasGeiping/data-poisoning, forest/victims/training.py, the
  defense "discussed in Hong et al., 2020" applied "on mini batches instead of instances to cope with
  effects on batch normalization"): the mean cross-entropy's gradient of the batch is clipped to L2
  norm C over all parameters, then N(0, sigma^2 C^2) is added to every coordinate. Defaults C = 1.0,
  sigma = 0.01: forest/hyperparameters.py PRIVACY_GAUSSIAN (`privacy=dict(clip=1.0, noise=0.01,
  distribution='gaussian')`). Clean cost measured on digits (BatchNorm ConvNet, 15 epochs, batch 64, lr
  0.05, seeds 0-2): 0.987 +- 0.001 vs 0.986 +- 0.004 undefended (benchmarks/results/recipes.md, "DP-SGD
  defaults"). It shapes the batch's step, not each sample's, so it blunts poisons far less.
* 'sample', Abadi et al.'s Alg. 1 above, the per-sample shaping Hong et al. study. The earlier
  defaults (C = 1, sigma = 0.1) cost tens of points of clean accuracy on the BatchNorm ConvNet: 0.809 +-
  0.010 vs 0.986 on the same digits setting, every per-sample gradient clipped to the end (mean norm
  18); C = 5 still 0.869 +- 0.012, C = 10 0.93-0.94 (seed 0). With BatchNorm the per-sample terms carry
  large parts that cancel in their sum, so clipping them biases the step (the reason forest gives).
  Without BatchNorm (the MLP) C = 1, sigma = 0.1 cost 8 points (tests/test_efficacy_dp_sgd.py).

The noise is drawn from a torch.Generator seeded from the defense seed, so a seed fixes the run. The
victim recipe's augmentation (TrainConfig.augment) is applied to each batch, as in every other retrain.
A DP-SGD row must still be read with its `clean_acc` beside its ASR: every cell's row carries both.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, ModelClassifier,
                                       register_defense)
from poison_core.training import batch_slices, learning_rate, make_optimizer, recipe_augment, to_tensor

log = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


class DPSGDParams(DefenseParams):
    """granularity: what is clipped, 'batch' (forest's rule: the mini-batch's mean gradient, then noise of
    standard deviation sigma * C added to it) or 'sample' (Abadi et al. 2016, Alg. 1: each per-sample
    gradient clipped to C, noise of standard deviation sigma * C on their sum, then the mean).
    clip_norm: the L2 bound C; noise_multiplier: sigma. Defaults: forest's PRIVACY_GAUSSIAN
    (JonasGeiping/data-poisoning forest/hyperparameters.py: clip 1.0, noise 0.01, gaussian, applied
    batch-wise in forest/victims/training.py)."""

    granularity: Literal["batch", "sample"] = "batch"
    clip_norm: float = Field(1.0, gt=0, le=1e4)
    noise_multiplier: float = Field(0.01, ge=0, le=100)


def _grad_samples(module: nn.Module, a: torch.Tensor, go: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients {param name: (B, *shape)} of one layer from its input `a` and the gradient
    `go` of the summed loss at its output (Goodfellow 2015; Opacus's grad samplers)."""
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        a2, go2 = a.reshape(n, -1, a.shape[-1]), go.reshape(n, -1, go.shape[-1])
        return {"weight": torch.einsum("bto,bti->boi", go2, a2), "bias": go2.sum(1)}
    if isinstance(module, nn.Conv2d):
        groups, c_out = module.groups, module.out_channels
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        cols = cols.view(n, groups, -1, cols.shape[-1])
        go2 = go.reshape(n, groups, c_out // groups, -1)
        weight = torch.einsum("bgol,bgil->bgoi", go2, cols).reshape(n, *module.weight.shape)
        return {"weight": weight, "bias": go2.sum(-1).reshape(n, c_out)}
    dims = [d for d in range(a.ndim) if d != 1]
    if module.training or not module.track_running_stats:
        mean, var = a.mean(dims, keepdim=True), a.var(dims, unbiased=False, keepdim=True)
    else:
        shape = [1, -1] + [1] * (a.ndim - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)
    xhat = (a - mean) / torch.sqrt(var + module.eps)
    spatial = list(range(2, a.ndim))
    weight, bias = (go * xhat), go
    return {"weight": weight.sum(spatial) if spatial else weight, "bias": bias.sum(spatial) if spatial else bias}


def _trainable_direct(module: nn.Module) -> list[str]:
    return [name for name, q in module.named_parameters(recurse=False) if q.requires_grad]


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients ``{param name: (B, *shape)}`` of the summed cross-entropy of the batch, with
    the per-sample losses (B,) and logits (B, K), from one train-mode forward and backward pass.

    g_i is the gradient flowing back through sample i's own activations: for each Linear / Conv2d /
    BatchNorm layer, the outer product of its input for sample i and the gradient at its output for
    sample i. Without BatchNorm g_i is exactly grad L(theta, x_i); with it, BN's batch statistics route
    some of sample j's loss through sample i, and still sum_i g_i is exactly the batch gradient."""
    names = {module: name for name, module in model.named_modules()}
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        records.append((module, inputs[0].detach(), output))
        return output + 0  # a copy: in-place ops downstream (ReLU(inplace=True)) leave `output` intact

    handles = []
    for module in model.modules():
        if not _trainable_direct(module):
            continue
        if not isinstance(module, SUPPORTED):
            raise ValueError(f"dp_sgd: per-sample gradients of {type(module).__name__} layers are not implemented "
                             f"(supported: {', '.join(t.__name__ for t in SUPPORTED)})")
        if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            raise ValueError("dp_sgd: per-sample gradients need Conv2d layers with integer zero padding")
        handles.append(module.register_forward_hook(keep))
    model.train()
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    losses = F.cross_entropy(logits, y, reduction="none")
    outputs = torch.autograd.grad(losses.sum(), [out for _, _, out in records])
    grads: dict[str, torch.Tensor] = {}
    for (module, a, _), go in zip(records, outputs):
        for pname, g in _grad_samples(module, a, go.detach()).items():
            if pname in _trainable_direct(module):
                key = f"{names[module]}.{pname}" if names[module] else pname
                grads[key] = grads[key] + g if key in grads else g
    return grads, losses.detach(), logits.detach()


def clip_per_sample(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """g_i / max(1, ||g_i||_2 / C) with the norm over all parameters of sample i (Abadi et al., Alg. 1);
    returns the clipped gradients and the unclipped norms (B,)."""
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    scale = 1.0 / torch.clamp(norms / clip_norm, min=1.0)
    clipped = {name: g * scale.view(-1, *([1] * (g.ndim - 1))) for name, g in grads.items()}
    return clipped, norms


def noisy_mean(clipped: dict[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(sum_i g_i + N(0, sigma^2 C^2 I)) / B, the noisy lot gradient of Abadi et al. (Alg. 1)."""
    out = {}
    for name, g in clipped.items():
        total = g.sum(0)
        if noise_multiplier > 0:
            noise = torch.randn(total.shape, generator=gen, device=gen.device, dtype=total.dtype)
            total = total + noise_multiplier * clip_norm * noise
        out[name] = total / g.shape[0]
    return out


def batch_gradient(model: nn.Module, named: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   p: DPSGDParams, gen: torch.Generator
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """forest's batch-wise rule (forest/victims/training.py): the mean cross-entropy's gradient clipped to
    L2 norm C over all parameters (clip_grad_norm_), plus N(0, (sigma C)^2) on every coordinate. Returns
    the step, the per-sample losses, the logits and the batch gradient's norm (1,)."""
    model.train()
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    grads = torch.autograd.grad(losses.mean(), list(named.values()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    scale = 1.0 / torch.clamp(norm / p.clip_norm, min=1.0)
    step = {}
    for name, g in zip(named, grads):
        g = g * scale
        if p.noise_multiplier > 0:
            g = g + p.noise_multiplier * p.clip_norm * torch.randn(g.shape, generator=gen, device=gen.device,
                                                                   dtype=g.dtype)
        step[name] = g
    return step, losses.detach(), logits.detach(), norm.detach().view(1)


@register_defense
class DPSGD(Defense):
    """Train with clipped, Gaussian-noised gradients: by default forest's batch-wise rule (the batch's mean
    gradient clipped to C, noise sigma * C per coordinate; ``PRIVACY_GAUSSIAN``), or per-sample clipping
    (``granularity: sample``; Hong et al. 2020; Abadi et al. 2016, Alg. 1)."""

    name = "dp_sgd"
    paper = "Hong et al., 2020, Mitigating data poisoning attacks with gradient shaping (DP-SGD, Abadi et al. 2016)"
    summary = ("training: clip the batch gradient (or each per-sample one) to norm C, add N(0, sigma^2 C^2) noise "
               "(gradient shaping)")
    Params = DPSGDParams

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        from poison_core.protocols import build_victim

        p, data, cfg, device = self.params, ctx.train, ctx.victim.train, torch.device(ctx.device)
        if len(data) == 0:
            raise ValueError(f"cannot train on dataset {data.name!r}: it has no samples")
        model = build_victim(ctx.victim, data, ctx.seed, device)
        batches = batch_slices(len(data), cfg.batch_size)
        shuffle_seed, noise_seed, augment_seed = (
            int(s) for s in np.random.SeedSequence(ctx.seed).generate_state(3, np.uint64) >> 1)
        history: list[dict[str, Any]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            shuffle_gen = torch.Generator().manual_seed(shuffle_seed)
            noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
            augment_gen = torch.Generator(device=device).manual_seed(augment_seed)
            optimizer = make_optimizer(model, cfg)
            named: dict[str, torch.Tensor] = {name: q for name, q in model.named_parameters() if q.requires_grad}
            for epoch in range(cfg.epochs):
                model.train()
                order = torch.randperm(len(data), generator=shuffle_gen)
                total_loss, correct, clipped_count, norm_sum = 0.0, 0, 0, 0.0
                for b, batch in enumerate(batches):
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(cfg, epoch * len(batches) + b, len(batches))
                    idx = order[batch].numpy()
                    x = recipe_augment(to_tensor(data.images[idx], device), cfg, augment_gen)
                    y = torch.from_numpy(data.labels[idx]).to(device)
                    if p.granularity == "sample":
                        grads, losses, logits = per_sample_gradients(model, x, y)
                        clipped, norms = clip_per_sample(grads, p.clip_norm)
                        step = noisy_mean(clipped, p.clip_norm, p.noise_multiplier, noise_gen)
                    else:
                        step, losses, logits, norms = batch_gradient(model, named, x, y, p, noise_gen)
                    for name, g in step.items():
                        named[name].grad = g
                    optimizer.step()
                    total_loss += float(losses.sum())
                    correct += int((logits.argmax(1) == y).sum())
                    weight = len(y) if p.granularity == "batch" else 1  # a batch's one norm counts for its samples
                    clipped_count += weight * int((norms > p.clip_norm).sum())
                    norm_sum += weight * float(norms.sum())
                record = {"epoch": epoch, "loss": total_loss / len(data), "train_acc": correct / len(data),
                          "lr": learning_rate(cfg, epoch * len(batches), len(batches)),
                          "clipped_fraction": clipped_count / len(data), "grad_norm": norm_sum / len(data)}
                history.append(record)
                log.debug("dp_sgd epoch %d/%d loss=%.4g acc=%.3f clipped=%.2f", epoch + 1, cfg.epochs,
                             record["loss"], record["train_acc"], record["clipped_fraction"])
        model.eval()
        return DefenseResult(ModelClassifier(model, device), history=history,
                             info={"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier,
                                   "final_clipped_fraction": history[-1]["clipped_fraction"]})
