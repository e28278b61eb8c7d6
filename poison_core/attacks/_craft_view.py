"""A surrogate rewritten for crafting: the same function and parameter gradient, computed faster
when that gradient is differentiated with respect to the input (Witches' Brew's gradient matching,
Geiping et al., ICLR 2021, Eq. 3). :func:`crafting_view` returns a copy of an eval-mode model where

* a Conv2d followed by an eval-mode BatchNorm2d is one convolution of weight W * s and bias
  beta - mu * s (+ b * s), s = gamma / sqrt(var + eps) (Ioffe & Szegedy, ICML 2015, Alg. 2):
  W, gamma, beta stay the parameters (autograd reaches them through s), and no per-pixel BatchNorm
  is left to differentiate twice; any other eval-mode BatchNorm2d is the affine map x * s + shift;
* that convolution has its own double backward, which computes only the terms asked for (torch's
  also computes d/dW whenever the input gradient is differentiated, even for a constant W);
* a ReLU followed by a max-pool is moved after it (they commute: the same values, arg-max and
  gradient), and ReLU (inside a Sequential) and max-pool save their tensors as constants: the
  derivative of a piecewise-linear op's backward with respect to its input is zero almost
  everywhere, and autograd would otherwise build, add and backpropagate those zeros;
* the parameters (the model's values, in its order) are stored channels-last, the layout oneDNN's
  convolutions run in without reordering; nested nn.Sequential containers are flattened.

Outside the passes the view is an ordinary module, differentiable in everything. Inside
:func:`parameter_pass` (forward and parameter gradient) and :func:`input_pass` (backpropagating that
to the input) it skips what Witches' Brew never uses: second derivatives in the parameters, the
network input's gradient in the first pass, parameter gradients in the second. The fusion and the
layout change the order of float32 operations (values agree to about 1e-7 relative); the moves,
the Functions and the passes do not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def _layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` in the memory layout of `ref` (an elementwise op on mixed layouts runs several times slower)."""
    channels_last = ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class _ReluMask(torch.autograd.Function):
    """g * [relu(x) > 0], linear in g with relu(x) a constant, so its backward is itself."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(out)
        return torch.ops.aten.threshold_backward(_layout_of(grad, out), out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _ReluMask.apply(grad, out), None


class _ReluConstMask(torch.autograd.Function):
    """relu(x); backward threshold_backward(g, relu(x)) with relu(x) held constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _ReluMask.apply(grad, out.detach())


class _MaxPoolConstIndex(torch.autograd.Function):
    """max_pool2d(x); backward scatters to the saved arg-max, the input held constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *args) -> torch.Tensor:  # type: ignore[override]
        out, index = torch.ops.aten.max_pool2d_with_indices(x, *args)  # args: kernel, stride, padding, dilation, ceil
        ctx.save_for_backward(x, index)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, index = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x.detach(), *ctx.args, index)
        return (grad_x,) + (None,) * len(ctx.args)


class ReLU(nn.Module):
    """nn.ReLU through :class:`_ReluConstMask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReluConstMask.apply(x)


class MaxPool2d(nn.Module):
    """nn.MaxPool2d through :class:`_MaxPoolConstIndex`."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        pair = [[v, v] if isinstance(v, int) else list(v) for v in
                (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation)]
        self.args = (*pair, bool(pool.ceil_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxPoolConstIndex.apply(x, *self.args)


def _bn_terms(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, beta - mu * s) of an eval-mode BatchNorm, differentiable in gamma and beta."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    return scale, shift if bn.bias is None else bn.bias + shift


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as x * s + (beta - mu * s)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = _bn_terms(self.bn)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


@dataclass
class Passes:
    """The backward pass a view's convolutions are in (None: every gradient autograd asks for)."""

    mode: Literal["parameters", "input"] | None = None
    network_input: torch.Tensor | None = None


def _conv_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, args: tuple, mask: list[bool]):
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], stride, padding, dilation,
                                               False, [0, 0], groups, mask)


class _ConvGrads(torch.autograd.Function):
    """(dx, dW, db) of y = conv(x, W) + b for the output gradient g; its backward computes only what is asked."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, args: tuple, need_x: bool):  # type: ignore
        ctx.save_for_backward(grad, x, w)
        ctx.args = args
        return tuple(_conv_grads(grad, x, w, args, [need_x, True, True]))

    @staticmethod
    def backward(ctx, gg_x, gg_w, gg_b):  # type: ignore[override]
        grad, x, weight = ctx.saved_tensors
        d_grad = d_x = d_w = None
        if ctx.needs_input_grad[0]:  # <gg_x, conv^T(g, W)> + <gg_w, corr(x, g)> + <gg_b, sum g> is linear in g
            if gg_w is not None:
                d_grad = F.conv2d(x, gg_w, gg_b, *ctx.args)
                gg_b = None
            if gg_x is not None:
                part = F.conv2d(gg_x, weight, gg_b, *ctx.args)
                d_grad = part if d_grad is None else d_grad + part
            elif gg_b is not None:
                d_grad = gg_b.view(1, -1, 1, 1).expand_as(grad)
        if ctx.needs_input_grad[1] and gg_w is not None:  # d<gg_w, corr(x, g)>/dx = conv^T(g, gg_w)
            d_x = _conv_grads(grad, x, gg_w, ctx.args, [True, False, False])[0]
        if ctx.needs_input_grad[2] and gg_x is not None:  # d<gg_x, conv^T(g, W)>/dW = corr(gg_x, g)
            d_w = _conv_grads(grad, gg_x, weight, ctx.args, [False, True, False])[1]
        return d_grad, d_x, d_w, None, None


class _Conv(torch.autograd.Function):
    """conv(x, W) + b whose backward follows the view's pass: 'parameters': (dW, db) and dx (none for
    the network input), differentiable in x and g but not in W; 'input': dx only; None: all asked for."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, args: tuple,  # type: ignore[override]
                passes: Passes) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.passes, ctx.at_input = args, passes, x is passes.network_input
        return F.conv2d(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        mode = ctx.passes.mode
        if mode == "input":
            d_x = _conv_grads(grad, x, weight, ctx.args, [True, False, False])[0] if ctx.needs_input_grad[0] else None
            return d_x, None, None, None, None
        need_x = ctx.needs_input_grad[0] and not (mode == "parameters" and ctx.at_input)
        d_x, d_w, d_b = _ConvGrads.apply(grad, x, weight.detach() if mode == "parameters" else weight, ctx.args,
                                         need_x)
        return d_x, d_w, d_b, None, None


class ConvBN(nn.Module):
    """Conv2d then eval-mode BatchNorm2d as one convolution of weight W * s and bias beta - mu * s (+ b * s)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, passes: Passes) -> None:
        super().__init__()
        self.conv, self.bn, self.passes = conv, bn, passes
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        scale, shift = _bn_terms(self.bn)
        bias = shift if conv.bias is None else shift + conv.bias * scale
        return _Conv.apply(x, conv.weight * scale.view(-1, 1, 1, 1), bias, self.args, self.passes)


def _frozen_bn(module: nn.Module) -> bool:
    return (type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None)


def _flat(seq: nn.Sequential) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in seq:
        out.extend(_flat(child) if type(child) is nn.Sequential else [child])
    return out


def _rewrite(layers: list[nn.Module], passes: Passes) -> list[nn.Module]:
    """Fuse Conv2d + frozen BatchNorm2d, move ReLU after a max-pool, swap in the Functions; a ReLU only
    where its input is the previous layer's output (an in-place ReLU on the container's input is seen)."""
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        here, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        private = type(here) is nn.ReLU and (i > 0 or not here.inplace)
        fusable = type(here) is nn.Conv2d and here.padding_mode == "zeros" and isinstance(here.padding, tuple)
        if fusable and after is not None and _frozen_bn(after):
            out.append(ConvBN(here, after, passes))
            i += 2
        elif private and type(after) is nn.MaxPool2d and not after.return_indices:
            out.extend([MaxPool2d(after), ReLU()])
            i += 2
        else:
            out.append(ReLU() if private else here)
            i += 1
    return out


def _replace_leaves(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.MaxPool2d and not child.return_indices:
            setattr(module, name, MaxPool2d(child))
        elif _frozen_bn(child):
            setattr(module, name, ChannelAffine(child))
        elif not isinstance(child, (ConvBN, ChannelAffine)):
            _replace_leaves(child)


def _rewrite_sequentials(module: nn.Module, passes: Passes) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            setattr(module, name, nn.Sequential(*_rewrite(_flat(child), passes)))
        else:
            _rewrite_sequentials(child, passes)


def crafting_view(model: nn.Module) -> nn.Module:
    """A rewritten copy of eval-mode `model` (see the module docstring); the model is not changed."""
    passes = Passes()
    view = copy.deepcopy(model)
    if type(view) is nn.Sequential:
        view = nn.Sequential(*_rewrite(_flat(view), passes))
    _rewrite_sequentials(view, passes)
    _replace_leaves(view)
    view.crafting_passes = passes
    return view.to(memory_format=torch.channels_last)


@contextmanager
def _mode(views: Sequence[nn.Module], mode: Literal["parameters", "input"],
          network_input: torch.Tensor | None) -> Iterator[None]:
    states = [v.crafting_passes for v in views if isinstance(getattr(v, "crafting_passes", None), Passes)]
    for state in states:
        state.mode, state.network_input = mode, network_input
    try:
        yield
    finally:
        for state in states:
            state.mode, state.network_input = None, None


def parameter_pass(views: Sequence[nn.Module], network_input: torch.Tensor) -> AbstractContextManager[None]:
    """Forward on `network_input` and parameter gradient inside this block: differentiable in the input,
    not in the parameters; the convolutions reading `network_input` compute no gradient for it."""
    return _mode(views, "parameters", network_input)


def input_pass(views: Sequence[nn.Module]) -> AbstractContextManager[None]:
    """Backpropagate to the input inside this block: the views' convolutions return no parameter gradient."""
    return _mode(views, "input", None)
