"""Scores of generated images against the demo world's ground truth, as pure functions of
descriptors (library.demo.descriptors), scenes and per-sample losses: no model involved.

- precision / coverage of a prompt's generations against the world's own samples of it, in the
  descriptor space (Naeem et al. 2020, both from the k-nearest-neighbour balls of the real
  samples: one wrong-colour generation cannot inflate them the way it inflates recall);
- copy distance: how close each generation that shows its caption comes to its nearest training image;
- accuracy: the share of images whose descriptor shows a scene's attributes jointly;
- generalisation gap: loss on fresh renders minus loss on the training images, same noise and
  timesteps.
"""
from __future__ import annotations

import numpy as np

from library.demo.descriptors import Descriptor, matches, vectors
from library.demo.world import Scene


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


def knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point."""
    d = _distances(points, points)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_coverage(real: list[Descriptor], fake: list[Descriptor], k: int = 5) -> tuple[float, float]:
    """precision: the share of generations inside some real sample's k-NN ball (do they look like
    the prompt's world?); coverage: the share of real samples whose ball holds a generation (is
    all of the prompt's variety there: positions, angles?)."""
    if not fake:
        return 0.0, 0.0
    r, f = vectors(real), vectors(fake)
    radii = knn_radii(r, k)
    inside = _distances(r, f) <= radii[:, None]      # (real, fake)
    return float(inside.any(0).mean()), float(inside.any(1).mean())


def nearest_distance(queries: list[Descriptor], references: list[Descriptor]) -> np.ndarray:
    """Each query's descriptor distance to its nearest reference (a generation to the training images)."""
    return _distances(vectors(queries), vectors(references)).min(1)


def copy_distance(generations: list[Descriptor], scenes: list[Scene], training: list[Descriptor]) -> float:
    """Mean nearest-training-image distance of the generations that show their caption (all of its
    attributes): how close a right image comes to a training image. Images that miss the caption
    are left out (they are far from everything, which is not "not copying"); nan if none shows it."""
    right = [d for d, s in zip(generations, scenes) if matches(d, s, ("shape", "colour", "background", "pattern",
                                                                      "size"))]
    return float(nearest_distance(right, training).mean()) if right else float("nan")


def accuracy(descriptors: list[Descriptor], scenes: list[Scene], attributes=("shape", "colour", "background")) -> float:
    """The share of images that show every one of the attributes of their scene at once."""
    return float(np.mean([matches(d, s, attributes) for d, s in zip(descriptors, scenes)])) if scenes else 0.0


def share(descriptors: list[Descriptor], predicate) -> float:
    return float(np.mean([bool(predicate(d)) for d in descriptors])) if descriptors else 0.0


def generalisation_gap(train: np.ndarray, fresh: np.ndarray) -> float:
    """mean loss on fresh renders of the training captions - mean loss on the training images.

    train (n_train, draws), fresh (n_fresh, draws): per-sample losses where column j used the same
    timestep and noise for every image. 0 for a model that treats the training images like any
    other view of the concept; > 0 when it fits them better than unseen views (memorising)."""
    return float(np.mean(fresh) - np.mean(train))


def gap_by_bin(train: np.ndarray, fresh: np.ndarray, bins: np.ndarray) -> dict[int, float]:
    """generalisation_gap per timestep bin (bins: the bin of each draw's timestep)."""
    return {int(b): generalisation_gap(train[:, bins == b], fresh[:, bins == b]) for b in np.unique(bins)}
