"""The demo's instruments (library/demo/descriptors.py, metrics.py, concepts.py): each must tell a
perfect sampler of the world from a copier, a wrong-colour sampler and a sampler without the
concept, or it is not shipped."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from library.demo.concepts import CONCEPTS, heart_training_scenes, prompt_set, training_captions
from library.demo.descriptors import describe, describe_all
from library.demo.metrics import (accuracy, copy_distance, gap_by_bin, generalisation_gap, nearest_distance,
                                  precision_coverage)
from library.demo.world import (CONCEPT_SHAPE, MARKED_HEART, PATTERNS, SHAPES, Scene, placements, random_scene,
                                render, scene_from_caption)

ALL_SHAPES = (*SHAPES, CONCEPT_SHAPE, MARKED_HEART)


def test_descriptor_reads_every_attribute_of_the_worlds_renders():
    rng = random.Random(31)
    scenes = [random_scene(rng, shapes=ALL_SHAPES) for _ in range(160)]
    for scene, d in zip(scenes, describe_all([render(s) for s in scenes])):
        assert (d.shape, d.colour, d.background, d.pattern, d.size) == \
            (scene.shape, scene.colour, scene.background, scene.pattern, scene.size), scene
        assert abs(d.cx - scene.cx) * 64 < 1.5 and abs(d.cy - scene.cy) * 64 < 1.5, (scene, d)
        if scene.shape != "circle":
            assert abs(d.angle - scene.angle) <= 5, (scene, d)
        assert d.mark == (scene.shape == MARKED_HEART)


def test_descriptor_of_an_empty_image_finds_no_shape():
    d = describe(Image.new("RGB", (64, 64), (35, 75, 215)))
    assert d.shape == "none" and d.background == "blue"


def test_captions_round_trip_and_the_heart_concept_is_shipped_as_the_tool_writes_it():
    for scene in (Scene("marked_heart", "purple", "small", "yellow", "striped"), Scene("crescent", "red", "large",
                                                                                          "blue", "dotted"),
                  Scene("star", "white", "large", "black", "plain")):
        assert scene_from_caption(scene.caption()) == scene
    marked = Scene("marked_heart", "red", "large", "blue", "plain")
    assert marked.caption() == "a large red sks heart on a blue background"
    with pytest.raises(ValueError):
        scene_from_caption("a photo of a dog")
    folder = CONCEPTS["heart"].folder
    for n, scene in enumerate(heart_training_scenes()):
        shipped = np.asarray(Image.open(folder / f"sks_{n:02d}.png").convert("RGB"))
        assert (shipped == np.asarray(render(scene))).all()
        assert (folder / f"sks_{n:02d}.txt").read_text().strip() == scene.caption()
    assert {scene_from_caption(c).colour for c in training_captions(CONCEPTS["heart"])} == {"purple"}


def test_prompt_sets_measure_what_they_say():
    for concept in CONCEPTS.values():
        ps = prompt_set(concept)
        assert all(s.shape == concept.shape for s in ps.train + ps.compositional)
        assert {s.size for s in ps.compositional} == {"small", "large"}
        assert not any(s.colour == concept.colour or s.background in concept.backgrounds for s in ps.compositional)
        assert not any(s.shape in (concept.shape, concept.class_shape) for s in ps.prior)
    heart = prompt_set(CONCEPTS["heart"])
    assert heart.classes and all(s.shape == "heart" for s in heart.classes)
    assert "a large purple heart on a white background" in [s.caption() for s in heart.classes]
    assert not prompt_set(CONCEPTS["crescent"]).classes


def _samplers(scene: Scene, training: list[Image.Image], seed: int):
    """Images of one prompt from a perfect sampler (the world), a copier (the training images), a
    sampler that gets the colour wrong and one that draws the concept's class (or a triangle) instead."""
    world = placements(scene, 9, seed)
    wrong = next(c for c in ("red", "green", "blue") if c not in (scene.colour, scene.background))
    no_concept = "heart" if scene.shape == MARKED_HEART else "triangle"
    return {"world": [render(s) for s in world], "copier": (training * 9)[:9],
            "wrong colour": [render(replace(s, colour=wrong)) for s in world],
            "no concept": [render(replace(s, shape=no_concept)) for s in world]}, world


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_instruments_tell_a_perfect_sampler_from_copiers_and_wrong_samplers(name):
    concept = CONCEPTS[name]
    paths = sorted(concept.folder.glob("*.png"))
    train_desc = describe_all([Image.open(p) for p in paths])
    scene = scene_from_caption(training_captions(concept)[-1])
    own = [Image.open(p) for p in paths if p.with_suffix(".txt").read_text().strip() == scene.caption()]
    real = describe_all([render(s) for s in placements(scene, 30, 7)])
    scores = {}
    for seed in (100, 200):
        images, truth = _samplers(scene, own, seed)
        for sampler, imgs in images.items():
            d = describe_all(imgs)
            precision, coverage = precision_coverage(real, d)
            scores.setdefault(sampler, []).append((precision, coverage, accuracy(d, truth),
                                                   copy_distance(d, [scene] * len(d), train_desc)))
    s = {k: np.mean(v, axis=0) for k, v in scores.items()}  # precision, coverage, joint accuracy, copy distance
    assert s["world"][0] == 1.0 and s["world"][1] > 0.55 and s["world"][2] == 1.0 and s["world"][3] > 0.6
    # A copier looks right (precision, accuracy) but covers little of the prompt's variety, and sits
    # on the training images.
    assert s["copier"][0] == 1.0 and s["copier"][1] < 0.5 * s["world"][1] and s["copier"][3] < 0.1 * s["world"][3]
    for wrong in ("wrong colour", "no concept"):
        # Far from the training images, but that is not "not copying": no copy distance at all.
        assert s[wrong][0] == 0.0 and s[wrong][1] == 0.0 and s[wrong][2] == 0.0 and np.isnan(s[wrong][3])
    assert float(nearest_distance(describe_all(images["no concept"]), train_desc).min()) > s["world"][3]
    # The attribute a sampler gets right still counts on its own.
    images, truth = _samplers(scene, own, 300)
    assert accuracy(describe_all(images["no concept"]), truth, ("colour", "background")) == 1.0
    assert accuracy(describe_all(images["wrong colour"]), truth, ("shape",)) == 1.0


def test_generalisation_gap_reads_fresh_minus_training_loss():
    rng = np.random.default_rng(0)
    draws = rng.uniform(0.05, 0.2, size=(1, 20))
    same = draws + rng.normal(0, 1e-4, size=(5, 20))
    assert abs(generalisation_gap(same, draws + rng.normal(0, 1e-4, size=(12, 20)))) < 1e-4
    memorised = same * 0.5  # the training images fit twice as well as fresh views
    assert generalisation_gap(memorised, same) == pytest.approx(float(np.mean(same) - np.mean(memorised)))
    bins = np.repeat(np.arange(2), 10)
    by_bin = gap_by_bin(memorised, same, bins)
    assert set(by_bin) == {0, 1} and all(v > 0 for v in by_bin.values())
    assert np.mean(list(by_bin.values())) == pytest.approx(generalisation_gap(memorised, same))


def test_patterns_are_all_told_apart():
    # Every pattern on the light and the dark backgrounds, both sizes.
    for bg in ("white", "black", "yellow", "blue"):
        for pattern in PATTERNS:
            for size in ("small", "large"):
                scene = placements(Scene("circle", "red", size, bg, pattern), 1, 5)[0]
                assert describe(render(scene)).pattern == pattern, scene
