"""The random draws of a training step: timesteps and noise (with kohya's noise options).

Random draws come from a generator seeded per (seed, step, micro-batch, process), so a resumed
run draws exactly the noise the uninterrupted run would have drawn, with no RNG state to carry.
How noise and clean latents combine into the model's input and target is the model family's
diffusion objective (library.models.objectives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _num(value) -> str:
    return "None" if value is None else repr(value)


class NoiseSampler:
    """The noise of a step: Gaussian, or pyramid noise, plus noise offset; and the input
    perturbation (ip_noise_gamma), which noises the input more than the target says."""

    def __init__(self, offset: float = 0.0, multires_iterations: int = 0, multires_discount: float = 0.3,
                 ip_noise_gamma: float | None = None):
        self.offset = offset
        self.multires = (multires_iterations, multires_discount)
        self.ip_noise_gamma = ip_noise_gamma

    @classmethod
    def from_options(cls, training) -> "NoiseSampler":
        """From the [training] options (library.config.options.TrainingOptions)."""
        return cls(training.noise_offset, training.multires_noise_iterations, training.multires_noise_discount,
                   training.ip_noise_gamma)

    def sample(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        shape = tuple(latents.shape)
        noise = pyramid_noise(shape, gen, *self.multires) if self.multires[0] > 0 else _randn(shape, gen)
        if self.offset:
            noise = noise + self.offset * _randn((shape[0], shape[1], 1, 1), gen)
        return noise.to(latents.device, latents.dtype)

    def perturb(self, noise: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The noise mixed into the input: with ip_noise_gamma, perturbed (the target keeps `noise`)."""
        if not self.ip_noise_gamma:
            return noise
        return noise + self.ip_noise_gamma * _randn(tuple(noise.shape), gen).to(noise.device, noise.dtype)

    def metadata(self) -> dict[str, str]:
        return {"ss_noise_offset": _num(self.offset), "ss_multires_noise_iterations": str(self.multires[0]),
                "ss_multires_noise_discount": _num(self.multires[1]), "ss_ip_noise_gamma": _num(self.ip_noise_gamma)}


SAMPLINGS = ("uniform", "logit_normal", "sigmoid", "shift")


class TimestepSampler:
    """Training timesteps in [min_timestep, max_timestep): uniform, or a continuous u in (0, 1)
    (logit-normal, sigmoid of a scaled normal, the same shifted towards noise) mapped onto the
    range as t = min + floor(u * (max - min)). Every sampling draws from the step's generator
    only, so a resumed run draws the same timesteps."""

    def __init__(self, num_timesteps: int, min_timestep: int = 0, max_timestep: int | None = None,
                 sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 sigmoid_scale: float = 1.0, shift: float = 3.0):
        if sampling not in SAMPLINGS:
            raise ValueError(f"timestep_sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}")
        self.num_timesteps = num_timesteps
        self.range = (min_timestep, min(max_timestep or num_timesteps, num_timesteps))
        self.sampling = sampling
        self.logit = (logit_mean, logit_std)
        self.sigmoid_scale = sigmoid_scale
        self.shift = shift

    @classmethod
    def from_options(cls, training, num_timesteps: int) -> "TimestepSampler":
        t = training
        return cls(num_timesteps, t.min_timestep, t.max_timestep, t.timestep_sampling, t.logit_mean, t.logit_std,
                   t.sigmoid_scale, t.timestep_shift)

    def unit(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """u in (0, 1) per sample (float64) for the continuous samplings."""
        z = torch.randn(batch, generator=gen, dtype=torch.float64)
        if self.sampling == "logit_normal":
            return torch.sigmoid(self.logit[0] + self.logit[1] * z)
        u = torch.sigmoid(self.sigmoid_scale * z)
        if self.sampling == "shift":
            u = u * self.shift / (1 + (self.shift - 1) * u)
        return u

    def sample(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        lo, hi = self.range
        if self.sampling == "uniform":
            return torch.randint(lo, hi, (batch,), generator=gen)
        t = lo + torch.floor(self.unit(batch, gen) * (hi - lo)).long()
        return t.clamp(lo, hi - 1)

    def metadata(self) -> dict[str, str]:
        out = {"ss_min_timestep": str(self.range[0]), "ss_max_timestep": str(self.range[1]),
               "ss_timestep_sampling": self.sampling}
        if self.sampling == "logit_normal":
            out.update({"ss_logit_mean": repr(self.logit[0]), "ss_logit_std": repr(self.logit[1])})
        if self.sampling in ("sigmoid", "shift"):
            out["ss_sigmoid_scale"] = repr(self.sigmoid_scale)
        if self.sampling == "shift":
            out["ss_timestep_shift"] = repr(self.shift)
        return out
