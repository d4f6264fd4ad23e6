"""Forward diffusion for training: timesteps, noise (with kohya's noise options), noised latents,
targets, and per-sample losses with Min-SNR weighting.

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


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def pyramid_noise(shape, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: upsampled coarser noise added with geometrically falling weights."""
    b, c, h, w = shape
    noise = _randn(shape, gen)
    for i in range(1, iterations + 1):
        r = torch.rand((), generator=gen).item() * 2 + 2  # a random factor in [2, 4) per level, as kohya
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        noise += F.interpolate(_randn((b, c, hn, wn), gen), size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


class Diffusion:
    def __init__(self, scheduler_config: dict, v_prediction: bool, zero_terminal_snr: bool = False,
                 noise_offset: float = 0.0, multires_iterations: int = 0, multires_discount: float = 0.3,
                 ip_noise_gamma: float | None = None, min_snr_gamma: float | None = None,
                 min_timestep: int = 0, max_timestep: int | None = None):
        self.scheduler = DDPMScheduler(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
            beta_start=scheduler_config.get("beta_start", 0.00085),
            beta_end=scheduler_config.get("beta_end", 0.012),
            beta_schedule=scheduler_config.get("beta_schedule", "scaled_linear"),
            prediction_type="v_prediction" if v_prediction else "epsilon",
            rescale_betas_zero_snr=zero_terminal_snr,
            clip_sample=False,
        )
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.v_prediction = v_prediction
        self.noise_offset = noise_offset
        self.multires = (multires_iterations, multires_discount)
        self.ip_noise_gamma = ip_noise_gamma
        self.min_snr_gamma = min_snr_gamma
        self.t_range = (min_timestep, min(max_timestep or self.num_timesteps, self.num_timesteps))
        alphas = self.scheduler.alphas_cumprod.double()
        # With zero terminal SNR the last value is 0: clamp so weights stay finite.
        self.snr = (alphas / (1 - alphas).clamp_min(1e-12)).float()

    def sample_timesteps(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(self.t_range[0], self.t_range[1], (batch,), generator=gen)

    def sample_noise(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        shape = tuple(latents.shape)
        if self.multires[0] > 0:
            noise = pyramid_noise(shape, gen, *self.multires)
        else:
            noise = _randn(shape, gen)
        if self.noise_offset:
            noise = noise + self.noise_offset * _randn((shape[0], shape[1], 1, 1), gen)
        return noise.to(latents.device, latents.dtype)

    def input_noise(self, noise: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The noise mixed into the input: with ip_noise_gamma, perturbed (the target keeps `noise`)."""
        if not self.ip_noise_gamma:
            return noise
        return noise + self.ip_noise_gamma * _randn(tuple(noise.shape), gen).to(noise.device, noise.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.v_prediction:
            return self.scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
        return noise

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights per sample (None when off)."""
        if self.min_snr_gamma is None:
            return None
        snr = self.snr[timesteps.cpu()]
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        weights = clipped / (snr + 1) if self.v_prediction else clipped / snr.clamp_min(1e-8)
        return weights


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (B,), in fp32; `mask` (B x 1 x h x w) weights latent positions."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        err = err * mask
        return err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
    return err.flatten(1).mean(1)
