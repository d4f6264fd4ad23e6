"""Adapter layers that compute and keep less than peft's: one matmul per layer for adapters that
train a whole weight change (LoHa, LoKr), and no second copy of the input under autocast.

peft's LyCORIS layers compute `base(x) + F.linear(x, delta_W)`: a second full-size matmul (or
convolution) in every adapted layer, forward and backward, and, without gradient checkpointing,
delta_W saved for backward in every layer (weight-sized; gigabytes on SDXL). Here the layer
computes `F.linear(x, W + delta_W)` once and saves only its input and the adapter's small
factors: backward rebuilds delta_W from them, computes the input's gradient with `W + delta_W`
(one matmul) and the gradient of delta_W (`g^T x`, which any whole-weight adapter needs), and
back-propagates that into the factors. The result equals peft's up to the rounding of one sum.

Only the plain case is taken over: adapters on, not merged, no module or rank dropout (the
network kinds here have none), a frozen base weight; anything else runs peft's forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from library.models.fp8 import base_weight
from library.utils.precision import autocast_dtype, autocast_off, compute_dtype


class _WholeDeltaLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, dtype, *params):
        base = layer.get_base_layer()
        with autocast_off(x.device.type):
            with torch.no_grad():
                weight = (base_weight(base, torch.float32) + _delta(layer)).to(dtype)
            xc = x.to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            out = _apply(base, xc, weight, bias)
        ctx.layer, ctx.dtype = layer, dtype
        ctx.save_for_backward(xc, *params)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, *params = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        base = layer.get_base_layer()
        with autocast_off(grad.device.type):
            with torch.enable_grad():
                delta = _delta(layer)
            weight = (base_weight(base, torch.float32) + delta.detach()).to(dtype)
            grad = grad.to(dtype)
            grad_x = None
            if isinstance(base, torch.nn.Conv2d):
                if ctx.needs_input_grad[0]:
                    grad_x = torch.nn.grad.conv2d_input(xc.shape, weight, grad, base.stride, base.padding,
                                                        base.dilation, base.groups)
                grad_w = torch.nn.grad.conv2d_weight(xc, weight.shape, grad, base.stride, base.padding,
                                                     base.dilation, base.groups)
            else:
                if ctx.needs_input_grad[0]:
                    grad_x = grad @ weight
                grad_w = grad.reshape(-1, grad.shape[-1]).T @ xc.reshape(-1, xc.shape[-1])
            grads = torch.autograd.grad(delta, params, grad_w.to(delta.dtype), allow_unused=True)
        return (grad_x, None, None, *grads)


def _delta(layer) -> torch.Tensor:
    active = [a for a in layer.active_adapters if a in layer._available_adapters]
    total = None
    for adapter in active:
        d = layer.get_delta_weight(adapter).float()
        total = d if total is None else total + d
    return total


def _apply(base, x, weight, bias):
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, bias)


def _fusable(layer) -> bool:
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged or base.weight.requires_grad or (
            base.bias is not None and base.bias.requires_grad):
        return False
    if isinstance(base, torch.nn.Conv2d) and base.padding_mode != "zeros":
        return False
    active = [a for a in layer.active_adapters if a in layer._available_adapters]
    if not active:
        return False
    return all(not layer.module_dropout[a] and not layer.rank_dropout[a] for a in active)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _fusable(self):
        return type(self).forward(self, x, *args, **kwargs)
    params = [p for name, p in self.named_parameters() if not name.startswith("base_layer") and p.requires_grad]
    out = _WholeDeltaLayer.apply(x, self, compute_dtype(x), *params)
    return out.to(x.dtype)


def fuse_whole_delta(layer) -> bool:
    """Make a peft LyCORIS layer (LoHa, LoKr) compute its base and adapter in one matmul; False
    for other layers (left as they are)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
    if not isinstance(layer, LycorisLayer) or not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    layer.forward = types.MethodType(_fused_forward, layer)
    return True


def _cast_outside_autocast(self, x, dtype):
    if isinstance(x, torch.Tensor) and autocast_dtype(x.device.type) is not None:
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def keep_input_under_autocast(layer) -> None:
    """peft casts a layer's input to the adapter's dtype (fp32) before the adapter; under autocast
    the adapter's matmul casts it back, and that second copy is saved for backward beside the
    base layer's (the same activation twice). Under autocast the input now goes in as it is;
    outside autocast peft's cast stays (dtypes must match there)."""
    if hasattr(layer, "_cast_input_dtype"):
        layer._cast_input_dtype = types.MethodType(_cast_outside_autocast, layer)
