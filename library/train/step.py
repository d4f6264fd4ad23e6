"""The data of one training step, shared by the denoiser and the training methods.

These types are what the two sides of the step hand each other; they live apart from both so
that neither imports the other (library.train.denoiser calls methods, methods never call back
into the denoiser: they get a StepContext).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from library.models.conditioning import Conditioning
from library.train.batches import Batch


@dataclass
class NoisyInputs:
    """What the model is asked to denoise at one micro-batch, and what it should predict."""
    latents: torch.Tensor        # clean latents as trained on (after the method's changes)
    mask: torch.Tensor | None    # loss mask at latent resolution
    timesteps: torch.Tensor      # (B,) int64, on the CPU
    noisy: torch.Tensor
    target: torch.Tensor
    cond: Conditioning
    size_info: list[tuple[int, ...]]  # per sample: original (h, w), crop (top, left), target (h, w)
    noise: torch.Tensor | None = None        # the noise the target is made of
    input_noise: torch.Tensor | None = None  # the noise mixed into the input (perturbed with ip_noise_gamma)


@dataclass
class StepLoss:
    loss: torch.Tensor           # scalar: what is back-propagated
    per_sample: torch.Tensor     # (B,) unweighted loss, detached: for the loss-by-timestep table
    timesteps: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a training method's hooks may use at one micro-batch, instead of the denoiser itself."""
    batch: Batch
    inputs: NoisyInputs
    per_sample_loss: Callable[[torch.Tensor], torch.Tensor]  # prediction -> (B,) loss, as training computes it
    reference: Callable[[], torch.Tensor]     # the base model's prediction (adapters off, base text), no grad
    tokenize: Callable[[list[str]], list[torch.Tensor]]      # captions -> token ids per tokenizer
    # The trained model's (B,) loss on other clean latents (and loss mask) at the same timesteps, noise
    # and conditioning, without gradients: APT's held-out views.
    loss_on: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
