"""Learning-rate schedules (diffusers' implementations), stepped once per optimizer step.

The scheduler is deliberately not handed to accelerate: accelerate steps a prepared scheduler once
per process, which would advance it N times per step in an N-GPU run.
"""
from __future__ import annotations

import math

import torch

from library.errors import UserError


def warmup_steps(value: int | float, total: int) -> int:
    """lr_warmup_steps: an integer is a step count, a value below 1 a fraction of the training."""
    if isinstance(value, float) and value < 1:
        return int(math.ceil(value * total))
    return int(value)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup: int | float,
                    num_cycles: int = 1, power: float = 1.0, scheduler_type: str | None = None,
                    scheduler_args=()):
    from diffusers.optimization import get_scheduler

    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
    if scheduler_type:
        from library.train.optimizers import import_class, parse_optimizer_args

        cls = import_class(scheduler_type, "lr_scheduler_type")
        kwargs = parse_optimizer_args(scheduler_args, "lr_scheduler_args")
        try:
            return cls(optimizer, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"lr_scheduler_args: not accepted by {scheduler_type} ({exc})") from None
    if any(group.get("lr") is None for group in optimizer.param_groups):
        # Adafactor with relative_step computes its own step size; its schedule reports it.
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    steps = warmup_steps(warmup, total_steps)
    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant" and steps:
        name = "constant_with_warmup"  # kohya applies a warm-up to "constant" as well
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=steps, num_training_steps=total_steps, **kwargs)
