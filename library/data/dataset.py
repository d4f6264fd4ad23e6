"""The training set: images placed in buckets, a deterministic batch order per epoch, samples.

Batches are drawn within one bucket of one dataset (each dataset has its own batch size and
buckets, as in kohya); the order of the batches is shuffled per epoch with seed + epoch, so a run
resumed at (epoch, batch) sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from library.config.dataset import DatasetBlueprint, DatasetSpec
from library.data.buckets import BucketTable, Placement, crop_offset, near_multiples
from library.data.captions import fixed_caption, process_caption
from library.data.images import load_image, load_mask
from library.data.records import ImageRecord, ScanReport, balance_regularisation, scan_subset
from library.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRef:
    dataset: int
    bucket: tuple[int, int]
    items: tuple[int, ...]  # indices into TrainingData.records


@dataclass
class Sample:
    """One image as the model sees it at one step (pixels, or a view of cached latents)."""
    record: int
    caption: str
    flipped: bool
    crop_left_top: tuple[int, int]
    placement: Placement
    pixels: torch.Tensor | None = None  # 3 x H x W in [-1, 1]
    mask: torch.Tensor | None = None    # 1 x H x W in [0, 1]


def _sdxl_crop(placement: Placement, left: int, top: int, flipped: bool) -> tuple[int, int]:
    """(top, left) crop offset as SDXL conditions on it: in the resized image, mirrored when flipped."""
    if flipped:
        left = placement.resized[0] - placement.bucket[0] - left
    return top, left


class TrainingData:
    def __init__(self, blueprint: DatasetBlueprint, *, native_resolution: int, default_batch_size: int, seed: int,
                 skip_bad_images: bool = False, masked_loss: bool = False):
        self.seed = seed
        self.masked_loss = masked_loss
        self.source = blueprint.source
        self.report = ScanReport()
        self.records: list[ImageRecord] = []
        self.validation: list[int] = []
        self.placements: list[Placement] = []
        self.tables: list[BucketTable] = []
        self.batch_sizes: list[int] = []
        self.specs: list[DatasetSpec] = list(blueprint.datasets)
        for spec in blueprint.datasets:
            self._add_dataset(spec, blueprint.source, native_resolution, default_batch_size, skip_bad_images)
        if not self.train_indices():
            raise UserError(f"{blueprint.source}: no training images left (all held out for validation)")

    # --- building -----------------------------------------------------------------------------
    def _add_dataset(self, spec: DatasetSpec, source: str, native: int, default_bs: int, skip_bad: bool) -> None:
        resolution = spec.resolution or (native, native)
        table = BucketTable(resolution, spec.enable_bucket, spec.min_bucket_reso, spec.max_bucket_reso,
                            spec.bucket_reso_steps, spec.bucket_no_upscale)
        self.tables.append(table)
        self.batch_sizes.append(spec.batch_size or default_bs)
        train, reg = [], []
        for sub in spec.subsets:
            where = f"{source}: [[datasets]] #{spec.index + 1} [[datasets.subsets]] #{sub.index + 1}"
            found = scan_subset(sub, spec.index, skip_bad, self.report, where, self.masked_loss)
            (reg if sub.is_reg else train).extend(found)
        val_recs: list[ImageRecord] = []
        if spec.validation_split > 0 and len(train) > 1:
            rng = random.Random(spec.validation_seed if spec.validation_seed is not None else self.seed)
            n_val = min(len(train) - 1, max(1, round(len(train) * spec.validation_split)))
            held = set(rng.sample(range(len(train)), n_val))
            val_recs = [r for i, r in enumerate(train) if i in held]
            train = [r for i, r in enumerate(train) if i not in held]
        for rec in train + balance_regularisation(train, reg):
            self.records.append(rec)
            self.placements.append(table.place(*rec.size))
        for rec in val_recs:
            self.validation.append(len(self.records))
            self.records.append(rec)
            self.placements.append(table.place(*rec.size))

    def check_grid(self, multiple: int, model: str) -> None:
        """Every bucket's edges are multiples of `multiple` (the model family's latent_multiple), or a UserError naming
        the dataset, its resolution and valid values; run it before the model loads."""
        for d, (spec, table) in enumerate(zip(self.specs, self.tables)):
            sizes = {self.placements[i].bucket for i in range(len(self.records)) if self.records[i].dataset_index == d}
            off = sorted((w, h) for w, h in sizes if w % multiple or h % multiple)
            if not off:
                continue
            where = f"{self.source}: [[datasets]] #{d + 1}"
            if spec.enable_bucket:
                raise UserError(f"{where}: bucket {off[0][0]}x{off[0][1]} is not a multiple of {multiple}, which "
                                f"{model} needs; set bucket_reso_steps to a multiple of {multiple} (e.g. 64)")
            w, h = table.resolution
            raise UserError(f"{where}: resolution {w}x{h}: {model} needs edges that are multiples of {multiple}; "
                            f"use {near_multiples(w, multiple)}" + (f" by {near_multiples(h, multiple)}" if h != w else ""))

    def has_masks(self) -> bool:
        """Whether any image trains with a loss mask (an alpha mask or a mask image)."""
        return any(r.mask is not None or r.subset.alpha_mask for r in self.records)

    def train_indices(self) -> list[int]:
        held = set(self.validation)
        return [i for i in range(len(self.records)) if i not in held]

    # --- order --------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[BatchRef]:
        """The batches of `epoch` (counting from 1) in training order."""
        rng = random.Random(f"{self.seed}:order:{epoch}")
        groups: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for i in self.train_indices():
            rec = self.records[i]
            groups[(rec.dataset_index, self.placements[i].bucket)].extend([i] * rec.repeats)
        batches = []
        for (ds, bucket), items in sorted(groups.items()):
            rng.shuffle(items)
            size = self.batch_sizes[ds]
            for k in range(0, len(items), size):
                batches.append(BatchRef(ds, bucket, tuple(items[k:k + size])))
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(1))

    # --- samples ------------------------------------------------------------------------------
    def sample(self, index: int, epoch: int, slot: str, with_pixels: bool = True) -> Sample:
        """Record `index` as seen at (`epoch`, `slot`): caption, crop and flip drawn from a seeded RNG."""
        rec = self.records[index]
        sub = rec.subset
        rng = random.Random(f"{self.seed}:{epoch}:{slot}:{index}")
        caption = process_caption(rec.caption, sub, epoch, rng)
        placement = self.placements[index]
        left, top = crop_offset(placement, sub.random_crop, rng)
        flipped = sub.flip_aug and rng.random() < 0.5
        out = Sample(index, caption, flipped, (left, top), placement)
        if with_pixels:
            out.pixels, out.mask = self.pixels(index, left, top, flipped)
        return out

    def fixed_sample(self, index: int, with_pixels: bool = True) -> Sample:
        """Record `index` without randomness: centre crop, not flipped, caption not shuffled or dropped."""
        rec = self.records[index]
        placement = self.placements[index]
        left, top = crop_offset(placement, False, None)
        out = Sample(index, fixed_caption(rec.caption, rec.subset), False, (left, top), placement)
        if with_pixels:
            out.pixels, out.mask = self.pixels(index, left, top, False)
        return out

    def pixels(self, index: int, left: int, top: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        rec = self.records[index]
        placement = self.placements[index]
        loaded = load_image(rec.path, keep_alpha_mask=rec.subset.alpha_mask)
        if rec.mask is not None:
            # the mask image goes through the same resize, crop and flip as its image; with an alpha
            # mask too, the two multiply
            drawn = load_mask(rec.mask)
            loaded.mask = drawn if loaded.mask is None else loaded.mask * drawn
        w, h = placement.bucket
        img = loaded.rgb.resize(placement.resized, Image.Resampling.LANCZOS)
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        mask = None
        if loaded.mask is not None:
            m = Image.fromarray(loaded.mask).resize(placement.resized, Image.Resampling.BILINEAR)
            mask = np.array(m.crop((left, top, left + w, top + h)), dtype=np.float32)  # a writable copy
        if flipped:
            arr = arr[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        pixels = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None] if mask is not None else None
        return pixels, mask_t

    def size_info(self, sample: Sample) -> tuple[int, int, int, int, int, int]:
        """Original (h, w), crop (top, left), target (h, w): SDXL's micro-conditioning."""
        p = sample.placement
        top, left = _sdxl_crop(p, sample.crop_left_top[0], sample.crop_left_top[1], sample.flipped)
        return (p.original[1], p.original[0], top, left, p.bucket[1], p.bucket[0])

    def bucket_table(self) -> list[tuple[int, int, int]]:
        """(width, height, images) of every bucket in use, over all datasets."""
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for i in self.train_indices():
            counts[self.placements[i].bucket] += 1
        return [(w, h, n) for (w, h), n in sorted(counts.items())]
