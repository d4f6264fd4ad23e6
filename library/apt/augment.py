"""APT's adaptive augmentation: a random zoom-out and rotation, applied to each sample with
probability min(gamma_b(t), p_max).

The transform works on latents (the default: it works with cached latents) or on pixels before
the VAE. The border the zoom-out uncovers is filled with a constant per channel: the latent of a
black image, zeros, or black pixels. Both APT passes see the same augmented input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentDraw:
    apply: torch.Tensor   # (B,) bool
    zoom: torch.Tensor    # (B,) >= 1
    angle: torch.Tensor   # (B,) degrees

    @property
    def rate(self) -> float:
        return float(self.apply.float().mean()) if len(self.apply) else 0.0


def draw(gamma: torch.Tensor, p_max: float, zoom_max: float, rotation_max: float, gen: torch.Generator) -> AugmentDraw:
    """Which samples to transform (probability min(gamma, p_max)) and with which zoom and angle."""
    b = gamma.shape[0]
    u = torch.rand(b, generator=gen)
    zoom = 1 + torch.rand(b, generator=gen) * (zoom_max - 1)
    angle = (torch.rand(b, generator=gen) * 2 - 1) * rotation_max
    apply = u < torch.clamp(gamma.float(), max=p_max)
    return AugmentDraw(apply, zoom, angle)


def warp(x: torch.Tensor, zoom: torch.Tensor, angle: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Zoom out by `zoom` (content shrinks around the centre) and rotate by `angle` degrees, per sample;
    uncovered areas get `fill` (a scalar or one value per channel)."""
    b, c, h, w = x.shape
    rad = angle.to(torch.float64) * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    z = zoom.to(torch.float64)
    # Output pixel p (in pixel units from the centre) samples input z * R(-angle) p; in normalised
    # coordinates the aspect ratio enters through w/h.
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = z * cos
    theta[:, 0, 1] = z * sin * h / w
    theta[:, 1, 0] = -z * sin * w / h
    theta[:, 1, 1] = z * cos
    grid = F.affine_grid(theta.to(torch.float32), (b, c, h, w), align_corners=False).to(x.device)
    sampled = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = F.grid_sample(torch.ones(b, 1, h, w, device=x.device), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return (sampled + (1 - coverage) * fill_t).to(x.dtype)


def apply(x: torch.Tensor, plan: AugmentDraw, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """x with the drawn transform applied to the selected samples (the others untouched)."""
    if not bool(plan.apply.any()):
        return x
    idx = plan.apply.nonzero().flatten()
    out = x.clone()
    out[idx.to(x.device)] = warp(x[idx.to(x.device)], plan.zoom[idx], plan.angle[idx], fill)
    return out
