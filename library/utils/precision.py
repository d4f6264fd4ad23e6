"""Autocast questions asked by the layers that compute in a dtype of their own (fused adapters,
float8 base weights), answered alike on every device, the meta device included (it has no
autocast: library.train.memory_estimate counts on it)."""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, or None where it is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        pass
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a layer given `x` computes in: autocast's dtype where it is on, else x's own."""
    return autocast_dtype(x.device.type) or x.dtype


def autocast_off(device_type: str):
    """Autocast switched off for a block (a no-op where it is off already, or does not exist)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
