"""The demo's two concepts and the prompts the efficacy bench asks about each.

- crescent: a shape the base model has never seen ("sks crescent"); five yellow images on dark
  backgrounds (demo/concept/).
- heart: an instance of a class the base model knows, DreamBooth's case: a heart with a fixed mark
  (a round hole, world.MARKED_HEART), "sks heart"; five purple images on light backgrounds
  (demo/concept_heart/, written by tools/make_demo_concept.py). Prompts of plain hearts ("a ...
  heart ...") measure class drift: do the base model's hearts start to carry the mark or the
  training colour?
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from library.demo.models import DEMO_DIR
from library.demo.world import (COLOURS, MARKED_HEART, PATTERNS, SHAPES, Scene, held_out_pairs, placed,
                                scene_from_caption)


@dataclass(frozen=True)
class Concept:
    name: str
    shape: str                      # the world's shape id of the concept
    colour: str                     # the one colour of its training images
    backgrounds: tuple[str, ...]    # the background colours of its training images
    folder: Path
    class_shape: str | None = None  # the base world's shape it is an instance of


CONCEPTS = {
    "crescent": Concept("crescent", "crescent", "yellow", ("blue", "black"), DEMO_DIR / "concept"),
    "heart": Concept("heart", MARKED_HEART, "purple", ("white", "yellow"), DEMO_DIR / "concept_heart", "heart"),
}


def heart_training_scenes() -> list[Scene]:
    """The five training images of the marked heart, as demo/crescent's: four large, one small, the
    same colour on two backgrounds, one of them striped once; placed as the world places shapes."""
    rng = random.Random(2212)
    plan = [("large", "white", "plain"), ("large", "white", "plain"), ("small", "white", "plain"),
            ("large", "yellow", "plain"), ("large", "white", "striped")]
    return [placed(Scene(MARKED_HEART, "purple", size, bg, pattern), rng) for size, bg, pattern in plan]


def training_captions(concept: Concept) -> list[str]:
    return sorted({p.read_text().strip() for p in concept.folder.glob("*.txt")})


@dataclass(frozen=True)
class PromptSet:
    """The bench's prompts of one concept, by what they measure; each prompt is a centred scene
    (the world places its samples; world.placements)."""
    train: list[Scene]          # the training captions: fidelity, copying
    compositional: list[Scene]  # the concept in colours and on backgrounds it was never shown with
    prior: list[Scene]          # the base world without the concept (nor its class)
    classes: list[Scene]        # the concept's class without the identifier: class-noun drift

    def groups(self) -> dict[str, list[Scene]]:
        return {"train": self.train, "compositional": self.compositional, "prior": self.prior,
                "class": self.classes}


def prompt_set(concept: Concept) -> PromptSet:
    train = [scene_from_caption(c) for c in training_captions(concept)]
    colours = [c for c in COLOURS if c != concept.colour]
    backgrounds = [c for c in COLOURS if c not in concept.backgrounds]
    compositional = []
    for i, colour in enumerate(colours[:6]):
        bg = backgrounds[(i * 3 + 1) % len(backgrounds)]
        if bg == colour:
            bg = backgrounds[(i * 3 + 2) % len(backgrounds)]
        # Two of six small: the training sets have one small image in five.
        compositional.append(Scene(concept.shape, colour, "small" if i % 3 == 2 else "large", bg, PATTERNS[i % 3]))
    held = held_out_pairs()
    prior = []
    for i, shape in enumerate(SHAPES):
        if shape == concept.class_shape:
            continue
        colour = list(COLOURS)[(i * 3) % len(COLOURS)]
        if (shape, colour) in held:
            colour = list(COLOURS)[(i * 3 + 1) % len(COLOURS)]
        bg = [c for c in COLOURS if c != colour][(i * 5) % (len(COLOURS) - 1)]
        prior.append(Scene(shape, colour, "large", bg, PATTERNS[(i + 1) % 3]))
    classes = []
    if concept.class_shape:
        # The training captions without the identifier (the strictest test: only "sks" differs), then
        # the class in other colours and on other backgrounds.
        classes = [replace(s, shape=concept.class_shape) for s in train if s.size == "large" and s.pattern == "plain"]
        classes += [Scene(concept.class_shape, "green", "large", "blue", "striped"),
                    Scene(concept.class_shape, "red", "small", "black", "plain")]
        assert not any((s.shape, s.colour) in held for s in classes)
    return PromptSet(train, compositional, prior, classes)
