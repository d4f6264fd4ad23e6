"""Assembling a training batch: latents (encoded now or taken from the cache), captions, each
sample's size and crop (SDXL conditions on them), loss weights and loss masks."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from library.data.dataset import BatchRef, Sample, TrainingData


@dataclass
class Batch:
    latents: torch.Tensor             # B x 4 x h x w, scaled by the VAE scaling factor
    captions: list[str]
    size_info: list[tuple[int, ...]]  # per sample: original (h, w), crop (top, left), target (h, w)
    weights: torch.Tensor             # B, prior_loss_weight for regularisation images
    is_reg: torch.Tensor              # B bool: regularisation (prior) images
    mask: torch.Tensor | None         # B x 1 x h x w at latent resolution, from alpha masks
    records: list[int]
    pixels: torch.Tensor | None = None  # B x 3 x H x W in [-1, 1] when latents were encoded live
    multiplier: float = 1.0           # the dataset's network_multiplier (a batch is of one dataset)


class VaeEncoder:
    """Pixels in [-1, 1] -> scaled latents (the posterior mean: deterministic, so cache == live)."""

    def __init__(self, vae, device: torch.device):
        self.vae = vae
        self.device = device
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """In the VAE's own dtype with autocast off, wherever it is called from (the latent cache,
        live batches, APT's pixel-space augmentation inside the training step's autocast): under
        fp16 autocast the SDXL VAE overflows to NaN, and cache and live latents must agree."""
        pixels = pixels.to(self.device, next(self.vae.parameters()).dtype)
        with torch.autocast(self.device.type, enabled=False):
            latents = self.vae.encode(pixels).latent_dist.mode()
        return ((latents.float() - self.shift) * self.scaling)

    def identity(self) -> str:
        """SHA-256 of the VAE's weights: cache keys change whenever the VAE does."""
        h = hashlib.sha256()
        for name, p in sorted(self.vae.state_dict().items()):
            h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


class BatchBuilder:
    def __init__(self, data: TrainingData, encoder: VaeEncoder, prior_loss_weight: float, latent_cache=None):
        self.data = data
        self.encoder = encoder
        self.prior_loss_weight = prior_loss_weight
        self.cache = latent_cache

    def build(self, ref: BatchRef, epoch: int, position: int) -> Batch:
        return self.assemble(load_samples(self.data, ref, epoch, position, self.cache is None))

    def build_fixed(self, indices: list[int]) -> Batch:
        return self.assemble([self.data.fixed_sample(i, with_pixels=self.cache is None) for i in indices])

    def assemble(self, samples: list[Sample]) -> Batch:
        masks = None
        pixels = None
        if self.cache is None:
            pixels = torch.stack([s.pixels for s in samples])
            latents = self.encoder(pixels)
            if any(s.mask is not None for s in samples):
                masks = _stack_masks([s.mask for s in samples], pixels.shape[-2:])
        else:
            got = [self.cache.get(s.record, s.flipped) for s in samples]
            latents = torch.stack([g[0] for g in got])
            if any(g[1] is not None for g in got):
                size = next(g[1] for g in got if g[1] is not None).shape[-2:]
                masks = _stack_masks([g[1] for g in got], size)
        if masks is not None:
            masks = F.interpolate(masks.float(), size=latents.shape[-2:], mode="area")
        is_reg = torch.tensor([self.data.records[s.record].subset.is_reg for s in samples], dtype=torch.bool)
        weights = torch.where(is_reg, self.prior_loss_weight, 1.0)
        return Batch(latents=latents, captions=[s.caption for s in samples],
                     size_info=[self.data.size_info(s) for s in samples], weights=weights, is_reg=is_reg, mask=masks,
                     records=[s.record for s in samples], pixels=pixels,
                     multiplier=self.data.specs[self.data.records[samples[0].record].dataset_index].network_multiplier)


def _stack_masks(masks: list, size) -> torch.Tensor:
    """A batch can mix images with and without a mask (subsets of one dataset differ): no mask
    means every position counts."""
    return torch.stack([m if m is not None else torch.ones(1, *size) for m in masks])


def load_samples(data: TrainingData, ref: BatchRef, epoch: int, position: int, with_pixels: bool) -> list[Sample]:
    """The CPU part of a batch (image decoding, crops, captions): what loader workers do."""
    return [data.sample(i, epoch, f"{position}:{j}", with_pixels=with_pixels) for j, i in enumerate(ref.items)]


class MicroBatches(Dataset):
    """Item k = the k-th micro-batch this process trains from `start` on: (step, index in the step,
    micro-batches in the step, samples). A DataLoader over it decodes images in worker processes."""

    def __init__(self, data: TrainingData, plan: "StepPlan", start: int, total: int, with_pixels: bool):
        self.data = data
        self.with_pixels = with_pixels
        self.items = []
        for step in range(start, total):
            epoch, micro = plan.step_batches(step)
            for m, (position, ref) in enumerate(micro):
                self.items.append((step, m, len(micro), epoch, position, ref))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        step, m, count, epoch, position, ref = self.items[k]
        return step, m, count, load_samples(self.data, ref, epoch, position, self.with_pixels)


def _as_is(item):
    return item


def micro_batch_stream(dataset: MicroBatches, workers: int) -> Iterator:
    if workers == 0 or len(dataset) == 0:
        return (dataset[k] for k in range(len(dataset)))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=4)
    return iter(loader)


class StepPlan:
    """Which micro-batches each process trains at each optimizer step.

    An epoch is one pass over the epoch's batch order. With N processes the order is padded to a
    multiple of N by repeating its first batches (as accelerate's data loaders do) and process r
    takes batches r, r+N, ...; its batches are grouped gradient_accumulation_steps at a time, the
    last group of an epoch possibly smaller. Everything follows from the step number, so a resumed
    run continues exactly where the interrupted one stopped.
    """

    def __init__(self, data: TrainingData, accumulation: int, world: int, rank: int):
        self.data = data
        self.accumulation = accumulation
        self.world = world
        self.rank = rank
        self.batches = data.batches_per_epoch()
        self.per_rank = math.ceil(self.batches / world)
        self.steps_per_epoch = math.ceil(self.per_rank / accumulation)
        self._order: tuple[int, list[BatchRef]] | None = None

    def epoch_of(self, step: int) -> int:
        """Epoch (from 1) that optimizer step `step` (from 0) belongs to."""
        return step // self.steps_per_epoch + 1

    def ends_epoch(self, step: int) -> bool:
        return (step + 1) % self.steps_per_epoch == 0

    def step_batches(self, step: int) -> tuple[int, list[tuple[int, BatchRef]]]:
        """(epoch, [(global position, batch), ...]) for this process at `step`."""
        epoch = self.epoch_of(step)
        if self._order is None or self._order[0] != epoch:
            order = self.data.epoch_batches(epoch)
            padded = [order[i % len(order)] for i in range(self.per_rank * self.world)]
            self._order = (epoch, padded)
        padded = self._order[1]
        k = step % self.steps_per_epoch
        slots = range(k * self.accumulation, min((k + 1) * self.accumulation, self.per_rank))
        return epoch, [(i * self.world + self.rank, padded[i * self.world + self.rank]) for i in slots]
