"""The one training forward path, shared by plain LoRA and APT.

`Denoiser.loss` turns a batch into the loss that is back-propagated: timesteps, then whatever the
training method does to the clean latents (APT: augmentation), noise and input perturbation,
conditioning, an optional pass of the method before the prediction (APT: the frozen model's),
the prediction, the target, the per-sample loss, the image and Min-SNR weights, the method's
per-sample weights and extra terms. A loss option is therefore added in one place, and a method
plugs in through the narrow hooks of `MethodStep` instead of copying the forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from library.models.conditioning import Conditioning, TextConditioner, sdxl_time_ids
from library.train.batches import Batch
from library.train.diffusion import Diffusion, per_sample_mse
from library.train.method import MethodStep


@dataclass
class NoisyInputs:
    """What the model is asked to denoise at one micro-batch, and what it should predict."""
    latents: torch.Tensor        # clean latents as trained on (after the method's changes)
    mask: torch.Tensor | None    # loss mask at latent resolution
    timesteps: torch.Tensor      # (B,) int64, on the CPU
    noisy: torch.Tensor
    target: torch.Tensor
    cond: Conditioning
    unet_kwargs: dict


@dataclass
class StepLoss:
    loss: torch.Tensor           # scalar: what is back-propagated
    per_sample: torch.Tensor     # (B,) unweighted MSE, detached: for the loss-by-timestep table
    timesteps: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


class Conditions:
    """Text conditioning of a batch, from the text cache or the text encoders.

    `train` encodes through the (possibly DDP-wrapped) encoders that are trained; `frozen` encodes
    through the unwrapped ones without gradients: for validation, sampling and APT's reference
    pass, which run on one process or must not take part in DDP's collectives."""

    def __init__(self, train: TextConditioner, frozen: TextConditioner, trains_text: bool, is_sdxl: bool,
                 device: torch.device, cache=None):
        self.train_encoder = train
        self.frozen_encoder = frozen
        self.trains_text = trains_text
        self.is_sdxl = is_sdxl
        self.device = device
        self.cache = cache

    def __call__(self, batch: Batch, frozen: bool = False) -> tuple[Conditioning, dict]:
        """(conditioning, extra UNet inputs); gradients reach the text encoders only when they are
        trained, gradients are on and `frozen` is not asked for."""
        if self.cache is not None:
            cond = self.cache.get(batch.captions).to(self.device)
        elif frozen:
            with torch.no_grad():
                cond = self.frozen_encoder.encode(batch.captions)
        else:
            with torch.set_grad_enabled(self.trains_text and torch.is_grad_enabled()):
                cond = self.train_encoder.encode(batch.captions)
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(batch.time_ids, self.device, cond.hidden_states.dtype),
            }
        return cond, kwargs

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        return self.frozen_encoder.tokenize(captions)


class Denoiser:
    def __init__(self, diffusion: Diffusion, unet, frozen_unet, conditions: Conditions, device: torch.device):
        self.diffusion = diffusion
        self.unet = unet                  # the trained forward (DDP-wrapped on several processes)
        self.frozen_unet = frozen_unet    # the same module unwrapped: no-grad passes on one process
        self.conditions = conditions
        self.device = device

    def noisy_inputs(self, batch: Batch, gen: torch.Generator, timesteps: torch.Tensor | None = None,
                     method: MethodStep | None = None, frozen_text: bool = False) -> NoisyInputs:
        """Timesteps first (the method may depend on them), then the method's change to the clean
        latents, then noise: the order APT needs, and the same draws for plain training."""
        latents = batch.latents.to(self.device)
        mask = batch.mask.to(self.device) if batch.mask is not None else None
        if timesteps is None:
            timesteps = self.diffusion.sample_timesteps(latents.shape[0], gen)
        if method is not None:
            # The method draws from its own generator, so that the noise (drawn next) is the same with
            # and without it: a sample the method leaves alone is trained exactly as in plain training.
            method_gen = torch.Generator().manual_seed(gen.initial_seed() ^ 0x5DEECE66D)
            latents, mask = method.augment(latents, mask, timesteps, method_gen)
        noise = self.diffusion.sample_noise(latents, gen)
        noisy = self.diffusion.add_noise(latents, self.diffusion.input_noise(noise, gen), timesteps)
        cond, kwargs = self.conditions(batch, frozen=frozen_text)
        target = self.diffusion.target(latents, noise, timesteps)
        return NoisyInputs(latents, mask, timesteps, noisy, target, cond, kwargs)

    def predict(self, inputs: NoisyInputs, unet=None, cond: Conditioning | None = None) -> torch.Tensor:
        cond = inputs.cond if cond is None else cond
        kwargs = inputs.unet_kwargs
        if cond is not inputs.cond and "added_cond_kwargs" in kwargs:
            kwargs = {**kwargs, "added_cond_kwargs": {**kwargs["added_cond_kwargs"], "text_embeds": cond.pooled}}
        return (unet or self.unet)(inputs.noisy, inputs.timesteps.to(self.device), cond.hidden_states,
                                   **kwargs).sample

    def image_weights(self, batch: Batch, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the loss the user chose: loss_weight / prior_loss_weight, Min-SNR."""
        weights = batch.weights.to(self.device)
        snr = self.diffusion.loss_weights(timesteps)
        return weights if snr is None else weights * snr.to(self.device)

    def loss(self, batch: Batch, gen: torch.Generator, method: MethodStep | None = None,
             timesteps: torch.Tensor | None = None, unet=None, weighted: bool = True,
             frozen_text: bool = False) -> StepLoss:
        """The micro-batch's loss. `unet` and `frozen_text` choose the unwrapped modules for passes
        outside training (validation, benchmarks); `weighted = False` gives the plain mean MSE."""
        method = method or MethodStep()
        inputs = self.noisy_inputs(batch, gen, timesteps, method, frozen_text)
        method.before_prediction(inputs)
        with method.prediction():
            pred = self.predict(inputs, unet)
        raw = per_sample_mse(pred, inputs.target, inputs.mask)
        per_sample = raw
        if weighted:
            per_sample = raw * self.image_weights(batch, inputs.timesteps)
            extra_weights = method.sample_weights()
            if extra_weights is not None:
                per_sample = per_sample * extra_weights.to(self.device)
        loss = per_sample.mean()
        extra = method.extra_loss(raw)
        if extra is not None:
            loss = loss + extra.to(self.device)
        return StepLoss(loss, raw.detach(), inputs.timesteps, method.stats())
