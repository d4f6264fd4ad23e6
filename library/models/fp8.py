"""Frozen base weights stored in float8 (kohya's `fp8_base` / `fp8_base_unet`).

Every frozen `nn.Linear` and `nn.Conv2d` of a model keeps its weight as `float8_e4m3fn` (one byte
per weight instead of two) with one scale per output channel, and computes in the run's dtype:
the layer dequantises its weight just for its own matmul. Norms, embeddings and biases stay in the
run's dtype.

Why not diffusers' layerwise casting (`enable_layerwise_casting`): it casts the parameters
themselves before each forward and back after it, which is for inference; in training the
weights autograd saved would be float8 again by backward. Why not `weight.to(float8)` and
autocast, as kohya does: autocast casts the fp8 weight to bf16
for each matmul *and autograd saves that copy for backward*, so every layer's bf16 weight stays
alive until backward and the forward holds as much weight memory as before. Here a small
autograd function saves only the fp8 weight and its scales and dequantises again in backward
(no weight gradient: the base is frozen, so the input is not saved either). The per-channel scale
maps each row's largest magnitude to float8's largest finite value (448), so small rows keep
their mantissa bits instead of falling into float8's subnormals.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from library.utils.precision import autocast_off, compute_dtype

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def is_fp8(module: nn.Module) -> bool:
    return getattr(module, "fp8_scale", None) is not None


def base_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module's weight in `dtype`, dequantised when it is stored in float8."""
    if is_fp8(module):
        return module.weight.to(dtype) * module.fp8_scale.to(dtype)
    return module.weight.to(dtype)


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, fp32 scale per output channel, shaped to broadcast over the weight)."""
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12)
    scale = (amax / _FP8_MAX).reshape(-1, *([1] * (w.dim() - 1)))
    return (w / scale).to(FP8), scale


class _Fp8Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, bias):
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            weight = base_weight(module, dtype)
            out = _apply(module, x.to(dtype), weight, None if bias is None else bias.to(dtype))
        ctx.module, ctx.dtype, ctx.x_dtype, ctx.x_shape = module, dtype, x.dtype, x.shape
        ctx.has_bias_grad = bias is not None and bias.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        module, dtype = ctx.module, ctx.dtype
        grad_x = grad_bias = None
        with autocast_off(grad.device.type):
            g = grad.to(dtype)
            if ctx.needs_input_grad[0]:
                weight = base_weight(module, dtype)
                if isinstance(module, nn.Conv2d):
                    grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, g, module.stride, module.padding,
                                                        module.dilation, module.groups)
                else:
                    grad_x = g @ weight
                grad_x = grad_x.to(ctx.x_dtype)
            if ctx.has_bias_grad:
                dims = [0, 2, 3] if isinstance(module, nn.Conv2d) else list(range(g.dim() - 1))
                grad_bias = g.sum(dim=dims)
        return grad_x, None, grad_bias


def _apply(module, x, weight, bias):
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, bias)


def _forward(self, x):
    return _Fp8Layer.apply(x, self, self.bias)


def _eligible(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    # Only zero padding has a plain conv2d_input gradient; the base models' convolutions all use it.
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def store_in_fp8(model: nn.Module) -> int:
    """Every frozen Linear/Conv2d weight of `model` in float8, in place; returns the number of
    weights stored. Call before the network is injected (its adapters stay in the run's dtype)
    and before the model moves to the device (the full-precision copy never reaches it)."""
    count = 0
    # diffusers and transformers take a model's dtype from its first floating parameter (pipelines
    # make their latents and embeddings in it): that one layer (the UNet's conv_in: 12k weights)
    # stays in the run's dtype, so that `model.dtype` still names the dtype the model computes in.
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    for module in model.modules():
        if not _eligible(module) or module.weight.requires_grad or module.weight is first:
            continue
        w8, scale = quantise(module.weight)
        module.weight = nn.Parameter(w8, requires_grad=False)
        module.register_buffer("fp8_scale", scale, persistent=False)
        module.forward = types.MethodType(_forward, module)
        count += w8.numel()
    return count


def leave_to_ddp_alone(model: nn.Module) -> None:
    """Lists the model's float8 weights for DDP not to broadcast at wrapping: frozen and equal on
    every process, they need no sync, and not every backend can send float8 (gloo cannot). Called
    just before wrapping, with the names the injected adapters gave them."""
    names = {n for n, p in model.named_parameters() if p.dtype == FP8}
    if names:
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignored | names)
