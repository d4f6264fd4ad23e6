"""The one training forward path, shared by plain LoRA and APT.

`Denoiser.loss` turns a batch into the loss that is back-propagated: timesteps, then whatever the
training method does to the clean latents (APT: augmentation), noise and input perturbation, the
objective's noisy input and target, conditioning, the method's pass before the prediction (APT:
the base model's), the prediction through the model family, the per-sample loss, the image and
Min-SNR weights, the method's per-sample weights and extra terms. A loss option is therefore
added in one place (library.train.loss), a model family plugs in through library.models.family,
and a method through the narrow hooks of `MethodStep`, which get a `StepContext` instead of this
object.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from library.models.conditioning import CaptionEncoder, Conditioning
from library.train.batches import Batch
from library.train.diffusion import NoiseSampler, TimestepSampler
from library.train.loss import Loss
from library.train.method import MethodStep
from library.train.step import NoisyInputs, StepContext, StepLoss


class ConditioningSource:
    """Text conditioning of a batch, from the text cache or the text encoders.

    `trained` encodes through the (possibly DDP-wrapped) encoders that are trained; `local` encodes
    through the unwrapped ones without gradients: for validation, sampling and APT's reference
    pass, which run on one process or must not take part in DDP's collectives."""

    def __init__(self, trained: CaptionEncoder, local: CaptionEncoder, trains_text: bool, device: torch.device,
                 cache=None):
        self.trained = trained
        self.local = local
        self.trains_text = trains_text
        self.device = device
        self.cache = cache

    def __call__(self, batch: Batch, local: bool = False) -> Conditioning:
        """Gradients reach the text encoders only when they are trained, gradients are on and
        `local` is not asked for."""
        if self.cache is not None:
            return self.cache.get(batch.captions).to(self.device)
        if local:
            with torch.no_grad():
                return self.local.encode(batch.captions)
        with torch.set_grad_enabled(self.trains_text and torch.is_grad_enabled()):
            return self.trained.encode(batch.captions)

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        return self.local.tokenize(captions)


class Denoiser:
    def __init__(self, family, model, local_model, conditioning: ConditioningSource, objective,
                 noise: NoiseSampler, timesteps: TimestepSampler, loss: Loss, device: torch.device,
                 set_enabled: Callable[[bool], None],
                 multiplied: Callable[[float], AbstractContextManager] | None = None):
        self.family = family
        self.model = model                # the trained forward (DDP-wrapped on several processes)
        self.local_model = local_model    # the same module unwrapped: no-grad passes on one process
        self.conditioning = conditioning
        self.objective = objective
        self.noise = noise
        self.timesteps = timesteps
        self.loss_fn = loss
        self.device = device
        self.set_enabled = set_enabled  # the network's switch: the base model is the model with it off
        self.multiplied = multiplied or (lambda m: nullcontext())  # the dataset's network_multiplier

    def noisy_inputs(self, batch: Batch, gen: torch.Generator, timesteps: torch.Tensor | None = None,
                     method: MethodStep | None = None, local: bool = False) -> NoisyInputs:
        """Timesteps first (the method may depend on them), then the method's change to the clean
        latents, then noise: the order APT needs, and the same draws for plain training."""
        latents = batch.latents.to(self.device)
        mask = self.loss_fn.loss_mask(batch.mask.to(self.device) if batch.mask is not None else None, gen)
        if timesteps is None:
            timesteps = self.timesteps.sample(latents.shape[0], gen)
        if method is not None:
            # The method draws from its own generator, so that the noise (drawn next) is the same with
            # and without it: a sample the method leaves alone is trained exactly as in plain training.
            method_gen = torch.Generator().manual_seed(gen.initial_seed() ^ 0x5DEECE66D)
            latents, mask = method.augment(latents, mask, timesteps, method_gen)
        noise = self.noise.sample(latents, gen)
        input_noise = self.noise.perturb(noise, gen)
        noisy = self.objective.add_noise(latents, input_noise, timesteps)
        cond = self.conditioning(batch, local=local)
        target = self.objective.target(latents, noise, timesteps)
        return NoisyInputs(latents, mask, timesteps, noisy, target, cond, batch.size_info, noise, input_noise)

    def predict(self, inputs: NoisyInputs, model=None, cond: Conditioning | None = None) -> torch.Tensor:
        return self.family.predict(model or self.model, inputs.noisy, inputs.timesteps.to(self.device),
                                   inputs.cond if cond is None else cond, inputs.size_info)

    @torch.no_grad()
    def reference(self, batch: Batch, inputs: NoisyInputs) -> torch.Tensor:
        """The base model's prediction on the same input: every adapter off (denoiser and text
        encoders), on this process's unwrapped modules; with the text encoders trained, the
        conditioning is the base encoders' too."""
        self.set_enabled(False)
        try:
            cond = self.conditioning(batch, local=True) if self.conditioning.trains_text else inputs.cond
            return self.predict(inputs, self.local_model, cond)
        finally:
            self.set_enabled(True)

    @torch.no_grad()
    def loss_on(self, inputs: NoisyInputs, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The trained model's per-sample loss on other clean latents with the same timesteps, noise
        and conditioning (this process's unwrapped model, no gradients)."""
        timesteps = inputs.timesteps
        noisy = self.objective.add_noise(latents, inputs.input_noise, timesteps)
        target = self.objective.target(latents, inputs.noise, timesteps)
        pred = self.family.predict(self.local_model, noisy, timesteps.to(self.device), inputs.cond,
                                   inputs.size_info)
        return self.loss_fn.per_sample(pred, target, timesteps, mask)

    def context(self, batch: Batch, inputs: NoisyInputs) -> StepContext:
        return StepContext(batch, inputs, lambda pred: self.loss_fn.per_sample(pred, inputs.target, inputs.timesteps,
                                                                          inputs.mask),
                           lambda: self.reference(batch, inputs), self.conditioning.tokenize,
                           lambda latents, mask: self.loss_on(inputs, latents, mask))

    def loss(self, batch: Batch, gen: torch.Generator, method: MethodStep | None = None,
             timesteps: torch.Tensor | None = None, local: bool = False, weighted: bool = True) -> StepLoss:
        """The micro-batch's loss. `local` runs the unwrapped modules without text gradients
        (validation, benchmarks); `weighted = False` gives the plain mean per-sample loss. The
        adapters train at the batch's dataset network_multiplier (the reference pass turns them off)."""
        with self.multiplied(batch.multiplier):
            return self._loss(batch, gen, method, timesteps, local, weighted)

    def _loss(self, batch: Batch, gen: torch.Generator, method: MethodStep | None, timesteps: torch.Tensor | None,
              local: bool, weighted: bool) -> StepLoss:
        method = method or MethodStep()
        inputs = self.noisy_inputs(batch, gen, timesteps, method, local)
        ctx = self.context(batch, inputs)
        method.before_prediction(ctx)
        with method.prediction():
            pred = self.predict(inputs, self.local_model if local else None)
        raw = ctx.per_sample_loss(pred)
        per_sample = raw
        if weighted:
            per_sample = raw * self.loss_fn.weights(batch.weights.to(self.device), inputs.timesteps)
            extra_weights = method.sample_weights()
            if extra_weights is not None:
                per_sample = per_sample * extra_weights.to(self.device)
        loss = per_sample.mean()
        extra = method.extra_loss(ctx, raw)
        if extra is not None:
            loss = loss + extra.to(self.device)
        return StepLoss(loss, raw.detach(), inputs.timesteps, method.stats())
