"""Latents encoded once before training (cache_latents), for the centre crop of every image and,
with flip_aug, for its mirror image too."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from library.data.buckets import crop_offset
from library.data.dataset import TrainingData
from library.errors import UserError


class LatentCache:
    def __init__(self, data: TrainingData, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 4):
        for rec in data.records:
            if rec.subset.random_crop:
                raise UserError(f"{rec.path.parent}: random_crop cannot be combined with cache_latents "
                                "(a cached latent has one fixed crop); turn one of them off")
        self.data = data
        self.encode = encode
        self.batch_size = batch_size
        self.entries: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def wanted(self) -> list[tuple[int, bool]]:
        keys = []
        for i, rec in enumerate(self.data.records):
            keys.append((i, False))
            if rec.subset.flip_aug:
                keys.append((i, True))
        return keys

    def fill(self, progress: Callable | None = None) -> None:
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = defaultdict(list)
        for key in self.wanted():
            if key not in self.entries:
                by_bucket[self.data.placements[key[0]].bucket].append(key)
        for keys in by_bucket.values():
            for k in range(0, len(keys), self.batch_size):
                chunk = keys[k:k + self.batch_size]
                pixels, masks = [], []
                for index, flipped in chunk:
                    left, top = crop_offset(self.data.placements[index], False, None)
                    px, mask = self.data.pixels(index, left, top, flipped)
                    pixels.append(px)
                    masks.append(mask)
                latents = self.encode(torch.stack(pixels)).cpu()
                for key, lat, mask in zip(chunk, latents, masks):
                    self.entries[key] = (lat, mask)
                if progress is not None:
                    progress(len(chunk))

    def get(self, index: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.entries[(index, flipped)]
