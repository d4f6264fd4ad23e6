"""A deterministic procedural world: one coloured shape on a plain, striped or dotted background.

Every scene has a caption built from its attributes, e.g. "a small red star on a striped blue
background". The same seed always gives the same scenes, pixel for pixel.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterator

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
# A palette without neighbouring hues (no orange between red and yellow): colour words must bind.
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (240, 210, 35),
    "purple": (135, 55, 185), "cyan": (55, 195, 205), "white": (245, 245, 245), "black": (25, 25, 25),
}
PATTERNS = ("plain", "striped", "dotted")
SIZES = {"small": 0.25, "large": 0.40}  # half-extent of the shape as a fraction of the image
# The demo concept: a shape the base model never sees, named by a rare token.
CONCEPT_SHAPE = "crescent"
CONCEPT_TOKEN = "sks"
# The second concept, of the DreamBooth kind: an instance of a class the base model knows (a heart)
# told apart by a fixed mark, a round hole of the background's colour below the lobes.
MARKED_HEART = "marked_heart"
MARK_CENTRE = 0.18   # the hole's centre below the heart's centre, as a fraction of the half-extent
MARK_RADIUS = 0.25
# How each concept shape is named in captions; the base world's shapes go by their own names.
CONCEPT_NAMES = {CONCEPT_SHAPE: f"{CONCEPT_TOKEN} {CONCEPT_SHAPE}", MARKED_HEART: f"{CONCEPT_TOKEN} heart"}
RENDER = 4  # supersampling factor for anti-aliased edges
# The angles the world draws a shape at (degrees). The crescent's range is the one its shipped
# training images come from (demo/concept: 12-74 degrees, the bite up and to the right), so that
# the world's renders of a crescent prompt are the concept as it was taught.
ANGLE_RANGES = {CONCEPT_SHAPE: (0.0, 90.0)}
DEFAULT_ANGLES = (-12.0, 12.0)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    pattern: str
    cx: float = 0.5   # centre, as a fraction of the image
    cy: float = 0.5
    angle: float = 0.0

    def caption(self) -> str:
        name = CONCEPT_NAMES.get(self.shape, self.shape)
        pattern = "" if self.pattern == "plain" else f"{self.pattern} "
        return f"a {self.size} {self.colour} {name} on a {pattern}{self.background} background"


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Lighter (amount > 0) or darker (< 0) version of a colour, for stripes and dots."""
    if amount > 0:
        return tuple(int(c + (255 - c) * amount) for c in rgb)
    return tuple(int(c * (1 + amount)) for c in rgb)


def pattern_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The colour of a background's stripes or dots: lighter on dark backgrounds, darker on light ones."""
    return _shade(rgb, 0.45) if sum(rgb) < 600 else _shade(rgb, -0.25)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def rot(points):
        a = math.radians(angle)
        return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in points]

    if shape == "square":
        s = r * 0.85
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        return rot(pts)
    if shape == "cross":
        w = r * 0.36
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                    (-w, -w)])
    if shape == "heart":
        pts = []
        for k in range(60):
            t = 2 * math.pi * k / 60
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17 + r * 0.05))
        return rot(pts)
    return None  # circle and crescent are drawn with ellipses


def render(scene: Scene, size: int = 64) -> Image.Image:
    big = size * RENDER
    bg = COLOURS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    alt = pattern_colour(bg)
    if scene.pattern == "striped":
        step = big // 8
        for k in range(0, big, step * 2):
            draw.rectangle([k, 0, k + step - 1, big], fill=alt)
    elif scene.pattern == "dotted":
        step = big // 6
        for y in range(step // 2, big, step):
            for x in range(step // 2, big, step):
                draw.ellipse([x - step // 5, y - step // 5, x + step // 5, y + step // 5], fill=alt)
    r = SIZES[scene.size] * big
    cx, cy = scene.cx * big, scene.cy * big
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == CONCEPT_SHAPE:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        a = math.radians(scene.angle)
        ox, oy = cx + 0.45 * r * math.cos(a), cy - 0.45 * r * math.sin(a)
        draw.ellipse([ox - 0.8 * r, oy - 0.8 * r, ox + 0.8 * r, oy + 0.8 * r], fill=bg)
    elif scene.shape == MARKED_HEART:
        draw.polygon(_outline("heart", cx, cy, r, scene.angle), fill=colour)
        a = math.radians(scene.angle)  # the mark turns with the heart
        hx, hy, hr = cx - MARK_CENTRE * r * math.sin(a), cy + MARK_CENTRE * r * math.cos(a), MARK_RADIUS * r
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=bg)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r, scene.angle), fill=colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def scene_from_caption(caption: str) -> Scene:
    """The attributes of a caption the world writes (the inverse of Scene.caption, centred, upright)."""
    words = caption.split()
    try:
        if words[0] != "a" or words[-1] != "background":
            raise ValueError
        size, colour = words[1], words[2]
        on = words.index("on")
        name = " ".join(words[3:on])
        shape = {v: k for k, v in CONCEPT_NAMES.items()}.get(name, name)
        rest = words[on + 2:-1]
        pattern, background = (rest[0], rest[1]) if len(rest) == 2 else ("plain", rest[0])
        if shape not in (*SHAPES, *CONCEPT_NAMES) or colour not in COLOURS or background not in COLOURS or \
                size not in SIZES or pattern not in PATTERNS or len(rest) > 2:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"not a caption of the demo world: {caption!r}") from None
    return Scene(shape, colour, size, background, pattern)


def held_out_pairs() -> set[tuple[str, str]]:
    """(shape, colour) pairs the base model never sees in training: one per colour."""
    colours = list(COLOURS)
    return {(SHAPES[(i * 5 + 1) % len(SHAPES)], c) for i, c in enumerate(colours)}


def random_scene(rng: random.Random, shapes=SHAPES, exclude: set | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    while True:
        shape = rng.choice(shapes)
        col = colour or rng.choice(list(COLOURS))
        if exclude and (shape, col) in exclude:
            continue
        bg = background or rng.choice([c for c in COLOURS if c != col])
        if bg == col:
            continue
        size = rng.choice(list(SIZES))
        return placed(Scene(shape, col, size, bg, rng.choice(PATTERNS)), rng)


def placed(scene: Scene, rng: random.Random) -> Scene:
    """The scene at a random position (the shape fully inside the image) and a random angle in the
    shape's range."""
    margin = SIZES[scene.size] + 0.04
    return replace(scene, cx=rng.uniform(margin, 1 - margin), cy=rng.uniform(margin, 1 - margin),
                   angle=rng.uniform(*angle_range(scene.shape)))


def angle_range(shape: str) -> tuple[float, float]:
    return ANGLE_RANGES.get(shape, DEFAULT_ANGLES)


def placements(scene: Scene, count: int, seed: int) -> list[Scene]:
    """`count` samples of a prompt's scene as the world draws them (positions and angles at random)."""
    rng = random.Random(seed)
    return [placed(scene, rng) for _ in range(count)]


def scenes(seed: int, count: int, **kwargs) -> Iterator[Scene]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng, **kwargs)
