"""Optimizers by kohya's `optimizer_type` names, with `optimizer_args` passed through.

Optional packages are imported only when their optimizer is chosen; a missing one is a one-line
error that names what to install.
"""
from __future__ import annotations

import ast
import importlib
import logging
import math
from typing import Any, Mapping

import torch

from library.errors import UserError

log = logging.getLogger(__name__)

# optimizer_type -> (module, class, pip package, defaults that differ from the library's)
OPTIMIZERS: dict[str, tuple[str, str, str | None, dict]] = {
    "AdamW": ("torch.optim", "AdamW", None, {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}),
    # kohya's paged variants: optimizer state in CUDA unified memory, paged out to the host when the
    # GPU runs short (on a CPU bitsandbytes runs them unpaged).
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW", "bitsandbytes", {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", {}),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes", {}),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch", {}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes", {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes", {}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
    # kohya's recommended Adafactor settings for LoRA: a fixed learning rate, no parameter scaling.
    "Adafactor": ("transformers.optimization", "Adafactor", None,
                  {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "SGD": ("torch.optim", "SGD", None, {}),
}


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True


def parse_optimizer_args(args: Any, option: str = "optimizer_args") -> dict:
    """kohya's ["key=value", ...] strings (values are Python literals) or a TOML table. NaN and
    infinite numbers are refused: an optimizer takes them and silently trains nothing (or NaN)."""
    if isinstance(args, Mapping):
        out = dict(args)
    else:
        out = {}
        for item in args:
            key, eq, raw = str(item).partition("=")
            if not eq or not key.strip():
                raise UserError(f"{option}: {item!r} is not key=value (e.g. \"weight_decay=0.01\")")
            try:
                value = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError):
                value = raw.strip()
            out[key.strip()] = value
    for key, value in out.items():
        if not _finite(value) or (isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf")):
            raise UserError(f"{option}: {key} = {value!r} is not a finite number")
    return out


def import_class(path: str, option: str):
    """A "package.module.Class" named by an option (kohya lets optimizer/scheduler types be any class)."""
    module, _, cls = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), cls, None)
    except ImportError:
        raise UserError(f'{option} = "{path}": cannot import {module}; install the package that provides it') from None
    if found is None:
        raise UserError(f'{option} = "{path}": {module} has no {cls}')
    return found


def _import(name: str):
    if name not in OPTIMIZERS:  # a class path (the config checked its spelling)
        return import_class(name, "optimizer_type"), {}
    module, cls, package, defaults = OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), cls), defaults
    except ImportError:
        raise UserError(f'optimizer_type = "{name}" needs the {package} package: pip install {package}') from None


def build_optimizer(optimizer_type: str, optimizer_args: Any, groups: list[dict], learning_rate: float):
    cls, defaults = _import(optimizer_type)
    kwargs = {**defaults, **parse_optimizer_args(optimizer_args)}
    if optimizer_type == "Prodigy" and learning_rate < 0.1:
        log.warning("Prodigy adapts its step size and expects learning_rate around 1.0 (got %g)", learning_rate)
    if optimizer_type == "Adafactor" and kwargs.get("relative_step"):
        # Adafactor then computes its own step size and refuses an explicit one.
        for group in groups:
            group.pop("lr", None)
        learning_rate = None
    try:
        return cls(groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"optimizer_args: not accepted by {optimizer_type} ({exc})") from None


def optimizer_description(optimizer: torch.optim.Optimizer, args: Any) -> str:
    """kohya's ss_optimizer string: module.Class(key=value,...)."""
    cls = type(optimizer)
    parsed = parse_optimizer_args(args)
    inner = ",".join(f"{k}={v}" for k, v in parsed.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({inner})" if inner else "")
