"""Training methods: what a method adds to the shared training step (library.train.denoiser).

A `TrainingMethod` lives for the run (its state is saved with the training state, its facts go
into the LoRA's metadata); `step()` hands the denoiser a `MethodStep` for one micro-batch. The
base classes are plain LoRA, which adds nothing; APT (library.train.apt_method) overrides them.
The loop and the outputs talk to a method only through these two interfaces.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from library.train.batches import Batch
    from library.train.denoiser import NoisyInputs, StepLoss


class MethodStep:
    """One micro-batch of a training method. This base class adds nothing: plain LoRA."""

    def augment(self, latents: torch.Tensor, mask: torch.Tensor | None, timesteps: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean latents (and loss mask) to train on, once the timesteps are drawn."""
        return latents, mask

    def before_prediction(self, inputs: "NoisyInputs") -> None:
        """Runs after the noisy input is built and before the trained model predicts."""

    def prediction(self) -> AbstractContextManager:
        """Context of the trained model's forward (APT records attention and features in it)."""
        return nullcontext()

    def sample_weights(self) -> torch.Tensor | None:
        """Per-sample loss multipliers on top of the image and Min-SNR weights (None = 1)."""
        return None

    def extra_loss(self, per_sample: torch.Tensor) -> torch.Tensor | None:
        """Terms added to the mean weighted loss (None = nothing)."""
        return None

    def stats(self) -> dict[str, float]:
        return {}


class TrainingMethod:
    """Plain LoRA training."""

    def step(self, batch: "Batch", step: int) -> MethodStep:
        return MethodStep()

    def after_backward(self) -> None:
        """Called after each micro-batch's backward pass (also when it failed)."""

    def end_step(self, step: int, losses: list[tuple["StepLoss", "Batch"]]) -> None:
        """Called once all micro-batches of optimizer step `step` (from 1) are done."""

    def metrics(self) -> dict[str, float]:
        """Scalars for the trackers at the end of a step."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, extra: dict, source: str) -> None:
        """Restore from a training state's `extra` table (`source` names the state in errors)."""

    def metadata(self) -> dict[str, str]:
        return {"apt_enabled": "False"}

    def write_reports(self, folder: Path, title: str) -> None:
        """Files the method writes beside the LoRA at every save."""
