"""Forward diffusion for training: timesteps, noised latents, targets and per-sample losses.

Random draws come from a generator seeded per (seed, step, micro-batch, process), so a resumed
run draws exactly the noise the uninterrupted run would have drawn, with no RNG state to carry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def step_generator(seed: int, step: int, micro: int, process: int = 0) -> torch.Generator:
    # Large odd multipliers keep the (step, micro, process) combinations from colliding.
    mixed = (seed * 1_000_003 + step * 7_919 + micro * 104_729 + process * 15_485_863) % (2 ** 63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


class Diffusion:
    def __init__(self, scheduler_config: dict, v_prediction: bool):
        self.scheduler = DDPMScheduler(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
            beta_start=scheduler_config.get("beta_start", 0.00085),
            beta_end=scheduler_config.get("beta_end", 0.012),
            beta_schedule=scheduler_config.get("beta_schedule", "scaled_linear"),
            prediction_type="v_prediction" if v_prediction else "epsilon",
            clip_sample=False,
        )
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.v_prediction = v_prediction

    def sample_timesteps(self, batch: int, gen: torch.Generator, low: int = 0, high: int | None = None) -> torch.Tensor:
        return torch.randint(low, high or self.num_timesteps, (batch,), generator=gen)

    def noise_like(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents.device, latents.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.v_prediction:
            return self.scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
        return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (B,), in fp32; `mask` (B x 1 x h x w) weights latent positions."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        err = err * mask
        return err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
    return err.flatten(1).mean(1)
