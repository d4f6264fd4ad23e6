"""Aspect-ratio buckets, computed exactly as kohya sd-scripts does, and the crop of each image.

Matching kohya's tables matters: users compare bucket lists and step counts between trainers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def near_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value - value % multiple)
    return f"{low} or {low + multiple}" if low != value else str(value)


def bucket_resolutions(resolution: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """kohya's predefined buckets (width, height) for a target area, sorted."""
    area = resolution[0] * resolution[1]
    resos = set()
    side = int(math.sqrt(area) // step) * step
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training sample: resize to `resized`, crop `bucket` at `crop_left/top`."""
    original: tuple[int, int]  # (w, h) of the image
    resized: tuple[int, int]   # (w, h) after scaling to cover the bucket
    bucket: tuple[int, int]    # (w, h) of the training sample


class BucketTable:
    def __init__(self, resolution: tuple[int, int], enable: bool, min_size: int, max_size: int, step: int,
                 no_upscale: bool):
        self.resolution = resolution
        self.enable = enable
        self.step = step
        self.no_upscale = no_upscale and enable
        self.max_area = resolution[0] * resolution[1]
        if enable and not self.no_upscale:
            self.resos = bucket_resolutions(resolution, min_size, max_size, step)
        else:
            self.resos = [resolution]
        self.ratios = [w / h for w, h in self.resos]

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def place(self, width: int, height: int) -> Placement:
        aspect = width / height
        if self.no_upscale:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                w_rounded = self._round(rw)
                h_in_w = self._round(w_rounded / aspect)
                h_rounded = self._round(rh)
                w_in_h = self._round(h_rounded * aspect)
                if abs(w_rounded / max(h_in_w, 1) - aspect) < abs(w_in_h / max(h_rounded, 1) - aspect):
                    resized = (w_rounded, int(w_rounded / aspect + 0.5))
                else:
                    resized = (int(h_rounded * aspect + 0.5), h_rounded)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
            if min(bucket) == 0:
                bucket = (max(bucket[0], self.step), max(bucket[1], self.step))
                scale = max(bucket[0] / width, bucket[1] / height)
                resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            return Placement((width, height), resized, bucket)
        index = min(range(len(self.ratios)), key=lambda i: abs(self.ratios[i] - aspect))
        bucket = self.resos[index]
        if aspect > bucket[0] / bucket[1]:
            scale = bucket[1] / height  # wider than the bucket: match heights, crop the sides
        else:
            scale = bucket[0] / width
        resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
        return Placement((width, height), resized, bucket)


def crop_offset(placement: Placement, random_crop: bool, rng) -> tuple[int, int]:
    """(left, top) of the crop in the resized image: centred, or uniform when random_crop."""
    extra_w = placement.resized[0] - placement.bucket[0]
    extra_h = placement.resized[1] - placement.bucket[1]
    if random_crop:
        return rng.randint(0, extra_w), rng.randint(0, extra_h)
    return extra_w // 2, extra_h // 2
