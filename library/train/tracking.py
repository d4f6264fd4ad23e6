"""Metrics: trackers (tensorboard / wandb through accelerate), the loss-by-timestep table, memory."""
from __future__ import annotations

import logging
import resource
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError

log = logging.getLogger(__name__)


def trackers_for(log_with: str) -> list[str]:
    names = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[log_with]
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        try:
            __import__(packages[name])
        except ImportError:
            raise UserError(f'log_with = "{log_with}" needs the {packages[name]} package: '
                            f"pip install {packages[name]}") from None
    return names


class PeakMemory:
    """Peak memory of each optimizer step and the highest of those over the run.

    On a GPU the allocator's peak is reset when a step starts, so model loading, caching, sample
    rounds and validation between steps do not count as training memory (an all-time peak would
    report them for the rest of the run). On a CPU only the process's all-time peak RSS exists."""

    def __init__(self, device: torch.device):
        self.device = device
        self.run_peak = 0.0

    def start_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def scalars(self) -> dict[str, float]:
        """{"peak_memory_gib": this step's peak, "peak_memory_run_gib": the highest step peak so far}."""
        if self.device.type == "cuda":
            step = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        else:
            step = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux
        self.run_peak = max(self.run_peak, step)
        return {"peak_memory_gib": step, "peak_memory_run_gib": self.run_peak}


class RunMemory:
    """What a step's allocated peak leaves out, on a GPU: the allocator's reserved memory (what
    the process holds, fragmentation included), the peaks of the phases between steps (model
    loading and latent caching before the first step, sample rounds, validation and saving
    between steps), and the device memory in use (the CUDA context and every other process
    included). Its `start_step` must run before PeakMemory's, which resets the peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated = 0.0  # the highest peaks of the run so far, between steps included
        self.reserved = 0.0

    def start_step(self) -> None:
        if self.device.type == "cuda":  # the peaks since the last reset: the phase before this step
            self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(self.device) / 2 ** 30)
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device) / 2 ** 30)

    def scalars(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        step_reserved = torch.cuda.max_memory_reserved(self.device) / 2 ** 30
        self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(self.device) / 2 ** 30)
        self.reserved = max(self.reserved, step_reserved)
        free, total = torch.cuda.mem_get_info(self.device)
        return {"peak_reserved_gib": step_reserved, "peak_memory_whole_run_gib": self.allocated,
                "peak_reserved_whole_run_gib": self.reserved, "device_memory_used_gib": (total - free) / 2 ** 30}


class TimestepLossTable:
    """Loss per timestep bin (an EMA per bin): overfitting shows as low/middle bins dropping."""

    def __init__(self, num_timesteps: int = 1000, bins: int = 10, alpha: float = 0.05):
        self.width = num_timesteps / bins
        self.bins = bins
        self.alpha = alpha
        self.values = [None] * bins
        self.counts = [0] * bins

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        for loss, t in zip(losses.tolist(), timesteps.tolist()):
            b = min(int(t // self.width), self.bins - 1)
            old = self.values[b]
            self.values[b] = loss if old is None else (1 - self.alpha) * old + self.alpha * loss
            self.counts[b] += 1

    def scalars(self) -> dict[str, float]:
        return {f"loss_by_timestep/t{int(b * self.width):03d}-{int((b + 1) * self.width) - 1:03d}": v
                for b, v in enumerate(self.values) if v is not None}

    def render(self) -> str:
        rows = ["timesteps  loss     samples"]
        for b, (v, n) in enumerate(zip(self.values, self.counts)):
            lo, hi = int(b * self.width), int((b + 1) * self.width) - 1
            rows.append(f"{lo:4d}-{hi:<4d}  {'-' if v is None else f'{v:.5f}':8s} {n}")
        return "\n".join(rows)


class Tracker:
    def __init__(self, accelerator, names: list[str], project: str, config: dict):
        self.accelerator = accelerator
        self.enabled = bool(names)
        if self.enabled:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
            accelerator.init_trackers(project, config=flat)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            self.accelerator.log(values, step=step)

    def images(self, named: list[tuple[str, "object"]], step: int) -> None:
        if not self.enabled:
            return
        arrays = {f"samples/{Path(name).stem}": np.asarray(img.convert("RGB"))[None] for name, img in named}
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(arrays, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images(arrays, step=step)

    def close(self) -> None:
        if self.enabled:
            self.accelerator.end_training()
