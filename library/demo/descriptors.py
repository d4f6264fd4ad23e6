"""What an image of the demo world shows, measured by hand: shape (the concepts' included, with the
heart's mark), shape colour, background colour and pattern, size, centre and angle.

A measurement rather than a learned recogniser: it needs no training, is exact on the world's own
renders, sees position and angle (which the shipped classifier was trained to ignore), and knows
the concept shapes without any model having seen them. The steps:

- background: the palette colour whose own shade or pattern shade (stripes, dots) most pixels of a
  6 px border band are nearest to;
- foreground: pixels nearer to a palette colour other than the background than to the background's
  two measured shades; its colour is the most frequent such palette colour; the shape's mask is the
  pixels nearer to that colour (as measured in the image) than to the background, opened with a
  3x3 square, largest 4-connected component;
- mark: the mask's holes (background pixels the image border does not reach), as a fraction of the
  filled shape; the marked heart's hole is about 10% of it, no other shape has one;
- shape, angle, centre: the filled mask, centred on its centroid and scaled by the square root of
  its area, sampled on a 24 x 24 grid and matched to templates made the same way from the world's
  renders of every shape, both sizes, in steps of 2 degrees over the shape's angle range
  (world.angle_range) and 4 degrees beyond; the template also
  gives the offset from the centroid to the world's centre of the shape;
- size: the nearer (in log area) of the matched shape's small and large templates;
- pattern: the share of background pixels (2 px away from the shape) nearer to the pattern shade
  than to the background's: plain below 4%, striped when it varies across columns much more than
  across rows (the world's stripes are vertical), dotted otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from library.demo.world import (CONCEPT_SHAPE, COLOURS, MARKED_HEART, PATTERNS, SHAPES, SIZES, Scene, angle_range,
                                pattern_colour, render)

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[c] for c in NAMES], dtype=np.float32)
SHADES = np.array([pattern_colour(COLOURS[c]) for c in NAMES], dtype=np.float32)
# The shapes the templates know (the marked heart is a heart with a hole: the mark is measured apart).
TEMPLATE_SHAPES = (*SHAPES, CONCEPT_SHAPE)
# Every shape a descriptor can report, the concepts' included; "none" when no shape was found.
KINDS = (*SHAPES, CONCEPT_SHAPE, MARKED_HEART, "none")
MARK_MIN = 0.025     # hole share above which a shape carries the mark (the world: 0.09-0.14; through the VAE a
#                      small heart's hole shrinks, 5% of them below 0.036; no other shape has one)
MIN_AREA = 30        # pixels: less is no shape
BAND = 6
GRID = 24
EXTENT = 1.1         # the template grid spans +-EXTENT square roots of the shape's area


@dataclass(frozen=True)
class Descriptor:
    shape: str          # a KINDS entry: the marked heart counts as its own shape
    mark: bool          # the shape has the mark's hole
    colour: str         # a palette name, or "none"
    background: str
    pattern: str
    size: str           # "small" / "large", or "none"
    cx: float           # the shape's centre as the world places it, as a fraction of the image
    cy: float
    angle: float        # degrees, as the world's Scene.angle (0 for circles)
    hole: float         # the holes' share of the filled shape
    area: float         # the filled shape's share of the image

    @property
    def base_shape(self) -> str:
        """The shape without the mark (the class a marked heart belongs to)."""
        return "heart" if self.shape == MARKED_HEART else self.shape


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _nearest(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest colour for every pixel (H, W, 3) -> (H, W)."""
    return ((pixels[..., None, :] - colours) ** 2).sum(-1).argmin(-1)


def _grow(seed: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The pixels of `inside` 4-connected to `seed`."""
    reach = seed & inside
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= inside
        if (grown == reach).all():
            return reach
        reach = grown


def _open3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square (drops specks and one-pixel threads)."""
    def shifted(m, fill):
        p = np.pad(m, 1, constant_values=fill)
        return [p[dy:dy + m.shape[0], dx:dx + m.shape[1]] for dy in range(3) for dx in range(3)]

    eroded = np.logical_and.reduce(shifted(mask, False))
    return np.logical_or.reduce(shifted(eroded, False))


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`steps` 4-neighbour dilations."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    left = mask.copy()
    best = np.zeros_like(mask)
    while left.any():
        y, x = np.argwhere(left)[0]
        seed = np.zeros_like(mask)
        seed[y, x] = True
        part = _grow(seed, left)
        if part.sum() > best.sum():
            best = part
        left &= ~part
    return best


def _grid_sample(filled: np.ndarray, mx: float, my: float, scale: float) -> np.ndarray:
    """The filled mask, bilinearly sampled on GRID x GRID points around (mx, my) (pixel centres)."""
    u = np.linspace(-EXTENT, EXTENT, GRID) * scale
    xs, ys = np.meshgrid(mx + u, my + u)
    h, w = filled.shape
    f = np.pad(filled.astype(np.float32), 1)
    x, y = xs + 1, ys + 1  # into the padded frame
    x0, y0 = np.clip(np.floor(x).astype(int), 0, w), np.clip(np.floor(y).astype(int), 0, h)
    ax, ay = np.clip(x - x0, 0, 1), np.clip(y - y0, 0, 1)
    top = f[y0, x0] * (1 - ax) + f[y0, x0 + 1] * ax
    bottom = f[y0 + 1, x0] * (1 - ax) + f[y0 + 1, x0 + 1] * ax
    return (top * (1 - ay) + bottom * ay).ravel()


@dataclass
class _Measured:
    background: int
    pattern: str
    colour: int
    filled: np.ndarray
    hole: float


def _measure(px: np.ndarray) -> _Measured | None:
    h, w, _ = px.shape
    band = np.zeros((h, w), dtype=bool)
    band[:BAND], band[-BAND:], band[:, :BAND], band[:, -BAND:] = True, True, True, True
    both = np.concatenate([PALETTE, SHADES])
    labels = _nearest(px[band], both)
    bg = int(np.bincount(labels % len(NAMES), minlength=len(NAMES)).argmax())
    own, shaded = labels == bg, labels == bg + len(NAMES)
    bg_rgb = np.median(px[band][own], axis=0) if own.sum() >= 10 else PALETTE[bg]
    shade_rgb = np.median(px[band][shaded], axis=0) if shaded.sum() >= 10 else SHADES[bg]
    others = [i for i in range(len(NAMES)) if i != bg]
    candidates = np.stack([bg_rgb, shade_rgb, *PALETTE[others]])
    nearest = _nearest(px, candidates)
    fg_votes = nearest[nearest >= 2]
    if fg_votes.size < MIN_AREA:
        return None
    fg = others[int(np.bincount(fg_votes - 2).argmax())]
    fg_rgb = np.median(px[nearest == others.index(fg) + 2], axis=0)
    mask = _nearest(px, np.stack([bg_rgb, shade_rgb, fg_rgb])) == 2
    mask = _largest_component(_open3(mask))
    if mask.sum() < MIN_AREA:
        return None
    edge = np.zeros_like(mask)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    outside = _grow(edge & ~mask, ~mask)
    holes = ~mask & ~outside
    filled = mask | holes
    ground = ~_dilate(filled, 2)
    shade = _nearest(px, np.stack([bg_rgb, shade_rgb])) == 1
    share = float(shade[ground].mean()) if ground.any() else 0.0
    if share < 0.04:
        pattern = "plain"
    else:
        counts_c, counts_r = ground.sum(0), ground.sum(1)
        cols = (shade & ground).sum(0)[counts_c >= 8] / counts_c[counts_c >= 8]
        rows = (shade & ground).sum(1)[counts_r >= 8] / counts_r[counts_r >= 8]
        pattern = "striped" if cols.std() > 1.5 * rows.std() + 1e-6 else "dotted"
    return _Measured(bg, pattern, fg, filled, float(holes.sum() / filled.sum()))


def _geometry(filled: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    ys, xs = np.nonzero(filled)
    mx, my, scale = float(xs.mean()), float(ys.mean()), float(np.sqrt(filled.sum()))
    return mx, my, scale, _grid_sample(filled, mx, my, scale)


@dataclass(frozen=True)
class _Templates:
    grids: np.ndarray       # (T, GRID * GRID)
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    angles: np.ndarray
    offsets: np.ndarray     # (T, 2): (centroid - world centre) / scale
    areas: dict             # (shape, size) -> filled area in pixels at angle 0


@lru_cache(maxsize=1)
def _templates() -> _Templates:
    grids, shapes, sizes, angles, offsets, areas = [], [], [], [], [], {}
    for shape in TEMPLATE_SHAPES:
        for size in SIZES:
            lo, hi = angle_range(shape)
            for angle in range(int(lo) - 4, int(hi) + 5, 2):
                image = render(Scene(shape, "white", size, "black", "plain", angle=float(angle)))
                measured = _measure(_pixels(image))
                mx, my, scale, grid = _geometry(measured.filled)
                grids.append(grid)
                shapes.append(shape)
                sizes.append(size)
                angles.append(0.0 if shape == "circle" else float(angle))
                w = image.size[0]
                offsets.append(((mx - (w / 2 - 0.5)) / scale, (my - (w / 2 - 0.5)) / scale))
                if angle == 0:
                    areas[(shape, size)] = float(measured.filled.sum())
    return _Templates(np.stack(grids), tuple(shapes), tuple(sizes), np.array(angles), np.array(offsets), areas)


NOTHING = dict(shape="none", mark=False, colour="none", pattern="plain", size="none", cx=0.5, cy=0.5, angle=0.0,
               hole=0.0, area=0.0)


def describe(image) -> Descriptor:
    """The descriptor of one image (PIL, any size; the world's are 64 x 64)."""
    px = _pixels(image)
    measured = _measure(px)
    if measured is None:
        h, w, _ = px.shape
        band = np.concatenate([px[:BAND].reshape(-1, 3), px[-BAND:].reshape(-1, 3)])
        bg = NAMES[int(np.bincount(_nearest(band, np.concatenate([PALETTE, SHADES])) % len(NAMES)).argmax())]
        return Descriptor(background=bg, **NOTHING)
    t = _templates()
    mx, my, scale, grid = _geometry(measured.filled)
    best = int(((t.grids - grid) ** 2).sum(1).argmin())
    shape = t.shapes[best]
    area = float(measured.filled.sum())
    size = min(SIZES, key=lambda s: abs(np.log(area / t.areas[(shape, s)])))
    mark = measured.hole >= MARK_MIN
    kind = MARKED_HEART if shape == "heart" and mark else shape
    h, w = measured.filled.shape
    ox, oy = t.offsets[best]
    return Descriptor(shape=kind, mark=mark, colour=NAMES[measured.colour], background=NAMES[measured.background],
                      pattern=measured.pattern, size=size, cx=(mx - ox * scale + 0.5) / w,
                      cy=(my - oy * scale + 0.5) / h, angle=float(t.angles[best]), hole=measured.hole,
                      area=area / (h * w))


def describe_all(images) -> list[Descriptor]:
    return [describe(im) for im in images]


# --- the descriptor space -----------------------------------------------------------------------
# Attributes one-hot, scaled so that one differing attribute (distance 3 * sqrt(2)) is far beyond
# the spread of the world's own samples of a prompt; centre and angle scaled to [-1, 1] over the
# ranges the world draws a shape of that size and kind in, so that a prompt's samples fill a cube.
ATTRIBUTE_WEIGHT = 3.0
_ONE_HOT = (("shape", KINDS), ("colour", (*NAMES, "none")), ("background", tuple(NAMES)), ("pattern", PATTERNS),
            ("size", (*SIZES, "none")))


def _half_range(size: str) -> float:
    """How far from the middle the world places the centre of a shape of this size (world.placed)."""
    return 0.5 - (SIZES.get(size, SIZES["small"]) + 0.04)


def vector(d: Descriptor) -> np.ndarray:
    parts = []
    for field, values in _ONE_HOT:
        one = np.zeros(len(values), dtype=np.float32)
        one[values.index(getattr(d, field))] = ATTRIBUTE_WEIGHT
        parts.append(one)
    half = _half_range(d.size)
    lo, hi = angle_range(d.base_shape)
    angle = (d.angle - (lo + hi) / 2) / ((hi - lo) / 2)
    parts.append(np.array([(d.cx - 0.5) / half, (d.cy - 0.5) / half, angle], dtype=np.float32))
    return np.concatenate(parts)


def vectors(descriptors: list[Descriptor]) -> np.ndarray:
    return np.stack([vector(d) for d in descriptors]) if descriptors else np.zeros((0, len(vector(
        Descriptor(background=NAMES[0], **NOTHING)))), dtype=np.float32)


def matches(d: Descriptor, scene: Scene, attributes=("shape", "colour", "background")) -> bool:
    """Whether the image shows the scene's attributes (shape = the world's shape id, mark included)."""
    return all(getattr(d, a) == getattr(scene, a) for a in attributes)
