"""APT's adaptive augmentation: a random zoom-out, rotation and translation, applied to each sample
with probability min(gamma_b(t), p_max); and the held-out views of the "views" indicator.

The transform works on latents (the default: it works with cached latents) or on pixels before
the VAE. The border a zoom-out or shift uncovers is filled with a constant per channel (the latent
of a black image, zeros, or black pixels) or with the image mirrored at its edge ("reflect": no
black frame, the layout varies without a border the captions never mention). Both APT passes see
the same augmented input.
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
    shift: torch.Tensor | None = None  # (B, 2) translation (x, y) as a fraction of the image

    @property
    def rate(self) -> float:
        return float(self.apply.float().mean()) if len(self.apply) else 0.0


def draw(gamma: torch.Tensor, p_max: float, zoom_max: float, rotation_max: float, gen: torch.Generator,
         translate_max: float = 0.0) -> AugmentDraw:
    """Which samples to transform (probability min(gamma, p_max)) and with which zoom, angle and shift.
    The translation is drawn after the others, so without it the draws are those of earlier versions."""
    b = gamma.shape[0]
    u = torch.rand(b, generator=gen)
    zoom = 1 + torch.rand(b, generator=gen) * (zoom_max - 1)
    angle = (torch.rand(b, generator=gen) * 2 - 1) * rotation_max
    apply = u < torch.clamp(gamma.float(), max=p_max)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * translate_max if translate_max else None
    return AugmentDraw(apply, zoom, angle, shift)


def warp(x: torch.Tensor, zoom: torch.Tensor, angle: torch.Tensor, fill: torch.Tensor | float | str = 0.0,
         shift: torch.Tensor | None = None) -> torch.Tensor:
    """Zoom out by `zoom` (content shrinks around the centre), rotate by `angle` degrees and move by
    `shift` (fractions of the image), per sample; uncovered areas get `fill` (a scalar or one value
    per channel), or the image mirrored at its edges when `fill` is "reflect"."""
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
    if shift is not None:  # content moves by +shift: sample the input at the output position minus it
        theta[:, :, 2] = -2 * shift.to(torch.float64)
    grid = F.affine_grid(theta.to(torch.float32), (b, c, h, w), align_corners=False).to(x.device)
    if isinstance(fill, str):  # "reflect"
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False).to(x.dtype)
    sampled = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = F.grid_sample(torch.ones(b, 1, h, w, device=x.device), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return (sampled + (1 - coverage) * fill_t).to(x.dtype)


def apply(x: torch.Tensor, plan: AugmentDraw, fill: torch.Tensor | float | str = 0.0) -> torch.Tensor:
    """x with the drawn transform applied to the selected samples (the others untouched)."""
    if not bool(plan.apply.any()):
        return x
    idx = plan.apply.nonzero().flatten()
    out = x.clone()
    shift = None if plan.shift is None else plan.shift[idx]
    out[idx.to(x.device)] = warp(x[idx.to(x.device)], plan.zoom[idx], plan.angle[idx], fill, shift)
    return out


def draw_view_shifts(batch: int, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 2) whole-pixel shifts (dx, dy) in [-max_shift, max_shift], never both zero: each held-out
    view differs from its training image."""
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=gen)
    still = (shifts == 0).all(1)
    if bool(still.any()):  # move the unmoved ones by one pixel along x, either way
        sign = torch.randint(0, 2, (int(still.sum()),), generator=gen) * 2 - 1
        shifts[still, 0] = sign
    return shifts


def shift_views(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each sample moved by whole pixels (dx, dy) with the image mirrored at its edges: no
    resampling, so a view holds exactly the training image's values, only elsewhere."""
    m = int(shifts.abs().max()) if len(shifts) else 0
    if m == 0:
        return x
    padded = F.pad(x.float(), (m, m, m, m), mode="reflect")
    h, w = x.shape[-2:]
    out = torch.stack([padded[i, :, m - int(dy):m - int(dy) + h, m - int(dx):m - int(dx) + w]
                       for i, (dx, dy) in enumerate(shifts.tolist())])
    return out.to(x.dtype)
