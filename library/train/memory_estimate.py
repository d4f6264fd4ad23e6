"""GPU memory of a training step, counted in bytes on the CPU (bench/memory_estimate.py).

The full-size denoiser is built on PyTorch's meta device (shapes and dtypes, no storage, no
arithmetic), the network injected and, for APT, the recording processors installed, exactly as
training does; one forward at the real resolution then counts what autograd saves for backward
(library.utils.memory.SavedTensors; the weights frozen layers save are the parameters themselves
and count once, as weights), so nothing is extrapolated. With gradient checkpointing the
forward saves only what lies outside the checkpointed blocks; the backward then reruns one block
at a time, so the largest block's own saved tensors are added (measured in a forward without
checkpointing, attributed per block by module hooks).

The estimate is allocated memory at the step's peak: weights, the trained parameters with their
gradients and optimizer state, saved activations (and APT's recordings). Not counted: the CUDA
context (about 0.3-0.6 GiB), the allocator's reserve beyond what is allocated, cuBLAS/cuDNN
workspaces and the transient tensors of single kernels.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from library.models.conditioning import Conditioning
from library.utils.memory import SavedTensors

GIB = 2 ** 30
# Optimizer state per trained parameter: AdamW keeps two fp32 moments, the 8-bit variants one
# byte each (plus a small block-wise scale, ignored).
OPTIMIZER_BYTES = {"AdamW": 8, "AdamW8bit": 2}


@dataclass
class StepMemory:
    """Bytes of one training configuration, by part."""
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in {**self.parts, "total": self.total}.items()}


def meta_denoiser(unet_config: dict, dtype: torch.dtype = torch.bfloat16):
    """The full-size UNet on the meta device, frozen, in `dtype`."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.to(dtype).requires_grad_(False)
    return unet


def step_inputs(unet, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype, device="meta"):
    """(noisy, timesteps, conditioning, size_info) for one forward of `unet`."""
    config = unet.config
    h, w = latent_hw
    noisy = torch.zeros(batch, config.in_channels, h, w, device=device, dtype=dtype)
    hidden = torch.zeros(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    pooled = None
    if config.addition_embed_type == "text_time":  # micro-conditioned models take a pooled embedding
        size = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.zeros(batch, size, device=device, dtype=dtype)
    pixels = (h * 8, w * 8)
    size_info = [(*pixels, 0, 0, *pixels)] * batch
    timesteps = torch.full((batch,), 500, dtype=torch.long, device=device)
    return noisy, timesteps, Conditioning(hidden, pooled), size_info


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA while counting: saves what the GPU's flash and memory-efficient kernels
    save (query, key, value, output and the fp32 log-sum-exp per query), where the meta and CPU
    dispatch would take the math path and save the full fp32 attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextmanager
def flash_like_attention():
    """F.scaled_dot_product_attention replaced by _FlashLikeAttention (counting only)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FlashLikeAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def _per_block(model, counter: SavedTensors, out: dict):
    """Saved bytes inside each block that gradient checkpointing reruns as one unit."""
    units = [m for m in model.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    hooks = []
    for m in units:
        def pre(module, args, m=m):
            out[id(m)] = -counter.bytes

        def post(module, args, result, m=m):
            out[id(m)] += counter.bytes

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def activations(family, unet, inputs, checkpointing: bool, recorder=None, set_enabled=None) -> dict[str, int]:
    """Bytes saved for backward by one trained forward (and, with a recorder, APT's reference
    pass before it and both passes' recordings). {"saved", "largest_block", "recorded"}."""
    noisy, timesteps, cond, size_info = inputs
    if recorder is not None:
        recorder.clear()
        set_enabled(False)
        try:
            with torch.no_grad(), recorder.recording("ref"):
                family.predict(unet, noisy, timesteps, cond, size_info)
        finally:
            set_enabled(True)
    noisy = noisy.clone().requires_grad_(False)
    blocks: dict[int, int] = {}
    was = unet.is_gradient_checkpointing
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    try:
        with SavedTensors(exclude=[*unet.parameters(), *unet.buffers()]) as counter, \
                _per_block(unet, counter, blocks):
            if recorder is not None:
                with recorder.recording("tuned"):
                    family.predict(unet, noisy, timesteps, cond, size_info)
            else:
                family.predict(unet, noisy, timesteps, cond, size_info)
    finally:
        (unet.enable_gradient_checkpointing if was else unet.disable_gradient_checkpointing)()
    recorded = 0
    if recorder is not None:
        kept = list(recorder.maps.values()) + [t for pairs in recorder.features.values() for pair in pairs
                                               for t in pair]
        recorded = _tensor_bytes(kept)
        recorder.clear()
    return {"saved": counter.bytes, "largest_block": max(blocks.values(), default=0), "recorded": recorded}


def trained_bytes(params, optimizer: str) -> dict[str, int]:
    n = sum(p.numel() for p in params)
    return {"lora": n * 4, "lora_grads": n * 4, "optimizer": n * OPTIMIZER_BYTES[optimizer]}
