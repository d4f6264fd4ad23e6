"""Latents encoded once before training (cache_latents), in memory or on disk.

Each cached latent is keyed on everything that determines it: the image file's bytes, the bucket
and resize, the crop, the flip, whether an alpha mask is kept, and the VAE's weights. A changed
image, resolution or VAE therefore gets a new key and is re-encoded, never silently reused (kohya
reuses stale caches: its issue #1771). Disk entries are written to a temporary file and renamed,
so an interrupted run leaves either a complete entry or none.

With flip_aug both orientations are cached. The config refuses random_crop with caching: a cached
latent has one crop.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from library.data.buckets import crop_offset
from library.config.paths import LATENT_CACHE_FOLDER as CACHE_FOLDER
from library.data.dataset import TrainingData
from library.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "apt-latent-v1"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LatentCache:
    def __init__(self, data: TrainingData, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str,
                 to_disk: bool = False, cache_dir: str | None = None, batch_size: int = 4):
        self.data = data
        self.encode = encode
        self.vae_id = vae_id
        self.to_disk = to_disk
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.entries: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.hits = 0
        self.encoded = 0
        self._digests: dict[int, str] = {}

    def wanted(self) -> list[tuple[int, bool]]:
        keys = []
        for i, rec in enumerate(self.data.records):
            keys.append((i, False))
            if rec.subset.flip_aug:
                keys.append((i, True))
        return keys

    # --- keys and files -----------------------------------------------------------------------
    def key(self, index: int, flipped: bool) -> str:
        rec = self.data.records[index]
        if index not in self._digests:
            self._digests[index] = file_digest(rec.path)
            if rec.mask is not None:  # a changed mask image is a new entry too
                self._digests[index] += ":" + file_digest(rec.mask)
        p = self.data.placements[index]
        left, top = crop_offset(p, False, None)
        parts = {"format": FORMAT, "image": self._digests[index], "original": p.original, "resized": p.resized,
                 "bucket": p.bucket, "crop": [left, top], "flip": flipped,
                 "mask": rec.subset.alpha_mask if rec.mask is None else ["file", rec.subset.alpha_mask],
                 "vae": self.vae_id}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, index: int, flipped: bool, key: str) -> Path:
        rec = self.data.records[index]
        folder = self.cache_dir if self.cache_dir is not None else rec.path.parent / CACHE_FOLDER
        return folder / f"{rec.path.name}.{'flip' if flipped else 'orig'}.{key[:24]}.safetensors"

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
        except Exception:  # a damaged entry is re-encoded, never trusted
            log.warning("latent cache entry %s is unreadable; re-encoding", path)
            return None
        return data["latents"], data.get("alpha_mask")

    def _write(self, path: Path, latents: torch.Tensor, mask: torch.Tensor | None) -> None:
        tensors = {"latents": latents.contiguous()}
        if mask is not None:
            tensors["alpha_mask"] = mask.contiguous()
        atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT}))
        stem = path.name.rsplit(".", 2)[0]  # "<image>.<orig|flip>"
        for old in path.parent.glob(f"{stem}.*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)  # stale entries of this image and orientation

    # --- filling ------------------------------------------------------------------------------
    def fill(self, progress: Callable[[int], None] | None = None) -> None:
        todo: dict[tuple[int, int], list[tuple[int, bool, str]]] = defaultdict(list)
        for index, flipped in self.wanted():
            if (index, flipped) in self.entries:
                continue
            key = self.key(index, flipped)
            if self.to_disk:
                found = self._read(self.path(index, flipped, key))
                if found is not None:
                    self.entries[(index, flipped)] = found
                    self.hits += 1
                    if progress:
                        progress(1)
                    continue
            todo[self.data.placements[index].bucket].append((index, flipped, key))
        for items in todo.values():
            for k in range(0, len(items), self.batch_size):
                chunk = items[k:k + self.batch_size]
                pixels, masks = [], []
                for index, flipped, _ in chunk:
                    left, top = crop_offset(self.data.placements[index], False, None)
                    px, mask = self.data.pixels(index, left, top, flipped)
                    pixels.append(px)
                    masks.append(mask)
                latents = self.encode(torch.stack(pixels)).cpu()
                for (index, flipped, key), lat, mask in zip(chunk, latents, masks):
                    self.entries[(index, flipped)] = (lat, mask)
                    if self.to_disk:
                        self._write(self.path(index, flipped, key), lat, mask)
                self.encoded += len(chunk)
                if progress:
                    progress(len(chunk))

    def get(self, index: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.entries[(index, flipped)]
