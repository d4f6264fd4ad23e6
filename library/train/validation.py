"""Validation loss on the held-out images (validation_split): the same images, timesteps and noise
every time, so the curve shows overtraining instead of sampling noise."""
from __future__ import annotations

import torch

from library.train.batches import BatchBuilder
from library.train.denoiser import Denoiser
from library.train.diffusion import step_generator


class Validator:
    def __init__(self, indices: list[int], timesteps: tuple[int, ...], seed: int, batch_size: int = 4):
        self.indices = indices
        self.timesteps = timesteps
        self.seed = seed
        self.batch_size = batch_size

    def __bool__(self) -> bool:
        return bool(self.indices)

    @torch.no_grad()
    def run(self, batches: BatchBuilder, denoiser: Denoiser) -> dict[str, float]:
        """{"val/loss": mean over images and timesteps, "val/loss_t100": ..., ...}: the training
        step's own loss path on the unwrapped model (validation runs on the main process only)."""
        sums = {t: 0.0 for t in self.timesteps}
        for k in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[k:k + self.batch_size]
            batch = batches.build_fixed(chunk)
            for t in self.timesteps:
                gen = step_generator(self.seed, 10_000_000 + t, k)
                timesteps = torch.full((len(chunk),), t, dtype=torch.long)
                result = denoiser.loss(batch, gen, timesteps=timesteps, local=True, weighted=False)
                sums[t] += result.per_sample.sum().item()
        n = len(self.indices)
        out = {f"val/loss_t{t:03d}": s / n for t, s in sums.items()}
        out["val/loss"] = sum(out.values()) / len(self.timesteps)
        return out
