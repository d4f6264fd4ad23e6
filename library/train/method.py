"""Training methods: what a method adds to the shared training step (library.train.denoiser), and
the registry the builder picks one from.

A `TrainingMethod` is built once per run from a small `MethodSetup` (`build`), then `attach`es to
the model (APT installs its recording attention processors) and can `detach` again (restoring
what was there). Per micro-batch, `step()` hands the denoiser a `MethodStep` whose hooks receive
a `StepContext` (library.train.step): the batch, the noisy inputs, the loss function, the base
model's prediction on demand and the tokenizer; they never call back into the denoiser. The
method's state is saved with the training state, its facts go into the LoRA's metadata.

In every hook `step` is the 0-based index of the optimizer step being trained.

Methods register themselves by name (`register_method`; library.train.builder imports the
built-in ones); each says from the config whether the run asked for it (`selected`). Plain LoRA,
the base classes here, is chosen when no other is.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.train.batches import Batch
from library.train.step import StepContext, StepLoss


class MethodStep:
    """One micro-batch of a training method. This base class adds nothing: plain LoRA."""

    def augment(self, latents: torch.Tensor, mask: torch.Tensor | None, timesteps: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean latents (and loss mask) to train on, once the timesteps are drawn."""
        return latents, mask

    def before_prediction(self, ctx: StepContext) -> None:
        """Runs after the noisy input is built and before the trained model predicts."""

    def prediction(self) -> AbstractContextManager:
        """Context of the trained model's forward (APT records attention and features in it)."""
        return nullcontext()

    def sample_weights(self) -> torch.Tensor | None:
        """Per-sample loss multipliers on top of the image and Min-SNR weights (None = 1)."""
        return None

    def extra_loss(self, ctx: StepContext, per_sample: torch.Tensor) -> torch.Tensor | None:
        """Terms added to the mean weighted loss (None = nothing)."""
        return None

    def stats(self) -> dict[str, float]:
        return {}


@dataclass
class MethodSetup:
    """What a training method is built from (library.train.builder fills it in)."""
    cfg: Any                       # the run's Config (read-only): a method reads its own table
    family: Any                    # library.models.family.ModelFamily
    model: torch.nn.Module         # the unwrapped denoiser, network injected, attention kernel chosen
    tokenizers: list
    num_timesteps: int
    encoder: Callable[[torch.Tensor], torch.Tensor]   # pixels -> latents (VaeEncoder; the VAE is on the device)
    gather: Callable[[torch.Tensor], torch.Tensor]    # rows of every process, concatenated
    trains_text: bool


class TrainingMethod:
    """Plain LoRA training."""

    name = "plain"
    # Metadata a LoRA file carries when this method was NOT used (so readers can tell).
    inactive_metadata: dict[str, str] = {}

    @classmethod
    def selected(cls, cfg) -> bool:
        """Whether the config asks for this method."""
        return False

    @classmethod
    def build(cls, setup: MethodSetup) -> "TrainingMethod":
        return cls()

    def attach(self) -> None:
        """Install what the method needs in the model (called once after build)."""

    def detach(self) -> None:
        """Undo `attach`: the model is as it was before."""

    def step(self, batch: Batch, step: int) -> MethodStep:
        return MethodStep()

    def after_backward(self) -> None:
        """Called after each micro-batch's backward pass (also when it failed)."""

    def end_step(self, step: int, losses: list[tuple[StepLoss, Batch]]) -> None:
        """Called once all micro-batches of optimizer step `step` are done."""

    def metrics(self) -> dict[str, float]:
        """Scalars for the trackers at the end of a step."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, extra: dict, source: str) -> None:
        """Restore from a training state's `extra` table (`source` names the state in errors)."""

    def metadata(self) -> dict[str, str]:
        return {}

    def write_reports(self, folder: Path, title: str) -> None:
        """Files the method writes beside the LoRA at every save."""


_METHODS: dict[str, type[TrainingMethod]] = {TrainingMethod.name: TrainingMethod}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: make a training method choosable."""
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    if name != TrainingMethod.name:
        _METHODS.pop(name, None)


def methods() -> dict[str, type[TrainingMethod]]:
    """Every registered method by name (library.train.builder imports the built-in ones)."""
    return dict(_METHODS)


def selected_method(cfg) -> type[TrainingMethod]:
    """The method the config asks for; plain LoRA when none does."""
    chosen = [cls for cls in methods().values() if cls.selected(cfg)]
    return chosen[0] if chosen else TrainingMethod


def build_method(cls: type[TrainingMethod], setup: MethodSetup) -> TrainingMethod:
    method = cls.build(setup)
    method.attach()
    return method


def method_metadata(method: TrainingMethod) -> dict[str, str]:
    """The method's metadata, and what every other registered method writes when it is off."""
    out: dict[str, str] = {}
    for cls in methods().values():
        if cls is not type(method):
            out.update(cls.inactive_metadata)
    out.update(method.metadata())
    return out
