"""Diffusion objectives: how clean latents and noise become the model's input and its target.

A model family trains with one objective (library.models.family.ModelFamily.objective). The
training step asks it for the noised input, the target and the signal-to-noise ratio of each
timestep (for Min-SNR weighting); the noise itself, the timesteps and the loss are drawn and
computed elsewhere (library.train), the same for every objective.

- DDPMObjective: Stable Diffusion's discrete DDPM schedule, predicting the noise (epsilon) or v.
- FlowMatchingObjective: rectified flow (SD3/Flux style): x_t = (1 - s) x0 + s eps with s = t / T,
  predicting the velocity eps - x0.
"""
from __future__ import annotations

import torch


class Objective:
    name = "?"
    prediction_type = "?"        # what the model predicts: "epsilon", "v_prediction" or "flow"
    num_timesteps = 1000

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of each timestep (float32, on the CPU)."""
        raise NotImplementedError

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023) for this objective's target."""
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr.clamp_min(1e-8)
        return clipped / (snr + 1)  # v and flow targets carry the signal too

    def metadata(self) -> dict[str, str]:
        return {"ss_objective": self.name}


class DDPMObjective(Objective):
    def __init__(self, scheduler_config: dict, v_prediction: bool, zero_terminal_snr: bool = False):
        from diffusers import DDPMScheduler

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
        self.prediction_type = "v_prediction" if v_prediction else "epsilon"
        self.name = f"ddpm-{'v' if v_prediction else 'epsilon'}"
        alphas = self.scheduler.alphas_cumprod.double()
        # With zero terminal SNR the last value is 0: clamp so weights stay finite.
        self._snr = (alphas / (1 - alphas).clamp_min(1e-12)).float()

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
        return noise

    def snr(self, timesteps):
        return self._snr[timesteps.cpu()]


class FlowMatchingObjective(Objective):
    """Rectified flow with sigma = t / T; `shift` > 1 moves sigma towards noise (SD3's shift)."""

    name = "flow-matching"
    prediction_type = "flow"

    def __init__(self, num_timesteps: int = 1000, shift: float = 1.0):
        self.num_timesteps = num_timesteps
        self.shift = shift

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        s = (timesteps.double().cpu() + 1) / self.num_timesteps  # t = T - 1 is pure noise
        return (self.shift * s / (1 + (self.shift - 1) * s)).float()

    def _sigma_like(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sigmas(timesteps).to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    def add_noise(self, latents, noise, timesteps):
        s = self._sigma_like(latents, timesteps)
        return (1 - s) * latents + s * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def snr(self, timesteps):
        s = self.sigmas(timesteps).clamp(1e-6, 1 - 1e-6)
        return ((1 - s) / s) ** 2

    def metadata(self) -> dict[str, str]:
        return {"ss_objective": self.name, "ss_flow_shift": repr(self.shift)}
